"""Array helpers every model shares: parameters kept in one flat vector with named views, and
how long a stretch of text one forward pass reads at a time."""

from __future__ import annotations

import math

import numpy as np

EVAL_CHUNK = 2048  # time steps per forward chunk when scoring long texts (bounds memory)


def flat_size(shapes: dict[str, tuple[int, ...]]) -> int:
    """How many numbers tensors of these shapes hold in all."""
    return sum(math.prod(shape) for shape in shapes.values())


def split(flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Named views (no copy) of a flat vector, in ``shapes`` order."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].reshape(shape)
        offset += n
    return out
