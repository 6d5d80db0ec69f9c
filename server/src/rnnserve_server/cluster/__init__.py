"""Cluster mode building blocks: a Redis coordinator (leases with fencing tokens, the session
directory, per-session loss streams, the fenced checkpoint pointer) and checkpoint storage on a
directory every replica shares.

Nothing here is wired into the server yet: the single-process mode does not import it.
"""

from rnnserve_server.cluster.activation import Activation, activate
from rnnserve_server.cluster.coordinator import (
    Coordinator,
    Lease,
    LeaseKeeper,
    StreamEvent,
)
from rnnserve_server.cluster.ownership import Ownership
from rnnserve_server.cluster.shared_store import (
    CheckpointMissingError,
    SharedStore,
    StaleTokenError,
)

__all__ = [
    "Activation",
    "CheckpointMissingError",
    "Coordinator",
    "Lease",
    "LeaseKeeper",
    "Ownership",
    "SharedStore",
    "StaleTokenError",
    "StreamEvent",
    "activate",
]
