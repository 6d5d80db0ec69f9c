"""The import parser against corrupted archives, in-process: random byte flips and
truncations of a real archive, and every field of its metadata set to values of the wrong
type or range. Each must be refused with InvalidArgumentError / LimitExceededError (what the
servicer maps to INVALID_ARGUMENT / RESOURCE_EXHAUSTED) or give a session that works; never
another exception (which would be INTERNAL), and an accepted one must be describable in a
reply. Found real gaps: zipfile's CRC and header errors, an Adam step count of -1 (a division by
zero), counters too large for the wire; then (issue 16 item 4) a lone surrogate in any string,
which was adopted and broke every reply that described it, and keys and arrays the format does
not have, which were accepted silently."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve_server.api.converters import fit_page
from rnnserve_server.api.servicer import session_to_pb
from rnnserve_server.config import Settings
from rnnserve_server.engine.model_config import DivergedError, ModelConfig
from rnnserve_server.engine.trainer import Trainer
from rnnserve_server.engine.vocab import Vocab
from rnnserve_server.errors import InvalidArgumentError, LimitExceededError
from rnnserve_server.sessions.registry import Registry
from rnnserve_server.sessions.session import Session
from rnnserve_server.sessions.session_types import Summary
from rnnserve_server.storage import archive
from rnnserve_server.storage.local_store import LocalStore

pytestmark = [
    pytest.mark.timeout(120),
    # clip 1e308 in a float32 model: the same warning as creating such a session
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]

TEXT = "the quick brown fox jumps over the lazy dog. " * 10


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    registry = Registry(Settings(), LocalStore(tmp_path_factory.mktemp("fuzz")))
    yield registry
    registry.compute.shutdown()
    registry.io.shutdown()


@pytest.fixture(scope="module")
def data() -> bytes:
    vocab = Vocab.from_text(TEXT)
    config = ModelConfig(8, 8, 2, 0.01, "adam", seed=1, validation_fraction=0.1)
    session = Session.new("x", Trainer(config, vocab, vocab.encode(TEXT)))
    for _ in range(5):
        session.step_once(None)
    session.losses.record(session.step_once(None).loss, 2.5)  # one validation point in the history
    return archive.write(session.export_state())


def _outcome(registry: Registry, blob: bytes) -> str:
    try:
        ckpt = archive.read(blob, registry.check_import)
        ckpt.session_id = "y"
        session = registry.factory.from_checkpoint(ckpt, {})
    except (InvalidArgumentError, LimitExceededError):
        return "refused"
    # A valid archive with an absurd learning rate diverges (not applied), as for any session.
    with contextlib.suppress(DivergedError):
        session.step_once(None)
    session.require_trainer().validation_loss()
    session.require_trainer().predict(np.array([0, 1]))
    assert session_to_pb(session).state == pb.SESSION_STATE_READY  # describable in a reply
    assert session.snapshot() is not None
    return "ok"


def test_the_archive_round_trips(registry: Registry, data: bytes) -> None:
    assert _outcome(registry, data) == "ok"


@pytest.mark.parametrize("seed", range(3))
def test_random_corruption_is_refused_or_harmless(
    registry: Registry, data: bytes, seed: int
) -> None:
    rng = random.Random(seed)
    seen = set()
    for _ in range(400):
        blob = bytearray(data)
        for _ in range(rng.choice([1, 2, 5, 20])):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        if rng.random() < 0.1:
            blob = blob[: rng.randrange(len(blob))]
        seen.add(_outcome(registry, bytes(blob)))
    assert "refused" in seen


def _paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


def _entries(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _meta(entries: dict[str, bytes]) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads(np.load(io.BytesIO(entries["meta.npy"])).tobytes())
    return meta


def _archive(entries: dict[str, bytes], meta: dict[str, Any] | None = None) -> bytes:
    """The archive of ``entries``, with ``meta`` as its meta entry if given."""
    if meta is not None:
        buffer = io.BytesIO()
        np.save(buffer, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        entries = {**entries, "meta.npy": buffer.getvalue()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, blob in entries.items():
            zf.writestr(name, blob)
    return out.getvalue()


def _node(meta: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        meta = meta[key]
    return meta


def test_every_metadata_field_with_wrong_values(registry: Registry, data: bytes) -> None:
    entries = _entries(data)
    meta = _meta(entries)
    values: list[Any] = [None, "x", -1, 0, 1e308, -1e308, [], {}, True, 2**70, 1.5, ""]
    values += [[[1, 2]], [[1, "x"]], float("nan"), "\ud800", {"\udfff": 1}, [["\ud800", 1]]]
    outcomes = []
    for path in list(_paths(meta)):
        for value in values:
            changed = copy.deepcopy(meta)
            _node(changed, path[:-1])[path[-1]] = value
            outcomes.append(_outcome(registry, _archive(entries, changed)))
    assert outcomes.count("refused") > 100


def _strings(tree: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every string value in a JSON tree."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        if isinstance(value, str):
            yield (*prefix, key)
        elif isinstance(value, dict | list):
            yield from _strings(value, (*prefix, key))


def test_a_lone_surrogate_anywhere_in_meta_is_refused(registry: Registry, data: bytes) -> None:
    """Issue 16 item 4: every string (and every key) must be text a reply can carry."""
    entries = _entries(data)
    meta = _meta(entries)
    paths = [p for p in _strings(meta) if p != ("format",)]  # a wrong tag: not an archive
    assert ("trainer", "alphabet") in paths and ("session_id",) in paths
    for path in paths:
        changed = copy.deepcopy(meta)
        node = _node(changed, path[:-1])
        node[path[-1]] = "\ud800" + node[path[-1]][1:]
        with pytest.raises(InvalidArgumentError, match="lone surrogate"):
            archive.read(_archive(entries, changed), registry.check_import)
    for path in [(), *(p for p in _paths(meta) if isinstance(_node(meta, p), dict))]:
        changed = copy.deepcopy(meta)
        _node(changed, path)["\udc80"] = 1
        with pytest.raises(InvalidArgumentError, match="lone surrogate"):
            archive.read(_archive(entries, changed), registry.check_import)


def test_every_unknown_key_or_array_is_refused(registry: Registry, data: bytes) -> None:
    """The versioning rule: within a version this server reads, an entry the version does not
    have is refused (at every level of meta, and as an array), never dropped silently."""
    entries = _entries(data)
    meta = _meta(entries)
    objects = [(), *(p for p in _paths(meta) if isinstance(_node(meta, p), dict))]
    assert ("trainer", "optim") in objects and ("trainer", "config") in objects
    for path in objects:
        changed = copy.deepcopy(meta)
        _node(changed, path)["unknown_entry"] = 0
        assert _outcome(registry, _archive(entries, changed)) == "refused", path
    array = io.BytesIO()
    np.save(array, np.zeros(4, dtype=np.float32))
    for name in ("trainer.extra.npy", "trainer.optim.extra.npy", "trainer.Wxh0.npy"):
        blob = _archive({**entries, name: array.getvalue()})
        with pytest.raises(InvalidArgumentError, match=repr(name.removesuffix(".npy"))):
            _outcome_or_raise(registry, blob)


def _outcome_or_raise(registry: Registry, blob: bytes) -> Session:
    ckpt = archive.read(blob, registry.check_import)
    ckpt.session_id = "y"
    return registry.factory.from_checkpoint(ckpt, {})


@pytest.mark.parametrize("version", [3, 10**6])
def test_a_newer_version_is_refused_naming_both(
    registry: Registry, data: bytes, version: int
) -> None:
    entries = _entries(data)
    meta = {**_meta(entries), "version": version}
    with pytest.raises(InvalidArgumentError) as refused:
        archive.read(_archive(entries, meta), registry.check_import)
    assert f"version {version}, newer than this server reads (version 2)" in str(refused.value)


def test_a_session_that_cannot_be_described_is_listed_broken() -> None:
    """The last line of defence: state no reply can carry (here an alphabet with a lone
    surrogate, planted past every check) is described BROKEN with the reason, and the rest of
    its ListSessions page still answers."""
    vocab = Vocab.from_text(TEXT)
    good = Session.new(
        "good", Trainer(ModelConfig(8, 8, 2, 0.01, "adam"), vocab, vocab.encode(TEXT))
    )
    bad = Session("bad", create_time=0.0)
    bad.summary = Summary(good.summary.config, "ab\ud800", 3, 10)
    described = session_to_pb(bad)
    assert described.state == pb.SESSION_STATE_BROKEN
    assert "can't be put in a reply" in described.error
    page, token = fit_page([bad, good], "", 4 << 20)
    assert [(s.session_id, s.state) for s in page] == [
        ("bad", pb.SESSION_STATE_BROKEN),
        ("good", pb.SESSION_STATE_READY),
    ]
    assert token == ""
