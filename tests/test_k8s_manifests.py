"""deploy/k8s/ on paper: the manifests parse, and every server flag, port, probe, secret file,
grace period and name in them agrees with the server's real settings (config.py's parser and
checks) and with each other. No cluster is needed (none runs here)."""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml
from rnnserve_server import config

from tests.doc_runner import ROOT

K8S = ROOT / "deploy" / "k8s"
NAMESPACE = "rnnserve"


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    (found,) = [c for c in containers if c["name"] == name]
    return found


def flags(args: list[str]) -> dict[str, str]:
    """``--name value`` and ``--name=value`` pairs of a container's args."""
    pairs: dict[str, str] = {}
    items = iter(args)
    for item in items:
        assert item.startswith("--"), f"{item!r} is not a flag"
        name, eq, value = item.partition("=")
        pairs[name] = value if eq else next(items)
    return pairs


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def named_ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


def service_port(service: dict[str, Any], c: dict[str, Any], port: int) -> int:
    """The container port a Service's ``port`` reaches (targetPort by name or number)."""
    (entry,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    target = entry["targetPort"]
    return named_ports(c)[target] if isinstance(target, str) else int(target)


REPLICAS = find("StatefulSet", "rnnserve")
SERVER = container(REPLICAS, "rnnserve")
SERVER_FLAGS = flags(SERVER["args"])


def test_every_manifest_parses_and_lives_in_the_namespace() -> None:
    docs = documents()
    assert {d["kind"] for d in docs} >= {
        "Namespace",
        "Service",
        "StatefulSet",
        "Deployment",
        "ConfigMap",
        "PersistentVolumeClaim",
    }
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


def test_every_server_flag_is_a_real_one_and_the_settings_are_accepted(tmp_path: Path) -> None:
    """The replicas' args parse with the server's own parser (flags, types, choices) and pass
    its checks (cluster security included); a token file stands in for the Secret's."""
    parser = config.build_parser()
    known = {option for action in parser._actions for option in action.option_strings}
    assert set(SERVER_FLAGS) <= known, set(SERVER_FLAGS) - known
    env = {e["name"]: "rnnserve-0" for e in SERVER.get("env", []) if "valueFrom" in e}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in SERVER["args"]]
    parsed = vars(parser.parse_args(argv))
    values: dict[str, Any] = {
        f.name: tuple(parsed[f.name]) if isinstance(parsed[f.name], list) else parsed[f.name]
        for f in dataclasses.fields(config.Settings)
        if parsed.get(f.name) is not None
    }
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token\n")
    settings = dataclasses.replace(config.Settings(**values), auth_token_file=tokens)
    config.check_settings(settings)  # exits (code 2) on a setting the server refuses
    assert config.peer_tls_on(settings) and settings.tls_cert is not None
    for item in SERVER.get("env", []):
        if item["name"].startswith(config.ENV_PREFIX):
            field = item["name"].removeprefix(config.ENV_PREFIX).lower()
            assert field in {f.name for f in dataclasses.fields(config.Settings)}, item


def test_ports_and_probes_match_the_flags() -> None:
    ports = named_ports(SERVER)
    assert ports["grpc"] == port_of(SERVER_FLAGS["--address"])
    assert ports["peer"] == port_of(SERVER_FLAGS["--peer-address"])
    assert ports["peer"] == port_of(SERVER_FLAGS["--advertise-address"])
    assert ports["health"] == int(SERVER_FLAGS["--health-port"])
    assert ports["metrics"] == int(SERVER_FLAGS["--metrics-port"])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        port = SERVER[probe]["grpc"]["port"]
        assert (ports[port] if isinstance(port, str) else port) == ports["health"], probe
    # Peers reach each other as <pod>.<the StatefulSet's Service>: headless, listed unready too.
    host = SERVER_FLAGS["--advertise-address"].rsplit(":", 1)[0]
    assert host == f"$(POD_NAME).{REPLICAS['spec']['serviceName']}"
    peers = find("Service", REPLICAS["spec"]["serviceName"])
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"]
    assert service_port(peers, SERVER, ports["peer"]) == ports["peer"]
    labels = REPLICAS["spec"]["template"]["metadata"]["labels"]
    for service in ("rnnserve-peers", "rnnserve-replicas"):
        assert find("Service", service)["spec"]["selector"].items() <= labels.items()


def test_termination_grace_fits_the_drain() -> None:
    """SIGTERM: calls get --grace, then sessions are checkpointed and leases released; the pod
    gets twice --grace before SIGKILL."""
    grace = float(SERVER_FLAGS.get("--grace", config.Settings().grace))
    assert REPLICAS["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 2 * grace


def test_secret_files_and_volumes_are_mounted_where_the_flags_point() -> None:
    spec = REPLICAS["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in SERVER["volumeMounts"]}
    secret_flags = [
        "--auth-token-file", "--tls-cert", "--tls-key", "--redis-password-file",
        "--redis-tls-ca", "--peer-tls-ca", "--peer-tls-cert", "--peer-tls-key",
    ]  # fmt: skip
    for flag in secret_flags:
        directory, _, name = SERVER_FLAGS[flag].rpartition("/")
        secret = mounts[directory].get("secret")
        assert secret is not None, f"{flag}: {directory} is not a Secret"
        items = secret.get("items")
        assert items is None or name in [i["path"] for i in items], flag
    shared = mounts[SERVER_FLAGS["--shared-dir"]]["persistentVolumeClaim"]["claimName"]
    assert find("PersistentVolumeClaim", shared)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "emptyDir" in mounts[SERVER_FLAGS["--data-dir"]]


def test_redis_keeps_an_append_only_file_and_is_reached_as_the_url_says() -> None:
    redis = find("StatefulSet", "rnnserve-redis")
    server = container(redis, "redis")
    args = server["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--port") + 1] == "0"  # TLS only
    tls_port = int(args[args.index("--tls-port") + 1])
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in [
        m["name"] for m in server["volumeMounts"] if m["mountPath"] == "/data"
    ]
    url = urllib.parse.urlsplit(SERVER_FLAGS["--redis-url"])
    assert url.scheme == "rediss" and url.password is None
    service = find("Service", url.hostname or "")
    assert (
        service["spec"]["selector"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )
    assert service_port(service, server, url.port or 6379) == tls_port


def test_nginx_sends_calls_to_the_replicas_service() -> None:
    conf = find("ConfigMap", "rnnserve-nginx")["data"]["nginx.conf"]
    # The approach of deploy/nginx.conf: consistent hashing on the session id.
    assert "hash $http_x_session_id consistent;" in conf
    assert "hash $http_x_session_id consistent;" in (ROOT / "deploy" / "nginx.conf").read_text()
    (upstream,) = re.findall(r"^\s*server\s+(\S+)\s+resolve\b", conf, re.M)
    host, port = upstream.rsplit(":", 1)
    service_name, namespace, *rest = host.split(".")
    assert namespace == NAMESPACE and rest == ["svc", "cluster", "local"]
    service = find("Service", service_name)
    assert service["spec"]["clusterIP"] == "None"  # one address per replica, for the hash
    labels = REPLICAS["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service_port(service, SERVER, int(port)) == port_of(SERVER_FLAGS["--address"])
    (listen,) = re.findall(r"^\s*listen\s+(\d+)", conf, re.M)
    nginx = find("Deployment", "rnnserve-nginx")
    proxy = container(nginx, "nginx")
    assert named_ports(proxy)["grpc"] == int(listen)
    front = find("Service", "rnnserve")
    assert service_port(front, proxy, 50051) == int(listen)
    # Replicas serve TLS (--tls-cert): nginx speaks TLS to them and checks their certificate.
    assert "grpc_pass grpcs://rnnserve;" in conf and "grpc_ssl_verify on;" in conf


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_no_secret_value_is_written_in_a_manifest(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        assert not doc or doc["kind"] != "Secret", f"{path.name}: Secrets are made by kubectl"
