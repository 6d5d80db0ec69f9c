"""The sync client's plumbing, below :class:`rnnserve.Client` and its :class:`Session`: the
channel and stubs, and the call wrappers that map gRPC errors to :mod:`rnnserve.errors`."""

from __future__ import annotations

from functools import cached_property
from typing import TypeVar

import grpc

from rnnserve._base import BaseClient, session_of
from rnnserve._requests import Upload
from rnnserve.errors import error_from_rpc
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class RpcClient(BaseClient[grpc.Channel]):
    """A sync channel to an rnnserve server and the calls made on it."""

    def _make_channel(self, *, generate: bool) -> grpc.Channel:
        options = self._channel_options(generate=generate)
        if self._credentials is None:
            return grpc.insecure_channel(self.address, options=options)
        return grpc.secure_channel(self.address, self._credentials, options=options)

    @cached_property
    def _stub(self) -> pb_grpc.RnnServiceStub:
        return pb_grpc.RnnServiceStub(self._channel)

    def _generate_method(
        self, seeded: bool
    ) -> grpc.UnaryStreamMultiCallable[pb.GenerateRequest, pb.GenerateResponse]:
        return pb_grpc.RnnServiceStub(self._generate_channel(seeded)).Generate

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        timeout: float | None,
    ) -> Resp:
        try:
            return method(
                request,
                timeout=self._deadline(timeout),
                metadata=self._call_metadata(session_of(request)),
            )
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def _server_stream(
        self,
        method: grpc.UnaryStreamMultiCallable[Req, Resp],
        request: Req,
        timeout: float | None,
    ) -> grpc.CallIterator[Resp]:
        # The call starts lazily; errors surface when the stream is iterated.
        metadata = self._call_metadata(session_of(request))
        return method(request, timeout=timeout, metadata=metadata)

    def _client_stream(
        self,
        method: grpc.StreamUnaryMultiCallable[Req, Resp],
        upload: Upload[Req],
        timeout: float | None,
        session_id: str = "",
    ) -> Resp:
        try:
            return method(iter(upload), timeout=timeout, metadata=self._call_metadata(session_id))
        except grpc.RpcError as e:
            upload.reraise()
            raise error_from_rpc(e) from None

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()
        if self._seeded_channel is not None:
            self._seeded_channel.close()
