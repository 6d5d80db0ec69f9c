"""Gated cells (LSTM, GRU) and stacked layers with dropout: the math for every model except
the seed's one-layer tanh RNN (which is ../rnn/'s).

Row-vector form (a batch of B strands is a (B, H) matrix). Layer li of L maps its input x_t
(a one-hot id for layer 0, the layer below's output for the others) and its state to h_t::

    a_t = x_t Wx + b + h_{t-1} Wh                           (B, G*H), G gates
    rnn:  h_t = tanh(a_t)
    lstm: [g, i, f, o] = [tanh, sigmoid, sigmoid, sigmoid](a_t)
          c_t = f * c_{t-1} + i * g          h_t = o * tanh(c_t)
    gru:  (PyTorch's form: one recurrent product per step)
          [r, z] = sigmoid(x_t Wx[:, :2H] + b[:2H] + h_{t-1} Wh[:, :2H])
          n = tanh(x_t Wx[:, 2H:] + b[2H:] + r * (h_{t-1} Wh[:, 2H:] + bn))
          h_t = (1 - z) * n + z * h_{t-1}
    y_t = h_t^{L-1} Wy + by                                 p_t = softmax(y_t)

Dropout (training only) multiplies each layer's output by a mask m / (1 - dropout) before it
feeds the layer above; never the top layer's output (as torch.nn.LSTM does).

Shapes (V vocabulary, H hidden, G gates: rnn 1, lstm 4, gru 3)::

    Wx0 (V, G*H)   Wx{li>0} (H, G*H)   Wh{li} (H, G*H)   b{li} (G*H,)   bn{li} (H,) gru only
    Wy (H, V)      by (V,)

The carried state of a strand is one row of S = L * H (rnn, gru) or L * 2H (lstm: h then c
per layer) numbers, so the trainer keeps a (B, S) array whatever the cell.

Two implementations: ``loss_and_grads`` (fast: buffers reused, every product that can span
the window is one matrix product, only the recurrence loops over t, the backward's per-step
work reduced to a few element-wise products of partials computed up front) and
``reference_loss_and_grads`` (short, one equation per line; tests hold the fast one to it).
The loss is the tanh RNN's: cross-entropy summed over the window, averaged over strands.
"""

from __future__ import annotations

from .fast import loss_and_grads
from .inference import recurrence, score
from .reference import reference_loss_and_grads
from .spec import (
    CELLS,
    GATES,
    Spec,
    StackWorkspace,
    dropout_masks,
    init_stack,
    workspace_bytes,
)

__all__ = [
    "CELLS",
    "GATES",
    "Spec",
    "StackWorkspace",
    "dropout_masks",
    "init_stack",
    "loss_and_grads",
    "recurrence",
    "reference_loss_and_grads",
    "score",
    "workspace_bytes",
]
