"""The use-case layer (session_service.py) works with no transport: it imports no gRPC, and a
session can be created, stepped, trained, watched, sampled and deleted through it directly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rnnserve_server.config import Settings
from rnnserve_server.engine.model_config import PRESETS
from rnnserve_server.errors import InvalidArgumentError, SessionNotFoundError
from rnnserve_server.sessions.registry import Registry
from rnnserve_server.storage.local_store import LocalStore
from rnnserve_server.usecases.request_limits import RequestLimits
from rnnserve_server.usecases.session_service import GenerateOptions, SessionService, TrainingPlan

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


def test_the_use_case_layer_imports_no_grpc() -> None:
    code = (
        "import sys, rnnserve_server.usecases.session_service\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'rnnserve'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_a_session_lives_its_whole_life_without_a_server(tmp_path: Path) -> None:
    settings = Settings()
    registry = Registry(settings, LocalStore(tmp_path))
    await registry.start()
    service = SessionService(settings, registry)
    try:
        config = PRESETS["default"].replace(hidden_size=16, seq_length=8, batch_size=2, seed=1)
        session = await service.create("s1", config, TEXT, "")
        assert session.id == "s1" and session.checkpoint.step == 0
        assert (await service.step("s1")).step == 1
        reports = [p async for p in service.train("s1", TrainingPlan(steps=20, report_every=10))]
        assert [p.steps_done for p in reports] == [10, 20]
        assert reports[-1].stop_reason == "completed" and reports[-1].step == 21
        assert reports[-1].checkpointed_step == 21  # flushed before the final report
        options = GenerateOptions(length=50, prime="the", seed=3)
        text = "".join([t async for t in service.generate("s1", options)])
        assert len(text) == 50 and set(text) <= set(TEXT)
        predicted, loss = await service.predict("s1", "the fox")
        assert len(predicted) == 7 and loss > 0
        sessions, next_after, total = service.list(10, "")
        assert [s.id for s in sessions] == ["s1"] and next_after == "" and total == 1
        watch = service.watch("s1", 1)
        history = await anext(watch)
        await watch.aclose()
        assert [step for step, _, _ in history] == list(range(1, 22))
        await service.delete("s1")
        with pytest.raises(SessionNotFoundError):
            service.get("s1")
    finally:
        registry.begin_shutdown()
        await registry.close()


def test_a_training_plan_is_plain_values_checked_before_any_session() -> None:
    """The plan a Train runs round-trips through JSON (a training job's spec), and a plan no
    session could run is refused by ``check`` alone, naming the field."""
    plan = TrainingPlan(
        until_step=500,
        until_loss=1.5,
        patience=3,
        eval_every=50,
        report_every=25,
        sample_length=40,
        sample_temperature=0.8,
        sample_prime="the ",
    )
    assert TrainingPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    limits = RequestLimits(Settings())
    plan.check(limits)
    with pytest.raises(InvalidArgumentError, match="give steps or until_step, not both"):
        TrainingPlan(steps=10, until_step=20).check(limits)
    with pytest.raises(InvalidArgumentError, match=r"^until_loss must be a finite number"):
        TrainingPlan(steps=10, until_loss=float("nan")).check(limits)
