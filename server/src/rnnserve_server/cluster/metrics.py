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
- ``rnnserve_cluster_redis_up``: 1 while Redis answers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from rnnserve_server.cluster.wiring import ClusterNode


class ClusterCollector(Collector):
    """Reads the node's counters at scrape time."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    def collect(self) -> Iterable[Metric]:
        node = self.node
        store = node.store
        yield GaugeMetricFamily(
            "rnnserve_cluster_owned_sessions",
            "Sessions whose lease this replica holds",
            value=len(node.ownership.owned()),
        )
        counters = [
            (
                "forwards",
                "Calls forwarded to the replica owning the session",
                node.forwarder.forwards,
            ),
            (
                "lease_renew_failures",
                "Lease renewals that failed (Redis unreachable)",
                node.ownership.renew_failures,
            ),
            (
                "leases_lost",
                "Leases that lapsed or were taken while held",
                node.ownership.leases_lost,
            ),
            ("activations", "Sessions loaded here from the shared directory", node.activations),
            (
                "failovers",
                "Activations that rolled back past a dead owner's last step",
                node.failovers,
            ),
            (
                "stale_writes",
                "Checkpoints refused because another replica owns the session",
                store.stale_writes if store is not None else 0,
            ),
            ("gc_sweeps", "Sweeps of the shared directory this replica ran", node.gc_sweeps),
            ("gc_removed", "Unreferenced checkpoint blobs the sweeps removed", node.gc_removed),
        ]
        for name, help_text, count in counters:
            yield CounterMetricFamily(f"rnnserve_cluster_{name}", help_text, value=count)
        health = node.health
        yield GaugeMetricFamily(
            "rnnserve_cluster_redis_up",
            "1 while Redis answers",
            value=1 if health is None or health.serving else 0,
        )
