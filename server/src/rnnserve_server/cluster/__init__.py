"""Cluster mode building blocks: a Redis coordinator (leases with fencing tokens, the session
directory, per-session loss streams, the fenced checkpoint pointer) and checkpoint storage on a
directory every replica shares.

``wiring.ClusterNode`` assembles them when the server is given ``--redis-url``; without it the
server is the single process it always was.
"""

from rnnserve_server.cluster.coordinator import Coordinator, Lease, StreamEvent
from rnnserve_server.cluster.lease_keeper import LeaseKeeper
from rnnserve_server.cluster.ownership import Ownership
from rnnserve_server.cluster.shared_store import (
    CheckpointMissingError,
    SharedStore,
    StaleTokenError,
)

__all__ = [
    "CheckpointMissingError",
    "Coordinator",
    "Lease",
    "LeaseKeeper",
    "Ownership",
    "SharedStore",
    "StaleTokenError",
    "StreamEvent",
]
