"""``presets``: what each preset is for and what it measured, from :mod:`rnnserve.presets`."""

from __future__ import annotations

import argparse
import textwrap

from rnnserve.cli.exit_codes import EXIT_OK
from rnnserve.cli.output import Output
from rnnserve.client import Client
from rnnserve.presets import GUIDE, MINUTES, PresetGuide

NOT_MEASURED = "-"


def _nats(guide: PresetGuide, minutes: int) -> str:
    if guide.measured is None or minutes not in guide.measured.nats:
        return NOT_MEASURED
    return f"{guide.measured.nats[minutes]:.3f}"


def _speed(guide: PresetGuide) -> str:
    return NOT_MEASURED if guide.measured is None else f"{guide.measured.chars_per_second:,.0f}"


def cmd_presets(client: Client, args: argparse.Namespace, out: Output) -> int:
    header = ["PRESET", "MODEL", *(f"{m} MIN" for m in MINUTES), "CHARS/S"]
    rows = [[g.name, g.model, *(_nats(g, m) for m in MINUTES), _speed(g)] for g in GUIDE]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            text.ljust(widths[i]) if i < 2 else text.rjust(widths[i]) for i, text in enumerate(row)
        ]
        out.line("  ".join(cells).rstrip())
    out.line()
    out.line(
        "1/5/20 MIN: held-out nats per character after that much training; "
        f"{NOT_MEASURED}: not measured yet."
    )
    sources = {
        (g.measured.source, g.measured.date, g.measured.machine) for g in GUIDE if g.measured
    }
    for key in sorted(sources):
        source, date, machine = key
        measured = ", ".join(
            g.name
            for g in GUIDE
            if g.measured and (g.measured.source, g.measured.date, g.measured.machine) == key
        )
        out.line(f"Measured ({measured}): {source}, {date}, {machine}; tiny Shakespeare.")
    out.line()
    width = max(len(g.name) for g in GUIDE) + 2
    for g in GUIDE:
        out.obj(
            {
                "preset": g.name,
                "model": g.model,
                "use": g.use,
                "held_out_nats": {
                    f"{m}min": (g.measured.nats.get(m) if g.measured else None) for m in MINUTES
                },
                "chars_per_second": g.measured.chars_per_second if g.measured else None,
                "measured": None
                if g.measured is None
                else {
                    "date": g.measured.date,
                    "machine": g.measured.machine,
                    "source": g.measured.source,
                },
            }
        )
        lines = textwrap.wrap(g.use, 100 - width)
        for i, line in enumerate(lines):
            out.line(f"{g.name if i == 0 else '':<{width}}{line}")
    out.line()
    out.line("Use one: rnnserve create FILE --preset NAME (any flag overrides its setting).")
    return EXIT_OK
