"""What the benchmark scripts in bench/ share: the result rows, their table and JSON document, a
side-by-side table (nodeflow beside another system, with the per-round ratios), the machine's
description, and the command line (--quick, --json FILE, progress on stderr).

The standard library only, and no nodeflow: each script imports it as `benchlib`, which works
because Python puts the script's own folder (bench/) first on sys.path, and spawned child
processes inherit that path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

Progress = Callable[[str], None]
Plan = TypeVar("Plan")


@dataclass
class Row:
    """One line of the table: the median of `runs` (or a single value) with its spread and verdict."""

    key: str
    label: str
    unit: str
    value: float | None = None
    runs: list[float] = field(default_factory=list)
    spread: str = ""
    target: str = "-"
    result: str = "-"
    note: str = ""

    def settle(self) -> None:
        """value = the median of the runs; spread = min..max of them, when there is more than one."""
        if self.runs:
            self.value = statistics.median(self.runs)
            if len(self.runs) > 1:
                self.spread = f"{format_number(min(self.runs), self.unit)}..{format_number(max(self.runs), self.unit)}"


def format_number(value: float, unit: str) -> str:
    """Rates and sizes as whole numbers with thousands separators, ratios to 2 places, the rest to 3."""
    if unit in ("ops/s", "msg/s", "kB", "inst", "pages"):
        return f"{value:,.0f}"
    if unit in ("x", "share"):
        return f"{value:.2f}"
    if unit == "s":
        return f"{value:.1f}"
    return f"{value:.3f}"


def format_value(row: Row) -> str:
    return "n/a" if row.value is None else format_number(row.value, row.unit)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


# The machine -------------------------------------------------------------------------------------


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded to 2 places."""
    return [round(x, 2) for x in os.getloadavg()]


def environment(filesystem: str | None, folder: str) -> dict[str, Any]:
    """The start of a run's meta: interpreter, SQLite, CPUs, load average now, and where it runs
    (`filesystem` as nodeflow.filesystem_type reports it for the run's folder, `folder` as shown)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": loadavg(),
        "filesystem": filesystem,
        "folder": folder,
        "sqlite": sqlite3.sqlite_version,
    }


def headline(title: str, meta: dict[str, Any], quick: bool, extra: str, *, at: str = "") -> str:
    """The table's first line, e.g. "nodeflow lock benchmark (--quick): Python 3.11.9, SQLite 3.45.1, 8 CPUs,
    ext4 at /repo/bench, <extra>, load average at start 0.10 0.20 0.30, at end 0.40 0.50 0.60"
    (`at` goes between the title and the colon: " at <commit>" or "")."""
    return (
        f"{title}{' (--quick)' if quick else ''}{at}: Python {meta['python']}, SQLite {meta['sqlite']}, "
        f"{meta['cpus']} CPUs, {meta['filesystem']} at {meta['folder']}, {extra}, load average at start "
        + " ".join(f"{x:.2f}" for x in meta["loadavg_at_start"])
        + ", at end "
        + " ".join(f"{x:.2f}" for x in meta["loadavg_at_end"])
    )


# Output -------------------------------------------------------------------------------------------


def render_table(rows: list[Row], intro: list[str]) -> str:
    """The intro lines, a blank line, then the rows in aligned columns (the median right-aligned)."""
    header = ("measurement", "median", "unit", "spread", "target", "result", "note")
    table = [header] + [
        (row.label, format_value(row), row.unit, row.spread or "-", row.target, row.result, row.note) for row in rows
    ]
    return _aligned(intro, table, right={1})


def _aligned(intro: list[str], table: list[tuple[str, ...]], right: set[int]) -> str:
    """The intro lines, a blank line, the table's first line as its header, a rule, and its other
    lines, in columns as wide as their widest cell; the columns in `right` right-aligned."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]

    def line(cells: tuple[str, ...]) -> str:
        parts = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [*intro, "", line(table[0]), line(tuple("-" * w for w in widths))]
    out += [line(cells) for cells in table[1:]]
    return "\n".join(out)


@dataclass
class Pair:
    """One line of a side-by-side table: `ours` (nodeflow's figure), `theirs` (what it is compared
    with, or None) and `ratio` (unit "x", whose runs are the per-round ratios ours / theirs), which
    carries the line's target, result and note; a line without a ratio carries them on `ours`.
    `label` is the line's, the rows keeping their own labels for the JSON document."""

    label: str
    ours: Row
    theirs: Row | None = None
    ratio: Row | None = None


def ratios_by_round(top: Sequence[float | None], bottom: Sequence[float | None]) -> list[float]:
    """top[i] / bottom[i] for every round i in which both sides have a figure (None: no figure)."""
    return [a / b for a, b in zip(top, bottom, strict=True) if a is not None and b is not None and b > 0]


def with_spread(row: Row | None) -> str:
    """A row's median with its spread, "1,234 (1,100..1,300)"; "-" for no row, "n/a" for no figure."""
    if row is None:
        return "-"
    return format_value(row) + (f" ({row.spread})" if row.spread else "")


def render_side_by_side(pairs: list[Pair], intro: list[str], theirs: str = "huey or raw") -> str:
    """The intro lines, a blank line, then one line per pair: nodeflow's median (spread), the other
    side's, the median ratio and the spread of the per-round ratios, the target and its result."""
    header = ("measurement", "nodeflow", theirs, "ratio", "spread of ratio", "target", "result", "note")
    table = [header]
    for pair in pairs:
        judged = pair.ratio or pair.ours
        ratio = "-" if pair.ratio is None else ("n/a" if pair.ratio.value is None else f"{pair.ratio.value:.2f}x")
        spread = "-" if pair.ratio is None else pair.ratio.spread or "-"
        table.append(
            (
                pair.label,
                with_spread(pair.ours),
                with_spread(pair.theirs),
                ratio,
                spread,
                judged.target,
                judged.result,
                judged.note,
            )
        )
    return _aligned(intro, table, right={1, 2, 3})


def write_json(path: str, rows: list[Row], meta: dict[str, Any]) -> None:
    document = {
        "meta": meta,
        "rows": [
            {
                "key": row.key,
                "label": row.label,
                "unit": row.unit,
                "median": row.value,
                "runs": row.runs,
                "target": None if row.target == "-" else row.target,
                "result": None if row.result == "-" else row.result,
                "note": row.note or None,
            }
            for row in rows
        ],
    }
    with open(path, "w", encoding="utf-8") as out:
        json.dump(document, out, indent=2)
        out.write("\n")


# The command line ---------------------------------------------------------------------------------


def main(
    argv: list[str] | None,
    *,
    description: str,
    quick_help: str,
    full_plan: Plan,
    quick_plan: Plan,
    run: Callable[[Plan, Progress], tuple[list[Row], dict[str, Any]]],
    render: Callable[[list[Row], dict[str, Any], bool], str],
    say_done: bool = False,
) -> int:
    """The command line, [--quick] [--json FILE]: run(plan, progress) measures (quick_plan with --quick),
    render(rows, meta, quick) is printed on stdout, progress lines go to stderr stamped with the seconds
    since the start, "done" last when say_done; --json FILE also writes the rows and meta to FILE."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:5.1f}s] {message}", file=sys.stderr, flush=True)

    rows, meta = run(quick_plan if args.quick else full_plan, progress)
    meta["elapsed_s"] = round(time.monotonic() - started, 2)
    meta["quick"] = args.quick
    print(render(rows, meta, args.quick))
    if say_done:
        progress("done")
    if args.json:
        write_json(args.json, rows, meta)
    return 0
