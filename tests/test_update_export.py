"""UpdateSession, ExportSession / ImportSession and ForkSession against a real server, and
an exported archive read with plain numpy (no rnnserve code) reproducing Predict's loss."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from rnnserve import Client, InvalidArgument, SessionExists
from rnnserve.v1 import rnn_service_pb2 as pb

from tests.cli_runner import rnnserve

if TYPE_CHECKING:
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(90)

TEXT = "The quick brown fox jumps over the lazy dog. " * 40
# The tanh RNN: its arrays are the ones docs/client.md's plain-numpy recipe reads.
SMALL: dict[str, Any] = {
    "cell": "rnn",
    "num_layers": 1,
    "hidden_size": 16,
    "seq_length": 10,
    "batch_size": 4,
    "seed": 3,
}


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds (a state change we cannot be notified of)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def client(module_server: ServerHandle) -> Iterator[Client]:
    with module_server.client(timeout=20) as c:
        yield c


def load_archive(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """docs/client.md's recipe: plain numpy, no pickles."""
    import io

    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode("utf-8"))
        return meta, {name: z[name] for name in z.files}


# ----- UpdateSession ----------------------------------------------------------------------


def test_update_learning_rate_keeps_optimizer_state_and_survives_restart(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    with server.client(timeout=20) as c:
        session = c.create_session(TEXT, session_id="u", learning_rate=3e-3, **SMALL)
        session.train(20, report_every=20).wait()
        _, before = load_archive(session.export())
        info = session.update(learning_rate=1e-4, clip=2.0, reset_every=3)
        assert info.config.learning_rate == pytest.approx(1e-4)
        assert info.config.clip == pytest.approx(2.0) and info.config.reset_every == 3
        assert info.step == 20
        _, after = load_archive(session.export())
        # A new learning rate keeps Adam's moments (and, of course, the weights).
        np.testing.assert_array_equal(before["trainer.optim.m"], after["trainer.optim.m"])
        np.testing.assert_array_equal(before["trainer.Whh"], after["trainer.Whh"])
        assert session.step().step == 21  # trains with the new settings
    assert server.stop() == 0
    again = server_factory(data_dir=server.data_dir)
    with again.client(timeout=20) as c:
        config = c.session("u").info().config
        assert config.learning_rate == pytest.approx(1e-4)
        assert config.clip == pytest.approx(2.0) and config.reset_every == 3


def test_update_optimizer_starts_fresh_state(client: Client) -> None:
    session = client.create_session(TEXT, **SMALL)
    session.train(10, report_every=10).wait()
    info = session.update(optimizer="adagrad", learning_rate=0.05)
    assert info.config.optimizer == pb.OPTIMIZER_ADAGRAD
    _, arrays = load_archive(session.export())
    assert "trainer.optim.m" not in arrays
    assert not arrays["trainer.optim.mem"].any()  # fresh: no squared gradients yet
    session.step()
    _, arrays = load_archive(session.export())
    assert arrays["trainer.optim.mem"].any()


def test_update_refuses_fixed_fields_and_while_training(client: Client) -> None:
    session = client.create_session(TEXT, **SMALL)
    stub = client._stub
    request = pb.UpdateSessionRequest(
        session=pb.Session(session_id=session.id, config=pb.SessionConfig(hidden_size=32))
    )
    request.update_mask.paths.append("config.hidden_size")
    with pytest.raises(grpc.RpcError) as info:
        stub.UpdateSession(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fork" in (info.value.details() or "")
    with pytest.raises(InvalidArgument, match="positive"):
        session.update(learning_rate=-1.0)
    # A Train is an attached training job: the mutable settings change between two chunks
    # (docs/training-jobs.md, "Every call while a job runs").
    stream = session.train(1_000_000, report_every=1)
    next(stream)
    try:
        wait_for(lambda: session.info().state == pb.SESSION_STATE_TRAINING)
        assert session.update(learning_rate=1e-3).config.learning_rate == pytest.approx(1e-3)
        assert session.info().state == pb.SESSION_STATE_TRAINING
    finally:
        stream.cancel()
    wait_for(lambda: session.info().state == pb.SESSION_STATE_READY)
    assert session.update(learning_rate=2e-3).config.learning_rate == pytest.approx(2e-3)


def test_cli_set(module_server: ServerHandle, client: Client) -> None:
    client.create_session(TEXT, session_id="cli-set", **SMALL)
    result = rnnserve(module_server, "set", "cli-set", "--learning-rate", "1e-3", "--clip", "1")
    assert result.returncode == 0, result.stderr
    assert "learning_rate=0.001" in result.stdout and "clip=1 " in result.stdout
    assert client.session("cli-set").info().config.learning_rate == pytest.approx(1e-3)
    assert rnnserve(module_server, "set", "cli-set").returncode == 2


# ----- Export / Import / Fork -------------------------------------------------------------


def numpy_predict_loss(meta: dict[str, Any], arrays: dict[str, np.ndarray], text: str) -> float:
    """Predict's loss with plain numpy: tanh RNN from a zero state, wrap-around targets."""
    alphabet = meta["trainer"]["alphabet"]
    ids = [alphabet.index(ch) for ch in text]
    Wxh, Whh, Why = arrays["trainer.Wxh"], arrays["trainer.Whh"], arrays["trainer.Why"]
    bh, by = arrays["trainer.bh"], arrays["trainer.by"]
    h = np.zeros(Whh.shape[0])
    nats = 0.0
    for t, x in enumerate(ids):
        h = np.tanh(Wxh[:, x] + Whh @ h + bh)
        y = Why @ h + by
        target = ids[(t + 1) % len(ids)]
        nats += float(np.log(np.exp(y - y.max()).sum()) - (y[target] - y.max()))
    return nats / len(ids)


GUIDE = Path(__file__).resolve().parent.parent / "docs" / "client.md"


def guide_numpy_block() -> str:
    """docs/client.md's Python block that loads an archive with plain numpy."""
    blocks = GUIDE.read_text(encoding="utf-8").split("```python\n")[1:]
    found = [b.split("```")[0] for b in blocks if 'np.load("tanh.rnn"' in b]
    assert len(found) == 1, "docs/client.md shows one plain-numpy loading block"
    return found[0]


def test_the_guides_numpy_recipe_reproduces_predict(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = client.create_session(TEXT, **SMALL)
    session.train(40, report_every=40).wait()
    session.export(tmp_path / "tanh.rnn")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(guide_numpy_block(), namespace)  # exactly what docs/client.md shows
    text = TEXT[:150]
    assert namespace["loss"](text) == pytest.approx(session.predict(text).loss, rel=1e-4)


def test_exported_weights_reproduce_predict_with_plain_numpy(
    client: Client, tmp_path: Path
) -> None:
    session = client.create_session(TEXT, validation_fraction=0.1, **SMALL)
    session.train(50, report_every=25).wait()
    path = tmp_path / "model.rnn"
    session.export(path)
    meta, arrays = load_archive(path.read_bytes())
    assert meta["format"] == "rnnserve.archive" and meta["version"] == 1
    assert meta["step"] == 50 and arrays["loss_history"].shape == (50,)
    assert meta["trainer"]["config"]["hidden_size"] == 16
    assert [s for s, _ in meta["validation"]] == [25, 50]
    text = TEXT[:200]
    expected = session.predict(text).loss
    assert numpy_predict_loss(meta, arrays, text) == pytest.approx(expected, rel=1e-4)
    alphabet = meta["trainer"]["alphabet"]
    assert "".join(alphabet[i] for i in arrays["corpus"]) == TEXT


def test_import_reproduces_the_session(client: Client) -> None:
    original = client.create_session(TEXT, validation_fraction=0.1, **SMALL)
    original.train(30, report_every=10).wait()
    data = original.export()
    copy = client.import_session(data, original.id + "-copy")
    a, b = original.info(), copy.info()
    assert (b.step, b.loss, b.smoothed_loss, b.corpus_chars, b.alphabet) == (
        a.step,
        a.loss,
        a.smoothed_loss,
        a.corpus_chars,
        a.alphabet,
    )
    assert b.config == a.config and b.validation_loss == a.validation_loss
    assert copy.predict(TEXT[:100]).loss == original.predict(TEXT[:100]).loss
    assert copy.generate(60, seed=5) == original.generate(60, seed=5)
    # Resumes exactly: the next update is the same on both (optimizer state, cursors, hidden).
    assert copy.step().loss == original.step().loss
    with pytest.raises(SessionExists):
        client.import_session(data)  # the archive's own id is taken
    original.delete()
    restored = client.import_session(data)  # no id: the archive's
    assert restored.id == original.id and restored.info().step == 30


def test_fork_with_a_new_learning_rate_leaves_the_original(client: Client) -> None:
    original = client.create_session(TEXT, **SMALL)
    original.train(20, report_every=20).wait()
    fork = original.fork(original.id + "-f", learning_rate=1e-4)
    assert fork.info().config.learning_rate == pytest.approx(1e-4)
    assert fork.info().step == 20
    assert original.info().config.learning_rate == pytest.approx(3e-3)
    assert fork.predict(TEXT[:80]).loss == original.predict(TEXT[:80]).loss
    fork.train(10, report_every=10).wait()
    assert original.info().step == 20 and fork.info().step == 30
    with pytest.raises(SessionExists):
        original.fork(fork.id)


def test_fork_while_training_takes_a_consistent_copy(client: Client) -> None:
    original = client.create_session(TEXT, **SMALL)
    stream = original.train(1_000_000, report_every=1)
    next(stream)
    try:
        fork = original.fork(original.id + "-busy")
    finally:
        stream.cancel()
    info = fork.info()
    assert info.step >= 1 and info.state == pb.SESSION_STATE_READY
    fork.step()


def test_cli_export_import_fork(
    module_server: ServerHandle, client: Client, tmp_path: Path
) -> None:
    client.create_session(TEXT, session_id="cli-x", **SMALL).train(5, report_every=5).wait()
    path = tmp_path / "model.rnn"
    result = rnnserve(module_server, "export", "cli-x", "-o", str(path))
    assert result.returncode == 0, result.stderr
    assert path.stat().st_size > 0
    result = rnnserve(module_server, "import", str(path), "--id", "cli-y")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cli-y"
    assert client.session("cli-y").info().step == 5
    result = rnnserve(module_server, "fork", "cli-x", "cli-z", "--learning-rate", "1e-4")
    assert result.returncode == 0, result.stderr
    assert client.session("cli-z").info().config.learning_rate == pytest.approx(1e-4)
    result = rnnserve(module_server, "import", str(path))  # cli-x exists
    assert result.returncode == 4
    bad = tmp_path / "bad.rnn"
    bad.write_bytes(b"not an archive")
    result = rnnserve(module_server, "import", str(bad), "--id", "cli-bad")
    assert result.returncode == 6 and "not a valid rnnserve session archive" in result.stderr


def test_sigkill_right_after_update_import_and_fork_keeps_them(
    server_factory: ServerFactory,
) -> None:
    """Update, Import and Fork reply only once the result is on disk: a SIGKILL right after
    the replies loses none of them."""
    server = server_factory(checkpoint_interval=3600)
    with server.client(timeout=20) as c:
        original = c.create_session(TEXT, session_id="k", **SMALL)
        original.train(10, report_every=10).wait()
        data = original.export()
        c.import_session(data, "k-imported")
        original.fork("k-forked", clip=1.5)
        original.update(learning_rate=2e-4)
    server.kill()
    again = server_factory(data_dir=server.data_dir)
    with again.client(timeout=20) as c:
        assert c.session("k").info().config.learning_rate == pytest.approx(2e-4)
        imported = c.session("k-imported").info()
        assert imported.step == 10 and imported.checkpointed_step == 10
        forked = c.session("k-forked").info()
        assert forked.step == 10 and forked.config.clip == pytest.approx(1.5)
        assert (
            c.session("k-forked").predict(TEXT[:50]).loss == c.session("k").predict(TEXT[:50]).loss
        )
