"""Held-out quality for a fixed wall-clock budget: the default preset next to min-char-rnn.

Trains each configuration on the first 90 % of a corpus (tiny Shakespeare by default) for the
same number of seconds, then reports bits per character on the last 10 %, evaluated from a zero
hidden state (as the service samples). Run: ``python bench/quality.py --seconds 60``.
Override the challenger with --hidden/--seq/--batch/--lr/--optimizer/--reset-every.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from rnnserve_server.model import PRESETS, ModelConfig, Trainer
from rnnserve_server.vocab import Vocab

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def run(
    name: str, config: ModelConfig, vocab: Vocab, text: str, seconds: float
) -> dict[str, float]:
    """Train ``config`` for ``seconds`` on the first 90 % of ``text``; score the last 10 %."""
    split = int(len(text) * 0.9)
    train, held_out = vocab.encode(text[:split]), vocab.encode(text[split:])
    trainer = Trainer(config, vocab, train)
    smooth = math.log(vocab.size)
    start = time.perf_counter()
    chars = 0
    while time.perf_counter() - start < seconds:
        result = trainer.step()
        chars += result.chars
        smooth = 0.99 * smooth + 0.01 * result.loss
    elapsed = time.perf_counter() - start
    nats = trainer.evaluate(held_out)
    return {
        "steps": trainer.step_count,
        "chars": chars,
        "chars_per_s": chars / elapsed,
        "epochs": chars / len(train),
        "train_bits": smooth / math.log(2),
        "held_out_bits": nats / math.log(2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--seconds", type=float, default=60.0, help="training budget per model")
    parser.add_argument("--preset", default="default", help="challenger preset (default)")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--optimizer", choices=["sgd", "adagrad", "adam"])
    parser.add_argument("--reset-every", type=int)
    parser.add_argument("--skip-baseline", action="store_true", help="only run the challenger")
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        print(
            f"corpus not found: {args.corpus}; give one with --corpus PATH "
            "(tiny Shakespeare: https://raw.githubusercontent.com/karpathy/char-rnn/master/"
            "data/tinyshakespeare/input.txt)",
            file=sys.stderr,
        )
        return 2
    text = args.corpus.read_text(encoding="utf-8")
    vocab = Vocab.from_text(text)
    changes = {
        key: value
        for key, value in {
            "hidden_size": args.hidden,
            "seq_length": args.seq,
            "batch_size": args.batch,
            "learning_rate": args.lr,
            "optimizer": args.optimizer,
            "reset_every": args.reset_every,
        }.items()
        if value is not None
    }
    challenger = PRESETS[args.preset].replace(**changes)
    challenger.validate()
    runs = [(args.preset if not changes else "custom", challenger)]
    if not args.skip_baseline:
        runs.insert(0, ("min-char-rnn", PRESETS["min-char-rnn"]))

    print(
        f"corpus {args.corpus.name}: {len(text):,} chars, train 90 %, held out 10 %; "
        f"{args.seconds:g} s of training each; held-out loss from a zero hidden state"
    )
    header = (
        f"{'config':<13} {'hidden':>6} {'seq':>4} {'batch':>5} {'optim':>7} {'lr':>7} "
        f"{'reset':>5} | {'steps':>6} {'chars/s':>8} {'epochs':>6} {'train':>6} "
        f"{'held-out bpc':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, config in runs:
        r = run(name, config, vocab, text, args.seconds)
        c = config
        print(
            f"{name:<13} {c.hidden_size:>6} {c.seq_length:>4} {c.batch_size:>5} "
            f"{c.optimizer:>7} {c.learning_rate:>7g} {c.reset_every:>5} | "
            f"{r['steps']:>6,.0f} {r['chars_per_s']:>8,.0f} {r['epochs']:>6.2f} "
            f"{r['train_bits']:>6.3f} {r['held_out_bits']:>12.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
