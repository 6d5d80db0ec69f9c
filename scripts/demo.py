"""`make demo`: rnnserve end to end on any machine, in about a minute.

Starts a server on a free loopback port with a throwaway data directory, creates a session
from the source code of a few Python standard-library modules (text every Python install
has), trains it with a progress bar, samples from it, and stops the server with SIGTERM.
Every step after the server start is an `rnnserve` CLI command, printed before it runs.

    python scripts/demo.py [--seconds 45] [--steps 5000] [--keep] [--plot-output PATH]
    python scripts/demo.py --corpus input.txt    # only write the corpus (the README's offline text)

It also draws the loss curve in the terminal and writes it as an image: a new file in the
temporary directory unless --plot-output says where (`--plot-output docs/loss.png` refreshes
the README's picture; the demo never touches it by itself).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rnnserve_server.testing import ServerHandle, start_server

# Plain, idiomatic, ASCII-only Python (a small alphabet learns faster); together ~340 kB.
MODULES = ["textwrap", "string", "fnmatch", "argparse", "json.encoder", "inspect", "dataclasses"]


def corpus(max_chars: int) -> str:
    """The source of MODULES (their docstrings if a Python ships without .py files)."""
    parts: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        path = Path(module.__file__ or "")
        if path.suffix == ".py" and path.is_file():
            parts.append(path.read_text(encoding="utf-8"))
        elif module.__doc__:
            parts.append(module.__doc__)
    return "\n".join(parts)[:max_chars]


def start(workdir: Path) -> ServerHandle:
    """The server on 127.0.0.1:<free port>, its data and log in ``workdir``; once serving."""
    log = workdir / "server.log"
    server = start_server(workdir / "data", log_file=log)
    print(f"$ {shlex.join(server.args)}  (log: {log})", flush=True)
    print(f"server ready at {server.address}\n", flush=True)
    return server


def rnnserve(address: str, *args: str) -> None:
    """Run one CLI command with the terminal attached (so the progress bar shows)."""
    print(f"$ rnnserve {shlex.join(args)}", flush=True)
    command = [sys.executable, "-m", "rnnserve", "--address", address, *args]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise SystemExit(f"demo: `rnnserve {shlex.join(args)}` exited with {result.returncode}")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=45.0, help="training time budget")
    parser.add_argument("--steps", type=int, default=5000, help="most training steps")
    parser.add_argument("--chars", type=int, default=400_000, help="corpus size in characters")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--plot-output",
        help="where to write the loss chart (.png or .svg; default: a new rnnserve-loss-*.png "
        "in the temporary directory; docs/loss.png is the README's)",
    )
    parser.add_argument(
        "--corpus",
        metavar="PATH",
        help="only write the corpus (--chars characters of Python source) to PATH and exit",
    )
    args = parser.parse_args()
    if args.corpus is not None:
        text = corpus(args.chars)
        Path(args.corpus).write_text(text, encoding="utf-8")
        print(
            f"wrote {args.corpus}: {len(text):,} characters of Python source ({', '.join(MODULES)})"
        )
        return
    if args.plot_output is None:
        handle, args.plot_output = tempfile.mkstemp(prefix="rnnserve-loss-", suffix=".png")
        os.close(handle)

    tmp = tempfile.mkdtemp(prefix="rnnserve-demo-")
    try:
        workdir = Path(tmp)
        text = corpus(args.chars)
        corpus_file = workdir / "corpus.txt"
        corpus_file.write_text(text, encoding="utf-8")
        print(
            f"corpus: {len(text):,} characters of Python source ({', '.join(MODULES)}), "
            f"{len(set(text))} distinct\n",
            flush=True,
        )
        server = start(workdir)
        address = server.address
        try:
            rnnserve(address, "create", str(corpus_file), "--id", "stdlib", "--seed", "1")
            rnnserve(address, "generate", "stdlib", "--length", "120", "--seed", "1")
            rnnserve(
                address,
                "train",
                "stdlib",
                "--steps",
                str(args.steps),
                "--max-seconds",
                f"{args.seconds:g}",
            )
            rnnserve(address, "plot", "stdlib", "--width", "100", "--height", "25")
            Path(args.plot_output).parent.mkdir(parents=True, exist_ok=True)
            rnnserve(address, "plot", "stdlib", "--output", args.plot_output)
            rnnserve(address, "predict", "stdlib", "def __init__(self):")
            rnnserve(
                address,
                "generate",
                "stdlib",
                "--length",
                "600",
                "--prime",
                "def ",
                "--temperature",
                "0.7",
                "--seed",
                "1",
            )
            rnnserve(address, "show", "stdlib")
        finally:
            print("stopping the server with SIGTERM", flush=True)
            code = server.stop()
            print(f"server exited with {code}" + (f" (data kept in {tmp})" if args.keep else ""))
            if code != 0:
                print(server.text_log(), file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
