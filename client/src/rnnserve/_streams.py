"""The sync client's server streams: :class:`Stream` and the Train stream's
:class:`TrainStream` (re-exported by :mod:`rnnserve.client` and :mod:`rnnserve`)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import grpc

from rnnserve._retry import cut_off
from rnnserve._watch import Reconnects
from rnnserve.errors import RnnServeError, error_from_rpc
from rnnserve.v1 import rnn_service_pb2 as pb

__all__ = ["ReconnectingStream", "Stream", "TrainStream", "WatchStream"]

M = TypeVar("M")
T = TypeVar("T")


class Stream(Iterator[T], Generic[M, T]):
    """An iterator over a server stream that can be stopped early.

    Leaving a ``for`` loop over it (``break``, an exception), :meth:`cancel`, :meth:`close`
    or leaving a ``with`` block cancels the call on the server. After a cancel the iterator
    simply ends; errors from the server raise the matching :class:`RnnServeError`.
    """

    def __init__(self, call: grpc.CallIterator[M], convert: Callable[[M], Iterable[T]]) -> None:
        self._call = call
        self._responses: Iterator[M] = iter(call)
        self._convert = convert
        self._pending: deque[T] = deque()
        self._cancelled = False
        self._done = False

    def __next__(self) -> T:
        while not self._pending:
            if self._done:
                raise StopIteration
            try:
                message = next(self._responses)
            except StopIteration:
                if not self._cancelled and self._again(None):
                    continue
                self._done = True
                if not self._cancelled:
                    self._ended(None)
                raise
            except grpc.RpcError as e:
                if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                    self._done = True
                    raise StopIteration from None
                error = error_from_rpc(e)
                if self._again(error):
                    continue
                self._done = True
                self._ended(error)
                raise error from None
            self._observe(message)
            self._pending.extend(self._convert(message))
        return self._pending.popleft()

    def __iter__(self) -> Iterator[T]:
        # A fresh generator per loop: when the loop is left early the generator is closed,
        # and its finally-clause cancels the call even if the caller still holds the stream.
        def loop() -> Iterator[T]:
            try:
                while True:
                    try:
                        item = next(self)
                    except StopIteration:
                        return
                    yield item
            finally:
                if not self._done:
                    self.cancel()

        return loop()

    def _observe(self, message: M) -> None:
        """Hook for subclasses: sees every response message before it is converted."""

    def _again(self, error: RnnServeError | None) -> bool:
        """Hook for subclasses: the call ended with ``error`` (None: OK); True once a new call
        replaces it (the iteration goes on), False to end as the call did. May raise
        StopIteration to end quietly."""
        return False

    def _ended(self, error: RnnServeError | None) -> None:
        """Hook for subclasses: the server ended the stream, with ``error`` (None: OK); may
        raise an error of its own instead."""

    @property
    def done(self) -> bool:
        """True once the stream has ended, failed or been cancelled."""
        return self._done

    def cancel(self) -> None:
        """Cancel the call; safe to call from another thread and more than once."""
        if not self._done:
            self._cancelled = True
            self._call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it bare
            self._done = True

    def close(self) -> None:
        """Same as :meth:`cancel`."""
        self.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()


class TrainStream(Stream[pb.TrainResponse, pb.TrainResponse]):
    """The progress of a Train call: every TrainResponse, the last one with ``stop_reason`` set.

    ``last`` is the newest message received and ``final`` the closing one (``None`` until it
    arrives, and forever if the stream was cancelled). A call cut off before its final message
    (the connection or the replica failed) raises :class:`~rnnserve.errors.ConnectionLost`.
    """

    def __init__(self, call: grpc.CallIterator[pb.TrainResponse], request: pb.TrainRequest) -> None:
        super().__init__(call, lambda message: (message,))
        self.request = request
        self.last: pb.TrainResponse | None = None
        self.final: pb.TrainResponse | None = None

    def _observe(self, message: pb.TrainResponse) -> None:
        self.last = message
        if message.stop_reason != pb.STOP_REASON_UNSPECIFIED:
            self.final = message

    def _ended(self, error: RnnServeError | None) -> None:
        if self.final is None:
            raised = cut_off(error, self.request, self.last)
            if raised is not None and raised is not error:
                raise raised from None

    def wait(self) -> pb.TrainResponse:
        """Consume the rest of the stream and return the final message (or the last one seen)."""
        for _ in self:
            pass
        result = self.final or self.last
        if result is None:
            raise RnnServeError("the Train stream ended without any message")
        return result


class ReconnectingStream(Stream[M, T]):
    """A watch that opens its call again when it is cut off (:mod:`rnnserve._watch` decides
    when and from where); ``reconnects`` counts the times it did."""

    def __init__(
        self,
        start: Callable[[Any, float | None], grpc.CallIterator[M]],
        watch: Reconnects[M, T],
    ) -> None:
        self._start = start
        self._watch = watch
        self._wake = threading.Event()  # a cancel ends the wait before a reconnection
        super().__init__(self._open(), watch.deliver)
        self.rollbacks = watch.rollbacks

    def _open(self) -> grpc.CallIterator[M]:
        return self._start(self._watch.request(), self._watch.time_left())

    @property
    def reconnects(self) -> int:
        return self._watch.reconnects

    def _again(self, error: RnnServeError | None) -> bool:
        delay = self._watch.after(error)
        if delay is None:
            if self._watch.gone:
                self._done = True
                raise StopIteration
            return False
        if not self._wake.wait(delay):  # not cancelled meanwhile
            self._call = self._open()
            self._responses = iter(self._call)
        if self._cancelled:
            self._call.cancel()  # type: ignore[no-untyped-call]
            raise StopIteration
        return True

    def cancel(self) -> None:
        super().cancel()
        self._wake.set()


class WatchStream(ReconnectingStream[pb.WatchLossResponse, pb.LossPoint]):
    """The loss points of a WatchLoss call, reconnecting by itself. ``rollbacks`` lists the
    steps a cluster restored the session at after a replica failed (``restored_at_step``):
    the points that follow such a rollback repeat the steps after it."""
