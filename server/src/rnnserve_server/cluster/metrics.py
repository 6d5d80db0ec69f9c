"""Per-replica cluster metrics, served with the others at ``/metrics`` (--metrics-port):

- ``rnnserve_cluster_owned_sessions``: sessions whose lease this replica holds;
- ``rnnserve_cluster_forwards_total``: calls forwarded to another replica (the owner);
- ``rnnserve_cluster_lease_renew_failures_total``: lease renewals that failed (Redis
  unreachable); ``rnnserve_cluster_leases_lost_total``: leases that lapsed or were taken;
- ``rnnserve_cluster_activations_total``: sessions loaded here from the shared directory;
  ``rnnserve_cluster_failovers_total``: of those, restored from a checkpoint behind the last
  step watchers saw (the previous owner died);
- ``rnnserve_cluster_stale_writes_total``: checkpoints refused by the fenced pointer;
- ``rnnserve_cluster_gc_sweeps_total``: sweeps of the shared directory this replica ran
  (--gc-interval); ``rnnserve_cluster_gc_removed_total``: blobs they removed;
- ``rnnserve_cluster_jobs_claimed_total``: training jobs this replica took over (their replica
  died, drained or handed them off); ``rnnserve_cluster_jobs_handed_off_total``: jobs it
  handed to a replica with a free slot;
- ``rnnserve_cluster_redis_up``: 1 while Redis answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class ClusterCounts:
    """A replica's cluster counters at one scrape (ClusterNode.counts)."""

    owned_sessions: int
    forwards: int
    lease_renew_failures: int
    leases_lost: int
    activations: int
    failovers: int
    stale_writes: int
    gc_sweeps: int
    gc_removed: int
    redis_up: bool
    jobs_claimed: int = 0
    jobs_handed_off: int = 0


class ClusterCollector(Collector):
    """Reads the replica's counters at scrape time."""

    def __init__(self, counts: Callable[[], ClusterCounts]) -> None:
        self.counts = counts

    def collect(self) -> Iterable[Metric]:
        c = self.counts()
        yield GaugeMetricFamily(
            "rnnserve_cluster_owned_sessions",
            "Sessions whose lease this replica holds",
            value=c.owned_sessions,
        )
        counters = [
            ("forwards", "Calls forwarded to the replica owning the session", c.forwards),
            (
                "lease_renew_failures",
                "Lease renewals that failed (Redis unreachable)",
                c.lease_renew_failures,
            ),
            ("leases_lost", "Leases that lapsed or were taken while held", c.leases_lost),
            ("activations", "Sessions loaded here from the shared directory", c.activations),
            (
                "failovers",
                "Activations that rolled back past a dead owner's last step",
                c.failovers,
            ),
            (
                "stale_writes",
                "Checkpoints refused because another replica owns the session",
                c.stale_writes,
            ),
            ("gc_sweeps", "Sweeps of the shared directory this replica ran", c.gc_sweeps),
            ("gc_removed", "Unreferenced checkpoint blobs the sweeps removed", c.gc_removed),
            ("jobs_claimed", "Training jobs taken over from another replica", c.jobs_claimed),
            (
                "jobs_handed_off",
                "Training jobs handed to a replica with a free slot",
                c.jobs_handed_off,
            ),
        ]
        for name, help_text, count in counters:
            yield CounterMetricFamily(f"rnnserve_cluster_{name}", help_text, value=count)
        yield GaugeMetricFamily(
            "rnnserve_cluster_redis_up", "1 while Redis answers", value=1 if c.redis_up else 0
        )
