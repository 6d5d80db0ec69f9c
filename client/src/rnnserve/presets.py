"""Which preset to pick: what each is for, and what it measured (``rnnserve presets``).

One entry per value of the proto's ``Preset`` enum, in its order. ``model`` restates the
server's settings (tests/test_presets.py checks them against the server's table); the
figures are copied from BENCHMARKS.md (the same test finds each one there) and stay None
until measured: held-out nats per character after 1, 5 and 20 minutes of training, and the
training speed. A quality benchmark fills in the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MINUTES = (1, 5, 20)  # the training times the held-out loss is given for


@dataclass(frozen=True)
class Measured:
    """Figures from benchmark runs of a preset."""

    nats: dict[
        int, float
    ]  # minutes of training -> held-out nats/char (a time not measured: absent)
    chars_per_second: float  # training speed at the 5-minute point
    date: str
    machine: str
    source: str  # where in BENCHMARKS.md


@dataclass(frozen=True)
class PresetGuide:
    """One preset: its settings in words, what it is for, and its figures (None: not measured)."""

    name: str
    model: str
    use: str
    measured: Measured | None = field(default=None)


# BENCHMARKS.md, "Quality of the presets": tiny Shakespeare, trained on its first 90 % through a
# real server, Predict over the last 10 % from a zero state.
SOURCE = 'BENCHMARKS.md, "Quality of the presets"'
_MACHINE = "2-core AMD EPYC, 1 BLAS thread"

GUIDE: list[PresetGuide] = [
    PresetGuide(
        "default",
        "gru 2x128, seq 50, batch 32, adam 3e-3, dropout 0.25, reset 10",
        "real text, when you want a useful model soon and a better one later: ahead of the "
        "tanh RNN and the one-layer GRU it replaced after 5 and 20 minutes on tiny "
        "Shakespeare, after 1 and 5 on code and after 1, 5 and 20 on a 100 KB text (the "
        "dropout between its layers keeps it from over-fitting); about 3x quality's "
        "characters per second",
        Measured(
            {1: 1.632, 5: 1.564, 20: 1.529},
            68_622,
            "2026-12-08",
            _MACHINE + ", load 2-3 (two benchmarks at once)",
            SOURCE,
        ),
    ),
    PresetGuide(
        "notebook",
        "rnn 1x100, seq 5, batch 1, sgd 0.1",
        "the seed notebook's settings, for tiny texts such as 'Hallo' (learns to predict "
        "'alloH' in under 30 steps); diverges on real text (over 10 nats a character, worse "
        "than a uniform guess)",
        Measured(
            {1: 10.763, 5: 10.747, 20: 12.150},
            20_747,
            "2026-12-08",
            _MACHINE + ", shared (load 2-4)",
            SOURCE,
        ),
    ),
    PresetGuide(
        "min-char-rnn",
        "rnn 1x100, seq 25, batch 1, adagrad 0.1",
        "Karpathy's min-char-rnn settings: a reference point to compare with that script; "
        "worse than default at every time measured",
        Measured(
            {1: 2.069, 5: 1.935, 20: 1.871},
            80_437,
            "2026-12-01",
            _MACHINE + ", at rest (1 min: 2026-12-08, load 2-3)",
            SOURCE,
        ),
    ),
    PresetGuide(
        "quality",
        "gru 2x256, seq 50, batch 32, adam 3e-3, dropout 0.25, reset 10",
        "the best held-out loss measured after 5 and 20 minutes; trained as a job with a "
        "cosine learning-rate decay (`train --detach --decay cosine`) lower still: 1.487 "
        "after 5 minutes, 1.466 after 20 (2026-12-08, with the C kernel)",
        Measured(
            {1: 1.751, 5: 1.551, 20: 1.538},
            14_958,
            "2026-12-01",
            _MACHINE + ", at rest (1 min: 2026-12-08 with the C kernel, load 2-3)",
            SOURCE,
        ),
    ),
]
