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
from rnnserve_server.testing import PrometheusProcess, daemons, start_prometheus

__all__ = ["PrometheusFactory", "PrometheusProcess"]

PrometheusFactory = Callable[[list[str], list[Path]], PrometheusProcess]


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[PrometheusFactory]:
    """Start prometheus instances scraping given targets; all stopped at the end."""
    with daemons(tmp_path, "prometheus", start_prometheus) as factory:
        yield factory
