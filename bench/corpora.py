"""Build the corpora the quality benchmark chooses presets on, from files every Debian machine
with Python 3.11 has, so that a run is reproducible without a download.

- ``licenses``: the regular files of /usr/share/common-licenses in sorted name order (symlinks
  skipped), cut at 100,000 characters: ~100 KB of legal English (Apache-2.0 ... GPL-2).
- ``stdlib``: the ``.py`` files of the running Python's standard library (``sysconfig``'s
  ``stdlib`` path, ``site-packages`` and ``dist-packages`` left out) in sorted path order, cut
  at 3,000,000 characters, every non-ASCII character replaced by "?" (a few dozen in string
  literals, which the held-out tail would otherwise hold outside the training alphabet):
  source code. Other patch releases of 3.11 differ slightly.

Tiny Shakespeare (karpathy/char-rnn's ``input.txt``, 1,115,394 characters) is the third; it
is a download, so it is not built here.

    python bench/corpora.py --out DIR      # writes DIR/licenses.txt and DIR/stdlib.txt
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
SIZES = {"licenses": 100_000, "stdlib": 3_000_000}


def concatenate(paths: Iterable[Path], limit: int) -> str:
    """The files' text, one after the other, cut at ``limit`` characters."""
    parts: list[str] = []
    total = 0
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= limit:
            break
    return "".join(parts)[:limit]


def licenses() -> str:
    """~100 KB of license texts."""
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    return concatenate(files, SIZES["licenses"])


def stdlib() -> str:
    """~3 MB of the standard library's Python source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )
    text = concatenate(files, SIZES["stdlib"])
    return "".join(ch if ch.isascii() else "?" for ch in text)


BUILDERS = {"licenses": licenses, "stdlib": stdlib}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, build in BUILDERS.items():
        text = build()
        path = args.out / f"{name}.txt"
        path.write_text(text, encoding="utf-8")
        print(f"{path}: {len(text):,} characters, {len(set(text))} distinct", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
