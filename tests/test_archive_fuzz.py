"""The import parser against corrupted archives, in-process: random byte flips and
truncations of a real archive, and every field of its metadata set to values of the wrong
type or range. Each must be refused with InvalidArgumentError / LimitExceededError (what the
servicer maps to INVALID_ARGUMENT / RESOURCE_EXHAUSTED) or give a session that works; never
another exception (which would be INTERNAL). Found real gaps: zipfile's CRC and header errors,
an Adam step count of -1 (a division by zero), counters too large for the wire."""

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
from rnnserve_server.api.servicer import session_to_pb
from rnnserve_server.config import Settings
from rnnserve_server.engine.model_config import DivergedError, ModelConfig
from rnnserve_server.engine.trainer import Trainer
from rnnserve_server.engine.vocab import Vocab
from rnnserve_server.errors import InvalidArgumentError, LimitExceededError
from rnnserve_server.sessions.registry import Registry
from rnnserve_server.sessions.session import Session
from rnnserve_server.storage import archive
from rnnserve_server.storage.store import LocalStore

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
    session_to_pb(session)
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


def test_every_metadata_field_with_wrong_values(registry: Registry, data: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    meta = json.loads(np.load(io.BytesIO(entries["meta.npy"])).tobytes())
    values: list[Any] = [None, "x", -1, 0, 1e308, -1e308, [], {}, True, 2**70, 1.5, ""]
    values += [[[1, 2]], [[1, "x"]], float("nan")]
    outcomes = []
    for path in list(_paths(meta)):
        for value in values:
            changed = copy.deepcopy(meta)
            node = changed
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            buffer = io.BytesIO()
            np.save(buffer, np.frombuffer(json.dumps(changed).encode(), dtype=np.uint8))
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w") as zf:
                for name, blob in {**entries, "meta.npy": buffer.getvalue()}.items():
                    zf.writestr(name, blob)
            outcomes.append(_outcome(registry, out.getvalue()))
    assert outcomes.count("refused") > 100
