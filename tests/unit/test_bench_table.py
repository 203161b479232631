"""The benchmarks' PASS/FAIL table (tests/bench/table.py): targets, missing figures, JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.bench.table import BenchTable, render, write_json


def test_targets_pass_and_fail_and_a_missing_figure_fails() -> None:
    table = BenchTable()
    assert table.record("3 agent", "p99", 2310.0, "ms", at_most=2500) is True
    assert table.record("3 agent", "answered", 99.5, "%", at_least=100) is False
    assert table.record("3 agent", "never measured", None, "ms", at_most=5) is False
    assert table.record("3 agent", "nan", float("nan"), at_least=0.7) is False
    assert table.record("1 bare", "max sustained", 300, "events/s") is None
    lines = render(table.figures)
    cells = [re.split(r"\s{2,}", line) for line in lines[2:-1]]
    assert cells == [  # sorted by benchmark
        ["1 bare", "max sustained", "300 events/s"],
        ["3 agent", "p99", "2310 ms", "≤ 2500 ms", "PASS"],
        ["3 agent", "answered", "99.5 %", "≥ 100 %", "FAIL"],
        ["3 agent", "never measured", "—", "≤ 5 ms", "FAIL"],
        ["3 agent", "nan", "—", "≥ 0.7", "FAIL"],
    ]
    assert lines[-1] == "1 of 4 targets PASS, 3 FAIL"


def test_module_figures_join_and_everything_is_written_as_json(tmp_path: Path) -> None:
    table = BenchTable()
    table.record("7 start-up", "median", 1.2, "s", at_most=1.5)
    table.add_module_figures("test_bench_store", [("lookup p99", "0.4 ms", "≤ 1 ms", True)])
    path = tmp_path / "results.json"
    write_json(table.figures, path)
    figures = json.loads(path.read_text(encoding="utf-8"))["figures"]
    assert [(f["figure"], f["target"], f["passed"]) for f in figures] == [
        ("median", "≤ 1.5 s", True),
        ("lookup p99", "≤ 1 ms", True),
    ]
