"""The ``prometheus_factory`` fixture over :mod:`rnnserve_server.testing`: a real
``prometheus`` (Debian's package, installed by ``make deps``) on a free loopback port.

``prometheus_factory(targets, rule_files)`` starts a :class:`PrometheusProcess` scraping the
given ``host:port`` targets every second (job ``rnnserve``) and evaluating the rule files every
second, with its data in a temporary directory; it returns once ``/-/ready`` answers (a
condition with a deadline, never a sleep). Every instance is stopped at the end of the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rnnserve_server.testing import PrometheusProcess, start_prometheus

__all__ = ["PrometheusFactory", "PrometheusProcess"]

PrometheusFactory = Callable[[list[str], list[Path]], PrometheusProcess]


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[PrometheusFactory]:
    """Start prometheus instances scraping given targets; all stopped at the end."""
    started: list[PrometheusProcess] = []
    counter = iter(range(1_000_000))

    def factory(targets: list[str], rule_files: list[Path]) -> PrometheusProcess:
        handle = start_prometheus(tmp_path / f"prometheus{next(counter)}", targets, rule_files)
        started.append(handle)
        return handle

    yield factory
    for handle in started:
        if handle.alive:
            handle.stop()
        handle.kill()
