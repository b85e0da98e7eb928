"""Figures of a run, each next to its baseline from the same run, and the printed table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import msgspec


class Figure(msgspec.Struct, kw_only=True):
    """One Eddy figure and the baseline it is compared with.

    `ratio` is Eddy / baseline. For rates (`higher_is_better`) below 1 means
    slower than the baseline; for latencies and CPU costs above 1 means worse.
    """

    name: str
    unit: str
    eddy: float
    baseline: float
    baseline_name: str
    higher_is_better: bool
    note: str = ""

    @property
    def ratio(self) -> float:
        if not (self.baseline and math.isfinite(self.baseline) and math.isfinite(self.eddy)):
            return math.nan
        return self.eddy / self.baseline

    def to_json(self) -> dict[str, object]:
        data = msgspec.structs.asdict(self)
        data["ratio"] = None if math.isnan(self.ratio) else round(self.ratio, 3)
        for key in ("eddy", "baseline"):
            if isinstance(data[key], float) and not math.isfinite(data[key]):
                data[key] = None
        return data


def _number(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    if unit == "ms":
        return f"{value:.2f} {unit}"
    if unit == "/s":
        return f"{value:,.0f}{unit}"
    return f"{value:,.0f} {unit}"


def table(figures: Sequence[Figure]) -> str:
    """The figures as a Markdown table (pasteable into the README)."""
    rows = [("figure", "eddy", "baseline", "ratio", "baseline is")]
    for f in figures:
        ratio = "n/a" if math.isnan(f.ratio) else f"{f.ratio:.2f}x"
        name = f"{f.name} ({f.note})" if f.note else f.name
        rows.append(
            (name, _number(f.eddy, f.unit), _number(f.baseline, f.unit), ratio, f.baseline_name)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = (False, True, True, True, False)

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(row, widths, right, strict=True)
        ]
        return "| " + " | ".join(cells) + " |"

    rule = "|".join(
        [
            "",
            *(
                ("-" * (w + 1) + ":") if r else "-" * (w + 2)
                for w, r in zip(widths, right, strict=True)
            ),
            "",
        ]
    )
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


def cpu_table(phases: Mapping[str, Mapping[str, float]], walls: Mapping[str, float]) -> str:
    """Cores used by each process during each phase (2.00 = both cores all the time);
    phases shorter than half a second are left out (too short to say)."""
    columns = [
        "loadgen",
        "server",
        "consumer",
        "projector",
        "redis",
        "postgres",
        "other",
        "machine",
    ]
    alias = {
        "web": "server",
        "baseline-web": "server",
        "worker": "consumer",
        "relay": "consumer",
        "pg-baseline": "projector",
    }
    rows = [["phase", *columns]]
    for phase, cores in phases.items():
        if walls[phase] < 0.5:
            continue
        merged: dict[str, float] = {}
        for name, value in cores.items():
            key = alias.get(name, name)
            merged[key] = merged.get(key, 0.0) + value
        rows.append([phase, *(f"{merged[c]:.2f}" if c in merged else "-" for c in columns)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) + 1)]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )
