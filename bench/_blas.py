"""Import first: one BLAS thread count for this process and the servers it starts.

``--blas-threads N`` on the command line (default 1, as the server; 0 leaves the library's
own) goes to OPENBLAS/OMP/MKL_NUM_THREADS as this module loads, before numpy does: numpy reads
them once, when it is first imported.
"""

from __future__ import annotations

import os
import sys


def _blas_threads_from_argv(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--blas-threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--blas-threads="):
            return arg.split("=", 1)[1]
    return "1"


BLAS_THREADS = _blas_threads_from_argv(sys.argv[1:])
if BLAS_THREADS != "0":
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = BLAS_THREADS
