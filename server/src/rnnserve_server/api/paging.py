"""ListSessions paging: ids in order, opaque page tokens (AIP-158)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

from rnnserve_server.errors import InvalidArgumentError

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_token_after(session_id: str) -> str:
    """The ListSessions page token of the page that starts after ``session_id``."""
    return base64.urlsafe_b64encode(("a:" + session_id).encode("ascii")).decode("ascii")


def page_ids(ids: Iterable[str], page_size: int, page_token: str) -> tuple[list[str], str]:
    """One page of ``ids`` in order: (ids, next_page_token)."""
    if page_size < 0:
        raise InvalidArgumentError(f"page_size must be >= 0 (0 means {DEFAULT_PAGE_SIZE})")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    after = ""
    if page_token:
        try:
            after = base64.urlsafe_b64decode(page_token.encode("ascii")).decode("ascii")
            if not after.startswith("a:"):
                raise ValueError(page_token)
            after = after[2:]
        except (ValueError, UnicodeError, binascii.Error):
            raise InvalidArgumentError(
                "page_token is not one this server issued; pass the previous response's "
                "next_page_token, or empty for the first page"
            ) from None
    chosen_all = sorted(i for i in ids if i > after)
    chosen = chosen_all[:size]
    token = page_token_after(chosen[-1]) if len(chosen_all) > size else ""
    return chosen, token
