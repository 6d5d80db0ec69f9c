"""Training throughput of the numpy engine, next to the references a user would otherwise pick.

For each shape (hidden, seq_length, batch), float32, Adagrad lr 0.1, clip 5, one run prints:

- rnnserve: ``Trainer.step`` on tiny Shakespeare (random text if the file is missing);
- PyTorch CPU: ``nn.RNN(tanh)`` + ``nn.Linear`` + ``Adagrad`` on the same shapes, one-hot
  inputs, hidden state carried, same loss and clipping (skipped with a note without torch);
- per-char loop: min-char-rnn's ``lossFun`` with BPTT fixed (dhnext carried), one character at a
  time in plain numpy, strands one after another;
- roofline: the matrix-product FLOPs a step needs per character (6 H^2 + 6 H V: forward
  h W_hh and h W_hy; backward dh W_hh, dy W_hy, dW_hh, dW_hy) at the FLOP/s this machine
  reaches on one GEMM of the same size ((seq*batch x H) @ (H x H)): an upper bound. The
  one-hot input products (W_xh x forward, dW_xh backward) are not counted: with one-hot inputs
  they are a gather and a scatter-add, not multiplications (rnnserve still does dW_xh as a
  one-hot GEMM, 2 H V more FLOPs, because that is faster in numpy than np.add.at).

A second table does the same for the gated cells (``--cells``, default lstm,gru) at the
shapes of issue 13 (hidden 128, seq 50, batch 1 and hidden 256, seq 100, batch 32): rnnserve's
``Trainer.step`` with ``cell=lstm|gru`` next to ``torch.nn.LSTM`` / ``torch.nn.GRU`` + Linear +
Adagrad, one-hot inputs, (h, c) carried, and rnnserve again on the gated cells' numpy path
(column ``numpy``: the C step kernel off, as RNNSERVE_ENGINE_KERNEL=numpy does; n/a when the
kernel is off anyway). Their roofline counts 6 G H^2 + 6 H V FLOPs per
character (G gates: LSTM 4, GRU 3; the products of the first paragraph with W_hh now H x GH)
at the FLOP/s of one (seq*batch x H) @ (H x GH) GEMM.

Each cell is the best of several short timed repeats (the machine is shared); ``--cpu-time``
times by this process's CPU time instead of the wall clock (for a busy machine: less moved by
the other processes, still by those sharing its core and caches). Torch runs with as many threads
as numpy's BLAS (``--threads`` to override). Run: ``python bench/engine.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the bench package, whichever directory this runs from

import numpy as np  # noqa: E402
from rnnserve_server.engine.cells import fast  # noqa: E402
from rnnserve_server.engine.model_config import ModelConfig  # noqa: E402
from rnnserve_server.engine.trainer import Trainer  # noqa: E402
from rnnserve_server.engine.vocab import Vocab  # noqa: E402

from bench._common import CORPUS, cpu_name  # noqa: E402

SHAPES = [(100, 25, 1), (512, 100, 32)]
CELL_SHAPES = [(128, 50, 1), (256, 100, 32)]
GATES = {"lstm": 4, "gru": 3}


def blas_threads() -> int:
    """Threads numpy's BLAS uses: OPENBLAS_NUM_THREADS / OMP_NUM_THREADS, else the usable CPUs."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0))


# What rate() times: wall-clock, or with --cpu-time this process's CPU time (on a machine
# shared with other work the wall clock mostly measures the others; CPU time moves less, though
# cache and core sharing still slow it).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def rate(step: Callable[[], Any], chars_per_step: int, seconds: float, repeats: int = 5) -> float:
    """Best chars/s over ``repeats`` timed slices of about ``seconds / repeats`` each."""
    step()  # warm up (allocations, caches)
    t0 = clock()
    step()
    once = max(clock() - t0, 1e-6)
    n = max(1, int(seconds / repeats / once))
    best = 0.0
    for _ in range(repeats):
        t0 = clock()
        for _ in range(n):
            step()
        best = max(best, n * chars_per_step / max(clock() - t0, 1e-9))
    return best


def load_ids(vocab_size: int = 65) -> tuple[Vocab, np.ndarray]:
    """Tiny Shakespeare as ids, or random text over ``vocab_size`` characters."""
    if CORPUS.exists():
        text = CORPUS.read_text(encoding="utf-8")
    else:
        rng = np.random.default_rng(0)
        alphabet = "".join(chr(33 + i) for i in range(vocab_size))
        text = "".join(rng.choice(list(alphabet), size=200_000))
    vocab = Vocab.from_text(text)
    return vocab, vocab.encode(text)


def bench_rnnserve(
    H: int, T: int, B: int, vocab: Vocab, ids: np.ndarray, seconds: float, cell: str = "rnn"
) -> float:
    config = ModelConfig(
        hidden_size=H, seq_length=T, batch_size=B, learning_rate=0.1, optimizer="adagrad", cell=cell
    )
    trainer = Trainer(config, vocab, ids)
    return rate(trainer.step, T * B, seconds)


def bench_numpy_path(
    H: int, T: int, B: int, vocab: Vocab, ids: np.ndarray, seconds: float, cell: str
) -> float | None:
    """bench_rnnserve with the gated cells' C kernel off; None if it is off already."""
    kernel = fast.KERNEL
    if kernel is None:
        return None
    fast.KERNEL = None
    try:
        return bench_rnnserve(H, T, B, vocab, ids, seconds, cell)
    finally:
        fast.KERNEL = kernel


def bench_torch(
    H: int, T: int, B: int, V: int, seconds: float, threads: int, cell: str = "rnn"
) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rnn: Any
    if cell == "lstm":
        rnn = torch.nn.LSTM(V, H)
    elif cell == "gru":
        rnn = torch.nn.GRU(V, H)
    else:
        rnn = torch.nn.RNN(V, H, nonlinearity="tanh")
    head = torch.nn.Linear(H, V)
    params = [*rnn.parameters(), *head.parameters()]
    opt = torch.optim.Adagrad(params, lr=0.1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (T + 1, B), generator=gen)
    x = torch.nn.functional.one_hot(ids[:-1], V).float()  # (T, B, V)
    y = ids[1:].reshape(T * B)
    zero = torch.zeros(1, B, H)
    state: dict[str, Any] = {"h": (zero, zero.clone()) if cell == "lstm" else zero}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out, h = rnn(x, state["h"])
        # summed over time, averaged over strands: the engine's (and min-char-rnn's) loss
        loss = torch.nn.functional.cross_entropy(head(out.reshape(T * B, H)), y) * T
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_value_(params, 5.0)
        opt.step()
        state["h"] = tuple(t.detach() for t in h) if cell == "lstm" else h.detach()

    return rate(step, T * B, seconds)


def bench_loop(H: int, T: int, B: int, V: int, seconds: float) -> float:
    """min-char-rnn's per-character loop with the BPTT fix, float32, Adagrad, strands in turn."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    Wxh = (rng.standard_normal((H, V)) * 0.01).astype(f32)
    Whh = (rng.standard_normal((H, H)) * 0.01).astype(f32)
    Why = (rng.standard_normal((V, H)) * 0.01).astype(f32)
    bh, by = np.zeros((H, 1), f32), np.zeros((V, 1), f32)
    params = [Wxh, Whh, Why, bh, by]
    mems = [np.zeros_like(p) for p in params]
    data = rng.integers(0, V, size=(B, T + 1))
    hprevs = [np.zeros((H, 1), f32) for _ in range(B)]

    def loss_fun(inputs: np.ndarray, targets: np.ndarray, hprev: np.ndarray) -> tuple[Any, ...]:
        xs, hs, ps = {}, {-1: hprev}, {}
        loss = 0.0
        for t in range(len(inputs)):
            xs[t] = np.zeros((V, 1), f32)
            xs[t][inputs[t]] = 1
            hs[t] = np.tanh(np.dot(Wxh, xs[t]) + np.dot(Whh, hs[t - 1]) + bh)
            ys = np.dot(Why, hs[t]) + by
            ps[t] = np.exp(ys - ys.max()) / np.sum(np.exp(ys - ys.max()))
            loss += -math.log(ps[t][targets[t], 0])
        dWxh, dWhh, dWhy = np.zeros_like(Wxh), np.zeros_like(Whh), np.zeros_like(Why)
        dbh, dby = np.zeros_like(bh), np.zeros_like(by)
        dhnext = np.zeros_like(hs[0])
        for t in reversed(range(len(inputs))):
            dy = np.copy(ps[t])
            dy[targets[t]] -= 1
            dWhy += np.dot(dy, hs[t].T)
            dby += dy
            dh = np.dot(Why.T, dy) + dhnext  # the fix: the gradient flows back through time
            dhraw = (1 - hs[t] * hs[t]) * dh
            dbh += dhraw
            dWxh += np.dot(dhraw, xs[t].T)
            dWhh += np.dot(dhraw, hs[t - 1].T)
            dhnext = np.dot(Whh.T, dhraw)
        return loss, dWxh, dWhh, dWhy, dbh, dby, hs[len(inputs) - 1]

    def step() -> None:
        for b in range(B):
            _, *grads, hprevs[b] = loss_fun(data[b, :-1], data[b, 1:], hprevs[b])
            for p, g, m in zip(params, grads, mems, strict=True):
                np.clip(g, -5, 5, out=g)
                m += g * g
                p += -0.1 * g / np.sqrt(m + 1e-8)

    return rate(step, T * B, seconds, repeats=3)


def gemm_flops(m: int, k: int, n: int, seconds: float) -> float:
    """Best FLOP/s of an (m x k) @ (k x n) float32 GEMM."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    c = np.empty((m, n), dtype=np.float32)
    return rate(lambda: np.matmul(a, b, out=c), 2 * m * k * n, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per cell (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = numpy's)")
    parser.add_argument("--no-loop", action="store_true", help="skip the per-char loop column")
    parser.add_argument("--cells", default="lstm,gru", help="gated cells to compare ('' none)")
    parser.add_argument("--no-rnn", action="store_true", help="skip the tanh RNN table")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by this process's CPU time, not the wall clock (for a busy machine; with "
        "more than one thread it adds the threads' times)",
    )
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS["cpu" if args.cpu_time else "wall"]
    threads = args.threads or blas_threads()
    vocab, ids = load_ids()
    V = vocab.size

    print(f"CPU: {cpu_name()}; numpy {np.__version__}, BLAS threads {threads}")
    if args.cpu_time:
        print("timed by process CPU time (--cpu-time), not the wall clock")
    cells = [c for c in args.cells.split(",") if c]
    # Every numpy cell first, torch last: once torch has run, its OpenMP threads keep spinning
    # for a while and slowed the next multi-threaded numpy cell by ~25 % on 2 cores.
    gated = []
    for cell in cells:
        for H, T, B in CELL_SHAPES:
            ours = bench_rnnserve(H, T, B, vocab, ids, args.seconds, cell)
            numpy_path = bench_numpy_path(H, T, B, vocab, ids, args.seconds, cell)
            G = GATES[cell]
            roof = gemm_flops(T * B, H, G * H, args.seconds) / (6 * G * H * H + 6 * H * V)
            gated.append((cell, H, T, B, ours, numpy_path, roof))
    measured = []
    for H, T, B in [] if args.no_rnn else SHAPES:
        ours = bench_rnnserve(H, T, B, vocab, ids, args.seconds)
        loop = None if args.no_loop else bench_loop(H, T, B, V, args.seconds)
        flops_per_char = 6 * H * H + 6 * H * V  # see the module docstring
        roof = gemm_flops(T * B, H, H, args.seconds) / flops_per_char
        measured.append((H, T, B, ours, loop, roof))
    rows = [
        (H, T, B, ours, bench_torch(H, T, B, V, args.seconds, threads), loop, roof)
        for H, T, B, ours, loop, roof in measured
    ]

    gated_rows = [
        (
            cell,
            H,
            T,
            B,
            ours,
            numpy_path,
            bench_torch(H, T, B, V, args.seconds, threads, cell),
            roof,
        )
        for cell, H, T, B, ours, numpy_path, roof in gated
    ]

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:,.0f}"

    def ratio(a: float, b: float | None) -> str:
        return "n/a" if not b else f"{a / b:.2f}x"

    if gated_rows:
        print(f"gated cells: chars/s of training, float32, Adagrad; {V}-char vocabulary")
        header = (
            f"{'cell':>4} {'hidden':>6} {'seq':>4} {'batch':>5} | {'rnnserve':>10} "
            f"{'numpy':>10} {'torch':>10} {'roofline':>10} | {'vs numpy':>8} {'vs torch':>8} "
            f"{'of roof':>7}"
        )
        print(header)
        print("-" * len(header))
        for cell, H, T, B, ours, numpy_path, torch_rate, roof in gated_rows:
            print(
                f"{cell:>4} {H:>6} {T:>4} {B:>5} | {fmt(ours):>10} {fmt(numpy_path):>10} "
                f"{fmt(torch_rate):>10} {fmt(roof):>10} | {ratio(ours, numpy_path):>8} "
                f"{ratio(ours, torch_rate):>8} {100 * ours / roof:>6.0f}%"
            )
        kernel = "on" if fast.KERNEL is not None else "off (RNNSERVE_ENGINE_KERNEL or not built)"
        print(f"rnnserve: the C step kernel {kernel}; numpy: the numpy path in this process")
        print(
            "roofline: (6 G H^2 + 6 H V) FLOPs per character (G = 4 LSTM, 3 GRU) at the FLOP/s "
            "of one (seq*batch x H) @ (H x G*H) float32 GEMM"
        )
        print()
    if not rows:
        return 0
    print(f"chars/s of training, float32, Adagrad; {V}-char vocabulary; best of short repeats")
    print(f"numpy {np.__version__}, BLAS threads {threads}; torch threads set to {threads}")
    header = (
        f"{'hidden':>6} {'seq':>4} {'batch':>5} | {'rnnserve':>10} {'torch':>10} "
        f"{'loop':>9} {'roofline':>10} | {'vs torch':>8} {'vs loop':>8} {'of roof':>7}"
    )
    print(header)
    print("-" * len(header))
    for H, T, B, ours, torch_rate, loop, roof in rows:
        print(
            f"{H:>6} {T:>4} {B:>5} | {fmt(ours):>10} {fmt(torch_rate):>10} {fmt(loop):>9} "
            f"{fmt(roof):>10} | {ratio(ours, torch_rate):>8} {ratio(ours, loop):>8} "
            f"{100 * ours / roof:>6.0f}%"
        )
    if rows[0][4] is None:
        print("torch column skipped: torch is not importable (make bench installs it)")
    print(
        "roofline: (6 H^2 + 6 H V) FLOPs per character at the FLOP/s of one "
        "(seq*batch x H) @ (H x H) float32 GEMM on this machine"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
