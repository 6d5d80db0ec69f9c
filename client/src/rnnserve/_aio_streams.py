"""The asyncio client's server streams: :class:`Stream` and the Train stream's
:class:`TrainStream` (re-exported by :mod:`rnnserve.aio`)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
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


class Stream(AsyncIterator[T], Generic[M, T]):
    """An async iterator over a server stream that can be stopped early: :meth:`cancel`,
    leaving an ``async with`` block, or breaking out of ``async for`` and dropping it. After a
    cancel the iterator simply ends; errors from the server raise the matching
    :class:`~rnnserve.errors.RnnServeError`."""

    def __init__(self, call: Any, convert: Callable[[M], Iterable[T]]) -> None:
        self._call = call
        self._responses: AsyncIterator[M] = call.__aiter__()
        self._convert = convert
        self._pending: deque[T] = deque()
        self._cancelled = False
        self._done = False

    def __aiter__(self) -> Stream[M, T]:
        return self

    async def __anext__(self) -> T:
        while not self._pending:
            if self._done:
                raise StopAsyncIteration
            try:
                message = await self._responses.__anext__()
            except StopAsyncIteration:
                if not self._cancelled and await self._again(None):
                    continue
                self._done = True
                if not self._cancelled:
                    self._ended(None)
                raise
            except asyncio.CancelledError:
                if not self._cancelled:
                    raise
                self._done = True
                raise StopAsyncIteration from None
            except grpc.RpcError as e:
                if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                    self._done = True
                    raise StopAsyncIteration from None
                error = error_from_rpc(e)
                if await self._again(error):
                    continue
                self._done = True
                self._ended(error)
                raise error from None
            self._observe(message)
            self._pending.extend(self._convert(message))
        return self._pending.popleft()

    def _observe(self, message: M) -> None:
        """Hook for subclasses: sees every response message before it is converted."""

    async def _again(self, error: RnnServeError | None) -> bool:
        """Hook for subclasses: the call ended with ``error`` (None: OK); True once a new call
        replaces it (the iteration goes on), False to end as the call did. May raise
        StopAsyncIteration to end quietly."""
        return False

    def _ended(self, error: RnnServeError | None) -> None:
        """Hook for subclasses: the server ended the stream, with ``error`` (None: OK); may
        raise an error of its own instead."""

    @property
    def done(self) -> bool:
        """True once the stream has ended, failed or been cancelled."""
        return self._done

    def cancel(self) -> None:
        """Cancel the call; safe to call more than once."""
        if not self._done:
            self._cancelled = True
            self._call.cancel()
            self._done = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()


class TrainStream(Stream[pb.TrainResponse, pb.TrainResponse]):
    """The progress of a Train call; ``last`` and ``final`` as in the sync
    :class:`rnnserve.TrainStream`."""

    def __init__(self, call: Any, request: pb.TrainRequest) -> None:
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

    async def wait(self) -> pb.TrainResponse:
        """Consume the rest of the stream and return the final message (or the last one seen)."""
        async for _ in self:
            pass
        result = self.final or self.last
        if result is None:
            raise RnnServeError("the Train stream ended without any message")
        return result


class ReconnectingStream(Stream[M, T]):
    """A watch that opens its call again when it is cut off; see
    :class:`rnnserve._streams.ReconnectingStream`."""

    def __init__(
        self,
        start: Callable[[Any, float | None], Any],
        watch: Reconnects[M, T],
    ) -> None:
        self._start = start
        self._watch = watch
        super().__init__(self._open(), watch.deliver)
        self.rollbacks = watch.rollbacks

    def _open(self) -> Any:
        return self._start(self._watch.request(), self._watch.time_left())

    @property
    def reconnects(self) -> int:
        return self._watch.reconnects

    async def _again(self, error: RnnServeError | None) -> bool:
        delay = self._watch.after(error)
        if delay is None:
            if self._watch.gone:
                self._done = True
                raise StopAsyncIteration
            return False
        await asyncio.sleep(delay)
        if self._cancelled:
            raise StopAsyncIteration
        self._call = self._open()
        self._responses = self._call.__aiter__()
        return True


class WatchStream(ReconnectingStream[pb.WatchLossResponse, pb.LossPoint]):
    """The loss points of a WatchLoss call, reconnecting by itself; ``rollbacks`` as in the
    sync :class:`rnnserve.WatchStream`."""
