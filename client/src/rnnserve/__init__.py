"""rnnserve: the client library for the rnnserve gRPC service.

    from rnnserve import Client

    with Client("localhost:50051") as client:
        session = client.create_session(open("input.txt").read())
        for progress in session.train(2000, report_every=200):
            print(progress.step, progress.loss)
        print(session.generate(200, seed=1))

Results are the generated messages of ``rnnserve.v1.rnn_service_pb2``; errors are the
subclasses of :class:`RnnServeError` in :mod:`rnnserve.errors`. :mod:`rnnserve.aio` has the
same client for asyncio.
"""

from importlib.metadata import PackageNotFoundError, version

from rnnserve.client import (
    DEFAULT_ADDRESS,
    Client,
    Job,
    JobStream,
    Session,
    Stream,
    TrainStream,
)
from rnnserve.errors import (
    ConnectionLost,
    InvalidArgument,
    JobNotFound,
    LimitExceeded,
    PermissionDenied,
    RnnServeError,
    ServerUnavailable,
    SessionBroken,
    SessionBusy,
    SessionExists,
    SessionNotFound,
    Timeout,
    TrainingDiverged,
    Unauthenticated,
)
from rnnserve.v1 import rnn_service_pb2 as pb

try:
    __version__ = version("rnnserve")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_ADDRESS",
    "Client",
    "ConnectionLost",
    "InvalidArgument",
    "Job",
    "JobNotFound",
    "JobStream",
    "LimitExceeded",
    "PermissionDenied",
    "RnnServeError",
    "ServerUnavailable",
    "Session",
    "SessionBroken",
    "SessionBusy",
    "SessionExists",
    "SessionNotFound",
    "Stream",
    "Timeout",
    "TrainStream",
    "TrainingDiverged",
    "Unauthenticated",
    "pb",
]
