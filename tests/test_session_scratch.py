"""An idle session frees its trainer's update scratch and its loss history's spare capacity."""

from __future__ import annotations

from rnnserve_server.engine.model_config import ModelConfig
from rnnserve_server.engine.trainer import Trainer
from rnnserve_server.engine.vocab import Vocab
from rnnserve_server.sessions.session import SCRATCH_IDLE_SECONDS, Session

TEXT = "the quick brown fox jumps over the lazy dog. " * 8


def _session() -> Session:
    vocab = Vocab.from_text(TEXT)
    config = ModelConfig(
        hidden_size=16, seq_length=10, batch_size=2, learning_rate=0.01, optimizer="adam"
    )
    return Session.new("s", Trainer(config, vocab, vocab.encode(TEXT)))


def _has_scratch(session: Session) -> bool:
    trainer = session.trainer
    assert trainer is not None
    return trainer._grad is not None or trainer._ws is not None


def _step(session: Session) -> None:
    session.begin("Step")
    session.step_once(None)
    session.end()


def _fire(session: Session) -> None:
    """Run the pending idle timer's callback now (instead of waiting for it)."""
    timer = session._scratch_timer
    assert timer is not None, "end() arms the timer; a callback that keeps the scratch re-arms it"
    timer.cancel()
    session._release_when_idle()


async def test_scratch_is_kept_while_in_use_and_freed_once_idle() -> None:
    session = _session()
    for _ in range(3):
        _step(session)
    history = session.history(0, 10)
    assert _has_scratch(session) and len(history) == 3
    assert session.losses.capacity > 3  # grown by doubling

    _fire(session)  # used again within SCRATCH_IDLE_SECONDS: kept
    assert _has_scratch(session)

    session._idle_since -= SCRATCH_IDLE_SECONDS  # as if idle that long from here on
    session.begin("Train")  # in use: kept
    _fire(session)
    assert _has_scratch(session)
    session.end()
    session._idle_since -= SCRATCH_IDLE_SECONDS
    with session.lock:  # a worker holds the lock (e.g. a Predict): kept, without blocking
        _fire(session)
    assert _has_scratch(session)

    _fire(session)  # idle, lock free: freed
    assert not _has_scratch(session) and session._scratch_timer is None
    assert session.losses.capacity == 3 and (session.history(0, 10) == history).all()

    _step(session)  # allocates again; the history grows again
    assert _has_scratch(session) and session.step == 4 and len(session.history(0, 10)) == 4
    _fire(session)
    assert session._scratch_timer is not None  # re-armed: not idle long enough yet
    session._scratch_timer.cancel()
