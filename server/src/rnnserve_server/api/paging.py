"""ListSessions paging at the edge: page sizes and opaque page tokens (AIP-158). A token names
the id the next page starts after; the use case pages by that id."""

from __future__ import annotations

import base64
import binascii

from rnnserve_server.errors import InvalidArgumentError

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_token_after(session_id: str) -> str:
    """The ListSessions page token of the page that starts after ``session_id``."""
    return base64.urlsafe_b64encode(("a:" + session_id).encode("ascii")).decode("ascii")


def read_page_request(page_size: int, page_token: str) -> tuple[int, str]:
    """A ListSessions request's (page size, id the page starts after; "" from the start);
    INVALID_ARGUMENT for a negative size or a token this server did not issue."""
    if page_size < 0:
        raise InvalidArgumentError(f"page_size must be >= 0 (0 means {DEFAULT_PAGE_SIZE})")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return size, ""
    try:
        after = base64.urlsafe_b64decode(page_token.encode("ascii")).decode("ascii")
        if not after.startswith("a:"):
            raise ValueError(page_token)
    except (ValueError, UnicodeError, binascii.Error):
        raise InvalidArgumentError(
            "page_token is not one this server issued; pass the previous response's "
            "next_page_token, or empty for the first page"
        ) from None
    return size, after[2:]
