"""``rnnserve-server`` / ``python -m rnnserve_server``: parse settings, log, serve."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from rnnserve_server.config import apply_blas_threads, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 after a clean SIGTERM/SIGINT shutdown)."""
    settings = load_settings(argv)
    apply_blas_threads(settings)  # before anything imports numpy
    from rnnserve_server import logs
    from rnnserve_server.app import serve

    logs.configure(settings.log_format, settings.log_level)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
