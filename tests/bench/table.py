"""The benchmarks' table of figures: what each measured, its target, PASS or FAIL.

A benchmark takes the `bench` fixture (tests/bench/conftest.py) and records each figure:

    bench.record("3 agent at 2 s", "p99 end-to-end", 2310, "ms", at_most=2500)
    bench.record("3 agent at 2 s", "peak turns in flight", 301)  # no target: information

The table is printed at the end of the session and written as JSON to `.bench-results.json`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Figure:
    benchmark: str
    figure: str
    value: float | str | None  # None: not measured (a target then fails)
    unit: str
    target: str  # "" when the figure is for information
    passed: bool | None  # None when it has no target


class BenchTable:
    """The figures recorded during the session, in order."""

    def __init__(self) -> None:
        self.figures: list[Figure] = []

    def record(
        self,
        benchmark: str,
        figure: str,
        value: float | str | None,
        unit: str = "",
        *,
        at_most: float | None = None,
        at_least: float | None = None,
    ) -> bool | None:
        """Add a figure; with `at_most` / `at_least` it gets a target and PASS/FAIL."""
        target, passed = "", None
        number = value if isinstance(value, int | float) and not math.isnan(value) else None
        if at_most is not None:
            target = f"≤ {at_most:g} {unit}".rstrip()
            passed = number is not None and number <= at_most
        if at_least is not None:
            target = f"≥ {at_least:g} {unit}".rstrip()
            passed = number is not None and number >= at_least
        self.figures.append(Figure(benchmark, figure, value, unit, target, passed))
        return passed

    def add_module_figures(self, name: str, rows: list[tuple[Any, ...]]) -> None:
        """Rows of a module's `figures()`: (figure, value, target, passed)."""
        for figure, value, target, passed in rows:
            self.figures.append(Figure(name, str(figure), value, "", str(target or ""), passed))


def _value(figure: Figure) -> str:
    value = figure.value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        text = f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    else:
        text = str(value)
    return f"{text} {figure.unit}".rstrip()


def render(figures: list[Figure]) -> list[str]:
    """The table's lines: benchmark, figure, value, target, PASS/FAIL; then the count."""
    verdicts = {True: "PASS", False: "FAIL", None: ""}
    ordered = sorted(figures, key=lambda f: f.benchmark)  # "1 …" to "7 …", then the others
    rows = [(f.benchmark, f.figure, _value(f), f.target, verdicts[f.passed]) for f in ordered]
    heads = ("benchmark", "figure", "value", "target", "")
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    checked = [f for f in figures if f.passed is not None]
    failed = sum(1 for f in checked if not f.passed)
    lines.append(f"{len(checked) - failed} of {len(checked)} targets PASS, {failed} FAIL")
    return lines


def write_json(figures: list[Figure], path: Path) -> None:
    """The figures, when and where they were measured, as JSON (for the README's table)."""
    document = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "figures": [asdict(f) for f in figures],
    }
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
