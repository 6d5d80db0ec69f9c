"""What the benchmarks share: the corpus, the CPU's name, the in-process engine they are
measured against, and cluster replicas (started by the harness shipped with the server,
:mod:`rnnserve_server.testing`). Pinning BLAS threads is ``bench._blas``, imported first."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve_server.engine.model_config import ModelConfig
from rnnserve_server.engine.trainer import Trainer
from rnnserve_server.engine.vocab import Vocab
from rnnserve_server.testing import ServerHandle, start_server

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
# A short corpus for the cluster benchmarks' sessions.
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def load_text(chars: int = 200_000) -> str:
    """The start of tiny Shakespeare, or seeded random words if the file is missing."""
    if CORPUS.exists():
        return CORPUS.read_text(encoding="utf-8")[:chars]
    rng = np.random.default_rng(0)
    words = ["the", "king", "and", "queen", "of", "a", "to", "my", "lord", "thou", "art"]
    return " ".join(rng.choice(words, size=chars // 4))[:chars]


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def start_replica(
    directory: Path,
    redis_url: str,
    shared: Path,
    lease_ttl: float,
    checkpoint_interval: float = 0.5,
) -> ServerHandle:
    """A cluster replica on ``directory`` with one BLAS thread, logging only warnings (so its
    log costs it nothing per call)."""
    return start_server(
        directory,
        log_level="warning",
        redis_url=redis_url,
        shared_dir=shared,
        lease_ttl=lease_ttl,
        checkpoint_interval=checkpoint_interval,
        blas_threads=1,
    )


def config_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Client.create_session keyword arguments that pin every field of config."""
    return {
        "hidden_size": config.hidden_size,
        "seq_length": config.seq_length,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "optimizer": config.optimizer,
        "clip": config.clip,
        "seed": config.seed,
        "dtype": config.dtype,
        "reset_every": config.reset_every,
    }


def wait_idle(session: Any, timeout: float = 60.0) -> None:
    """Wait until a cancelled Train has stopped on the server (it stops between updates)."""
    deadline = time.monotonic() + timeout
    while session.info().state == pb.SESSION_STATE_TRAINING and time.monotonic() < deadline:
        time.sleep(0.01)


def trainer_for(config: ModelConfig, text: str) -> Trainer:
    """The engine on ``text`` in this process: the reference a service row is measured against."""
    vocab = Vocab.from_text(text)
    return Trainer(config, vocab, vocab.encode(text))


def local_parallel(trainers: list[Trainer], seconds: float) -> float:
    """Aggregate chars/s of the trainers stepping at once, one thread each, in this process."""
    stop = time.perf_counter() + seconds
    steps = [0] * len(trainers)

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            trainers[i].step()
            steps[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(trainers))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    config = trainers[0].config
    return sum(steps) * config.batch_size * config.seq_length / (time.perf_counter() - t0)
