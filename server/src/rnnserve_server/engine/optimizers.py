"""Update rules over one flat parameter vector: SGD (the seed's), Adagrad (min-char-rnn's), Adam.

All parameters live in one contiguous vector ``theta`` (the model's tensors are views into
it), so an update is a handful of whole-vector operations however many tensors there are.

An update is two-phase so that a non-finite result can be refused without touching anything:
``propose(theta, grad, out)`` writes the new parameters to ``out`` and stages the new optimizer
state; ``commit()`` makes the staged state current. Skipping ``commit`` discards the update.

The staged state and the scratch of ``propose`` exist only between a ``propose`` and the next
``release_scratch()``: an idle optimizer holds just its state (none for SGD, ``mem`` for Adagrad,
``m`` and ``v`` for Adam), which matters with thousands of resident sessions.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

__all__ = ["OPTIMIZERS", "SGD", "Adagrad", "Adam", "Optimizer", "make_optimizer"]

OPTIMIZERS = ("sgd", "adagrad", "adam")


class Optimizer(Protocol):
    """What the trainer needs from an update rule."""

    name: str
    learning_rate: float

    def propose(self, theta: np.ndarray, grad: np.ndarray, out: np.ndarray) -> None:
        """Write the updated parameters to ``out`` (same shape as ``theta``); stage new state.

        ``grad`` may be used as scratch space (its contents are undefined afterwards).
        """
        ...

    def set_learning_rate(self, learning_rate: float) -> None:
        """Use ``learning_rate`` from the next update on (a job's schedule); state is kept."""
        ...

    def commit(self) -> None:
        """Make the state staged by the last ``propose`` current."""
        ...

    def release_scratch(self) -> None:
        """Free the staging and scratch buffers; the next ``propose`` allocates them again."""
        ...

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The optimizer's state as named arrays (copies), for checkpoints."""
        ...

    def state_meta(self) -> dict[str, int]:
        """The optimizer's scalar state (JSON-able), for checkpoints."""
        ...

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, int]) -> None:
        """Restore what ``state_arrays`` / ``state_meta`` returned, exactly."""
        ...


class SGD:
    """``theta -= lr * g`` (the notebook's rule)."""

    name = "sgd"

    def __init__(self, size: int, learning_rate: float, dtype: np.dtype) -> None:
        self.learning_rate = learning_rate
        self._lr = dtype.type(learning_rate)

    def set_learning_rate(self, learning_rate: float) -> None:
        self.learning_rate = learning_rate
        self._lr = self._lr.dtype.type(learning_rate)

    def propose(self, theta: np.ndarray, grad: np.ndarray, out: np.ndarray) -> None:
        np.multiply(grad, self._lr, out=grad)
        np.subtract(theta, grad, out=out)

    def commit(self) -> None:
        pass

    def release_scratch(self) -> None:
        pass

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def state_meta(self) -> dict[str, int]:
        return {}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, int]) -> None:
        pass


class Adagrad:
    """``mem += g*g; theta -= lr * g / sqrt(mem + 1e-8)`` (min-char-rnn's rule)."""

    name = "adagrad"
    eps = 1e-8

    def __init__(self, size: int, learning_rate: float, dtype: np.dtype) -> None:
        self.learning_rate = learning_rate
        self._lr = dtype.type(learning_rate)
        self._eps = dtype.type(self.eps)
        self.mem = np.zeros(size, dtype=dtype)  # (P,) running sum of squared gradients
        self._staged: np.ndarray | None = None  # (P,) next ``mem``, from propose to commit
        self._tmp: np.ndarray | None = None  # (P,) scratch of propose

    def set_learning_rate(self, learning_rate: float) -> None:
        self.learning_rate = learning_rate
        self._lr = self._lr.dtype.type(learning_rate)

    def propose(self, theta: np.ndarray, grad: np.ndarray, out: np.ndarray) -> None:
        if self._staged is None or self._tmp is None:
            self._staged, self._tmp = np.empty_like(self.mem), np.empty_like(self.mem)
        staged, tmp = self._staged, self._tmp
        np.multiply(grad, grad, out=tmp)
        np.add(self.mem, tmp, out=staged)
        np.add(staged, self._eps, out=tmp)
        np.sqrt(tmp, out=tmp)
        np.divide(grad, tmp, out=tmp)
        tmp *= self._lr
        np.subtract(theta, tmp, out=out)

    def commit(self) -> None:
        if self._staged is not None:  # the old ``mem`` becomes the next staging buffer
            self.mem, self._staged = self._staged, self.mem

    def release_scratch(self) -> None:
        self._staged = self._tmp = None

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"mem": self.mem.copy()}

    def state_meta(self) -> dict[str, int]:
        return {}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, int]) -> None:
        np.copyto(self.mem, arrays["mem"])


class Adam:
    """Adam (Kingma & Ba) with bias correction; beta1 0.9, beta2 0.999, eps 1e-8."""

    name = "adam"
    beta1 = 0.9
    beta2 = 0.999
    eps = 1e-8

    def __init__(self, size: int, learning_rate: float, dtype: np.dtype) -> None:
        self.learning_rate = learning_rate
        self._dtype = dtype
        self.t = 0  # updates committed
        self.m = np.zeros(size, dtype=dtype)  # (P,) first moment
        self.v = np.zeros(size, dtype=dtype)  # (P,) second moment
        # Staged m and v (from propose to commit) and propose's scratch; see release_scratch.
        self._m_next: np.ndarray | None = None  # (P,)
        self._v_next: np.ndarray | None = None  # (P,)
        self._tmp: np.ndarray | None = None  # (P,)

    def set_learning_rate(self, learning_rate: float) -> None:
        self.learning_rate = learning_rate

    def propose(self, theta: np.ndarray, grad: np.ndarray, out: np.ndarray) -> None:
        if self._m_next is None or self._v_next is None or self._tmp is None:
            self._m_next, self._v_next = np.empty_like(self.m), np.empty_like(self.v)
            self._tmp = np.empty_like(self.m)
        m_next, v_next, tmp = self._m_next, self._v_next, self._tmp
        f = self._dtype.type
        t = self.t + 1
        b1, b2 = self.beta1, self.beta2
        # m' = b1 m + (1-b1) g ; v' = b2 v + (1-b2) g^2
        np.multiply(self.m, f(b1), out=m_next)
        np.multiply(grad, f(1.0 - b1), out=tmp)
        m_next += tmp
        np.multiply(grad, grad, out=tmp)
        tmp *= f(1.0 - b2)
        np.multiply(self.v, f(b2), out=v_next)
        v_next += tmp
        # theta' = theta - lr_t * m' / (sqrt(v') + eps_t), the paper's efficient form
        lr_t = self.learning_rate * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        eps_t = self.eps * math.sqrt(1.0 - b2**t)
        np.sqrt(v_next, out=tmp)
        tmp += f(eps_t)
        np.divide(m_next, tmp, out=tmp)
        tmp *= f(lr_t)
        np.subtract(theta, tmp, out=out)

    def commit(self) -> None:
        if self._m_next is None or self._v_next is None:
            return  # nothing staged
        self.m, self._m_next = self._m_next, self.m  # the old state becomes the next staging
        self.v, self._v_next = self._v_next, self.v
        self.t += 1

    def release_scratch(self) -> None:
        self._m_next = self._v_next = self._tmp = None

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"m": self.m.copy(), "v": self.v.copy()}

    def state_meta(self) -> dict[str, int]:
        return {"t": self.t}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, int]) -> None:
        np.copyto(self.m, arrays["m"])
        np.copyto(self.v, arrays["v"])
        self.t = int(meta["t"])


def make_optimizer(name: str, size: int, learning_rate: float, dtype: np.dtype) -> Optimizer:
    """The update rule called ``name`` for a parameter vector of ``size`` entries.

    ValueError for an unknown name.
    """
    if name == "sgd":
        return SGD(size, learning_rate, dtype)
    if name == "adagrad":
        return Adagrad(size, learning_rate, dtype)
    if name == "adam":
        return Adam(size, learning_rate, dtype)
    raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
