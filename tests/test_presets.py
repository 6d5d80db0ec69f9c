"""`rnnserve presets` (issue 20 item 5): the client's table names every preset of the proto,
says what the real server's preset is (a session made with it), quotes only figures that
BENCHMARKS.md holds, and says "not measured yet" for the rest; `create --help` points to it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rnnserve.client import PRESETS
from rnnserve.errors import InvalidArgument
from rnnserve.presets import GUIDE, MINUTES
from rnnserve.v1 import rnn_service_pb2 as pb

from tests.cli_runner import rnnserve

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

pytestmark = pytest.mark.timeout(120)

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
# Each measured preset's row in BENCHMARKS.md's "Quality of the presets" table.
ROWS = {
    "default": "| **`default` now** |",
    "notebook": "| `notebook` | 2026",
    "min-char-rnn": "| `min-char-rnn` | 2026",
    "quality": "| `quality` | 2026",
}


def model_text(config: pb.SessionConfig) -> str:
    """A config the way the table writes it: 'gru 2x256, seq 50, batch 32, adam 3e-3, ...'."""
    cell = pb.Cell.Name(config.cell).removeprefix("CELL_").lower()
    optimizer = pb.Optimizer.Name(config.optimizer).removeprefix("OPTIMIZER_").lower()
    parts = [
        f"{cell} {config.num_layers}x{config.hidden_size}",
        f"seq {config.seq_length}",
        f"batch {config.batch_size}",
        f"{optimizer} {config.learning_rate:g}",
    ]
    if config.dropout:
        parts.append(f"dropout {config.dropout:g}")
    if config.reset_every:
        parts.append(f"reset {config.reset_every}")
    return ", ".join(parts).replace("0.003", "3e-3")


def test_the_table_says_what_each_server_preset_is(module_server: ServerHandle) -> None:
    assert [g.name for g in GUIDE] == list(PRESETS)  # every Preset value, in the enum's order
    assert len(PRESETS) == len(pb.Preset.values()) - 1  # all but PRESET_UNSPECIFIED
    with module_server.client() as client:
        for guide in GUIDE:
            made = client.create_session("Hallo, world. " * 10, preset=guide.name)
            assert guide.model == model_text(made.info().config), guide.name


def test_every_figure_is_in_benchmarks_md() -> None:
    text = BENCHMARKS.read_text(encoding="utf-8")
    section = text[text.index("### Quality of the presets") :]
    section = section[: section.index("\n### ", 1)]
    assert "AMD EPYC" in section
    for guide in GUIDE:
        if guide.measured is None:
            assert guide.name not in ROWS
            continue
        m = guide.measured
        assert m.source == 'BENCHMARKS.md, "Quality of the presets"' and "AMD EPYC" in m.machine
        (row,) = [line for line in section.splitlines() if ROWS[guide.name] in line]
        assert m.date in row
        cells = row.split("|")
        at = dict(zip(MINUTES, cells[-4:-1], strict=True))  # "60 s: ...", "300 s", "1,200 s"
        assert set(m.nats) <= set(MINUTES)
        for minutes in MINUTES:
            if minutes in m.nats:
                assert f"**{m.nats[minutes]:.3f}**" in at[minutes], (guide.name, minutes)
            else:
                assert at[minutes].strip() == "—", (guide.name, minutes)
        assert f"{m.chars_per_second:,.0f} c/s" in at[5]


def test_presets_command(module_server: ServerHandle) -> None:
    result = rnnserve(module_server, "presets")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["PRESET", "MODEL", "1", "MIN", "5", "MIN", "20", "MIN", "CHARS/S"]
    rows = {line.split()[0]: line for line in lines[1 : 1 + len(GUIDE)]}
    assert list(rows) == [g.name for g in GUIDE]
    assert rows["quality"].split()[-4:] == ["1.751", "1.551", "1.538", "14,958"]
    assert rows["default"].split()[-4:] == ["1.632", "1.564", "1.529", "68,622"]
    assert rows["notebook"].split()[-4:] == ["10.763", "10.747", "12.150", "20,747"]
    assert "-: not measured yet" in result.stdout
    for guide in GUIDE:  # each preset's source, date and machine (they differ here)
        assert guide.measured is not None
        assert re.search(
            rf'Measured \({guide.name}\): BENCHMARKS\.md, "Quality of the presets", '
            rf"{guide.measured.date}, 2-core AMD EPYC",
            result.stdout,
        )
    for guide in GUIDE:  # what each is for
        assert re.search(
            rf"^{re.escape(guide.name)} +{re.escape(guide.use[:40])}", result.stdout, re.M
        )

    objects = [
        json.loads(line)
        for line in rnnserve(module_server, "--json", "presets").stdout.splitlines()
    ]
    by_name = {o["preset"]: o for o in objects}
    assert by_name["notebook"]["held_out_nats"] == {"1min": 10.763, "5min": 10.747, "20min": 12.15}
    assert by_name["quality"]["held_out_nats"] == {"1min": 1.751, "5min": 1.551, "20min": 1.538}
    assert by_name["default"]["held_out_nats"] == {"1min": 1.632, "5min": 1.564, "20min": 1.529}

    create_help = rnnserve(module_server, "create", "--help")
    assert "`rnnserve presets` says what each" in " ".join(create_help.stdout.split())


def test_one_layer_asked_of_a_preset_with_dropout_gets_none(module_server: ServerHandle) -> None:
    """The default has dropout between its two layers; a request for one layer drops it (it
    would have nothing to act on), and a dropout it asks for itself is still refused."""
    with module_server.client() as client:
        made = client.create_session("Hallo, world. " * 10, num_layers=1)
        config = made.info().config
        assert (config.num_layers, config.dropout) == (1, 0.0)
        assert made.step().step == 1
        stacked = client.create_session("Hallo, world. " * 10, num_layers=3).info().config
        assert (stacked.num_layers, stacked.dropout) == (3, 0.25)
        with pytest.raises(InvalidArgument, match="dropout applies between layers"):
            client.create_session("Hallo, world. " * 10, num_layers=1, dropout=0.2)
