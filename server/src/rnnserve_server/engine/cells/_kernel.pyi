"""Types of the C extension built from _kernel.c (the gated cells' per-step kernel)."""

from typing import final

import numpy as np

@final
class Layer:
    def forward(self, t: int, /) -> None: ...
    def backward(self, t: int, /) -> None: ...

def lstm(
    pre: np.ndarray,
    Z: np.ndarray,
    tcs: np.ndarray,
    hs: np.ndarray,
    rec: np.ndarray,
    dH: np.ndarray,
    carry: np.ndarray,
    dc: np.ndarray,
    dA: np.ndarray,
    /,
) -> Layer: ...
def gru(
    A: np.ndarray,
    ghn: np.ndarray,
    hs: np.ndarray,
    rec: np.ndarray,
    bn: np.ndarray,
    dH: np.ndarray,
    carry: np.ndarray,
    dGx: np.ndarray,
    /,
) -> Layer: ...
def scatter_sum(out: np.ndarray, ids: np.ndarray, rows: np.ndarray, /) -> None: ...
