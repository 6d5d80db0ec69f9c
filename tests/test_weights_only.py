"""Weights-only archives (ExportSession ``weights_only``, ``rnnserve export --weights-only``)
against a real server: the archive holds the config, the alphabet and the weights and nothing
else; importing it makes a session at step 0 with no text that predicts and generates as the
original does, refuses to train on a corpus it does not have yet, and trains once text is
appended; it survives SIGKILLs; hostile weights-only archives are refused before anything is
written."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from rnnserve import Client, InvalidArgument, LimitExceeded, Session, aio

from tests.cli_runner import rnnserve

if TYPE_CHECKING:
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(120)

TEXT = "The quick brown fox jumps over the lazy dog. " * 30
PROBE = "the lazy brown fox jumps."
SMALL: dict[str, Any] = {
    "hidden_size": 16,
    "seq_length": 10,
    "batch_size": 4,
    "seed": 3,
    "learning_rate": 0.01,
}
MODELS = [("rnn", 1), ("lstm", 2), ("gru", 3)]


def load(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """An archive's meta and arrays, read with plain numpy."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode("utf-8"))
        return meta, {name: z[name] for name in z.files}


def save(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """An archive of these arrays, ``meta`` replacing theirs."""
    out = dict(arrays)
    out["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **out)  # type: ignore[arg-type]
    return buffer.getvalue()


def trained(client: Client, steps: int, **model: Any) -> Session:
    """A new session of SMALL's settings with ``model``'s, trained ``steps`` updates."""
    session = client.create_session(TEXT, **{**SMALL, **model})
    session.train(steps, report_every=steps).wait()
    return session


@pytest.fixture(scope="module")
def client(module_server: ServerHandle) -> Iterator[Client]:
    with module_server.client(timeout=30) as c:
        yield c


@pytest.mark.parametrize(("cell", "layers"), MODELS)
def test_a_weights_only_archive_holds_the_config_the_alphabet_and_the_weights(
    client: Client, cell: str, layers: int
) -> None:
    session = trained(client, 20, cell=cell, num_layers=layers)
    whole_data = session.export()
    whole_meta, whole = load(whole_data)
    data = session.export(weights_only=True)
    meta, arrays = load(data)

    trainer = whole_meta["trainer"]
    assert meta == {
        "format": "rnnserve.archive",
        "version": 2,
        "weights_only": True,
        "session_id": session.id,
        "trainer": {"config": trainer["config"], "alphabet": trainer["alphabet"]},
    }
    state = {"trainer.hidden", "trainer.cursors"}  # carried states and strand cursors
    weights = {
        name
        for name in whole
        if name.startswith("trainer.") and not name.startswith("trainer.optim.")
    } - state
    assert set(arrays) == {"meta"} | weights  # no corpus, loss history or optimizer state
    for name in weights:
        np.testing.assert_array_equal(arrays[name], whole[name])
        assert arrays[name].dtype == np.float32
    assert len(data) * 2 < len(whole_data)


@pytest.mark.parametrize(("cell", "layers"), MODELS)
def test_a_weights_only_import_predicts_generates_and_trains_on_appended_text(
    client: Client, cell: str, layers: int
) -> None:
    original = trained(client, 40, cell=cell, num_layers=layers)
    copy = client.import_session(original.export(weights_only=True), f"copy-{cell}-{layers}")

    info = copy.info()
    assert (info.step, info.corpus_chars) == (0, 0)
    assert info.config == original.info().config
    predicted, again = original.predict(PROBE), copy.predict(PROBE)
    assert (again.loss, again.predicted) == (predicted.loss, predicted.predicted)
    samplings: list[dict[str, Any]] = [{"temperature": 0.0}, {"temperature": 0.8, "seed": 5}]
    for sampling in samplings:
        assert copy.generate(60, prime="The", **sampling) == original.generate(
            60, prime="The", **sampling
        )

    # No text yet: a corpus step, a Train and an unprimed Generate say what to do.
    with pytest.raises(InvalidArgument, match=r"has 0 character.*AppendText"):
        copy.step()
    with pytest.raises(InvalidArgument, match=r"has 0 character.*AppendText"):
        copy.train(5, report_every=5).wait()
    with pytest.raises(InvalidArgument, match=r"prime is empty.*give a prime"):
        copy.generate(10)
    assert copy.step(text="the quick brown fox").step == 1  # text in the request: fine
    # A session without text exports whole, imports and forks like any other.
    whole = client.import_session(copy.export(), f"{copy.id}-whole")
    forked = copy.fork(f"{copy.id}-fork")
    for other in (whole, forked):
        assert (other.info().step, other.info().corpus_chars) == (1, 0)
        assert other.predict(PROBE) == copy.predict(PROBE)

    copy.append_text(TEXT)
    assert copy.step().step == 2
    assert copy.train(5, report_every=5).wait().step == 7
    assert len(copy.generate(10)) == 10  # starts from the text's first character now
    assert original.info().step == 40  # the original is untouched


def test_a_weights_only_import_and_its_first_text_survive_sigkill(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    with server.client(timeout=30) as c:
        original = trained(c, 20, cell="lstm", num_layers=2)
        c.import_session(original.export(weights_only=True), "w")
        expected = c.session("w").predict(PROBE).loss
    server.kill()  # SIGKILL: the import was on disk before its reply

    again = server_factory(data_dir=server.data_dir)
    with again.client(timeout=30) as c:
        session = c.session("w")
        assert (session.info().step, session.info().corpus_chars) == (0, 0)
        assert session.predict(PROBE).loss == expected
        session.append_text(TEXT)  # acknowledged once on disk
    again.kill()

    third = server_factory(data_dir=server.data_dir)
    with third.client(timeout=30) as c:
        info = c.session("w").info()
        assert (info.step, info.corpus_chars) == (0, len(TEXT))
        assert c.session("w").predict(PROBE).loss == expected
        assert c.session("w").step().step == 1


async def test_the_asyncio_client_exports_weights_only(
    module_server: ServerHandle, client: Client, tmp_path: Path
) -> None:
    session = trained(client, 10, cell="gru", num_layers=2)
    async with aio.Client(module_server.address) as aio_client:
        data = await aio_client.session(session.id).export(tmp_path / "w.rnn", weights_only=True)
    assert data == session.export(weights_only=True) == (tmp_path / "w.rnn").read_bytes()
    assert load(data)[0]["weights_only"] is True


# ----- hostile weights-only archives ----------------------------------------------------------

Edit = Callable[[dict[str, Any], dict[str, np.ndarray]], None]


def _drop(name: str) -> Edit:
    return lambda meta, arrays: arrays.__delitem__(name)


def _set(name: str, value: np.ndarray) -> Edit:
    return lambda meta, arrays: arrays.__setitem__(name, value)


def _meta(**changes: Any) -> Edit:
    return lambda meta, arrays: meta.update(changes)


def _trainer(**changes: Any) -> Edit:
    return lambda meta, arrays: meta["trainer"].update(changes)


def _config(**changes: Any) -> Edit:
    return lambda meta, arrays: meta["trainer"]["config"].update(changes)


# (what, edit, the error, a phrase of its message); the base is a 2-layer GRU, hidden 16.
HOSTILE: list[tuple[str, Edit, type[Exception], str]] = [
    ("missing weight", _drop("trainer.Wy"), InvalidArgument, "'trainer.Wy' of its 2-layer gru"),
    (
        "extra entry",
        _set("corpus", np.zeros(5, np.int32)),
        InvalidArgument,
        "'corpus' is not a weight",
    ),
    (
        "optimizer state",
        _set("trainer.optim.m", np.zeros(5, np.float32)),
        InvalidArgument,
        "'trainer.optim.m' is not a weight",
    ),
    (
        "wrong shape",
        _set("trainer.Wh1", np.zeros((16, 16), np.float32)),
        InvalidArgument,
        "'trainer.Wh1' is float32(16, 16), its config needs float32(16, 48)",
    ),
    (
        "wrong dtype",
        _set("trainer.bn0", np.zeros(16, np.float64)),
        InvalidArgument,
        "'trainer.bn0' is float64(16,)",
    ),
    (
        "NaN weight",
        _set("trainer.b1", np.full(48, np.nan, np.float32)),
        InvalidArgument,
        "'b1' holds NaN",
    ),
    ("session key", _meta(step=3), InvalidArgument, "'step', which a weights-only archive"),
    ("trainer key", _trainer(optim={}), InvalidArgument, "'optim', which a weights-only"),
    ("in version 1", _meta(version=1), InvalidArgument, "'weights_only', which version 1"),
    ("not a bool", _meta(weights_only="yes"), InvalidArgument, "weights_only is not true"),
    ("bad alphabet", _trainer(alphabet="aab"), InvalidArgument, "alphabet"),
    ("bad config", _config(cell="tanh"), InvalidArgument, "cell"),
    ("over a limit", _config(hidden_size=5000), LimitExceeded, "hidden_size"),
]


@pytest.fixture(scope="module")
def base_archive(client: Client) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    session = client.create_session(TEXT, cell="gru", num_layers=2, **SMALL)
    return load(session.export(weights_only=True))


@pytest.mark.parametrize(
    ("edit", "error", "phrase"), [case[1:] for case in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_a_hostile_weights_only_archive_is_refused_before_anything_is_written(
    client: Client,
    base_archive: tuple[dict[str, Any], dict[str, np.ndarray]],
    edit: Edit,
    error: type[Exception],
    phrase: str,
) -> None:
    meta, arrays = json.loads(json.dumps(base_archive[0])), dict(base_archive[1])
    arrays.pop("meta")
    edit(meta, arrays)
    before = {s.session_id for s in client.list_sessions()}
    with pytest.raises(error) as refused:
        client.import_session(save(meta, arrays), "hostile")
    assert phrase in str(refused.value)
    assert {s.session_id for s in client.list_sessions()} == before
    assert client.health()  # still serving


# ----- the CLI --------------------------------------------------------------------------------


def test_cli_export_weights_only_then_import(
    module_server: ServerHandle, client: Client, tmp_path: Path
) -> None:
    client.create_session(TEXT, session_id="cli-w", cell="gru", num_layers=2, **SMALL)
    path = tmp_path / "weights.rnn"
    result = rnnserve(module_server, "export", "cli-w", "-o", str(path), "--weights-only")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"exported the weights of cli-w to {path} (")
    meta, arrays = load(path.read_bytes())
    assert meta["weights_only"] is True and "corpus" not in arrays

    result = rnnserve(module_server, "import", str(path), "--id", "cli-w2")
    assert result.returncode == 0, result.stderr
    assert client.session("cli-w2").info().corpus_chars == 0
    assert client.session("cli-w2").predict(PROBE) == client.session("cli-w").predict(PROBE)
    result = rnnserve(module_server, "step", "cli-w2")
    assert result.returncode == 6  # invalid argument
    assert "AppendText" in result.stderr
