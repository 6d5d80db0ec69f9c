"""The server's C extension; everything else about the package is in pyproject.toml.

The gated cells' per-step kernel (engine/cells/_kernel.c; fast.py falls back to numpy without
it). Here rather than in pyproject.toml's ext-modules table, which setuptools still calls
experimental (and warns about on every install).

Flags, measured (Trainer.step chars/s, LSTM 128/50/1 and 256/100/32): -O2, or -O3 without
-fno-trapping-math, leaves the loops scalar (GCC 12) and loses ~20 %, as slow as the numpy path;
-fno-trapping-math lets the tanh's select be vectorized (no branch); -fno-math-errno changed
nothing. No -march: the wheel runs on other CPUs (_kernel.c has an AVX2 clone picked at load
time: +7-10 %; an AVX-512 one added nothing).
"""

from setuptools import Extension, setup

CELLS = "src/rnnserve_server/engine/cells"

setup(
    ext_modules=[
        Extension(
            "rnnserve_server.engine.cells._kernel",
            sources=[f"{CELLS}/_kernel.c"],
            depends=[f"{CELLS}/_kernel_step.h"],
            extra_compile_args=["-O3", "-fno-trapping-math"],
        )
    ]
)
