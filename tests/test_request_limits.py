"""Issue 9 items 2 and 11: one request can't take unbounded memory or make a response gRPC
refuses to send.

- ListSessions caps a page by size as well as count (AIP-158 allows a smaller page): sessions
  with large alphabets no longer fail a large page with "Sent message larger than max".
- Step (text), Predict, Generate and Train estimate their working memory before allocating
  and answer RESOURCE_EXHAUSTED naming --max-request-bytes beyond it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tests.conftest import ServerFactory

# 3000 distinct three-byte characters: each session's alphabet is ~9 KB on the wire.
BIG_ALPHABET = "".join(chr(0x4E00 + i) for i in range(3000))


@pytest.mark.timeout(120)
def test_list_sessions_pages_are_capped_by_size(server_factory: ServerFactory) -> None:
    server = server_factory(max_message_bytes=65536)
    with server.client() as client:
        for i in range(12):
            client.create_session(BIG_ALPHABET, session_id=f"big-{i:02d}", hidden_size=4)
        ids = [s.session_id for s in client.list_sessions(page_size=1000)]
        assert ids == [f"big-{i:02d}" for i in range(12)]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RnnServiceStub(channel)
        first = stub.ListSessions(pb.ListSessionsRequest(page_size=1000), timeout=30)
        assert 0 < len(first.sessions) < 12 and first.next_page_token
        assert first.total_size == 12 and first.ByteSize() <= 65536
        rest = stub.ListSessions(
            pb.ListSessionsRequest(page_size=1000, page_token=first.next_page_token), timeout=30
        )
        got = [s.session_id for s in (*first.sessions, *rest.sessions)]
        assert got[: len(first.sessions) + len(rest.sessions)] == [
            f"big-{i:02d}" for i in range(len(got))
        ]
