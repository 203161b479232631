"""The `bench` fixture, and the one table of every figure printed after the benchmarks run.

Benchmarks record figures with `bench.record(...)` (see tests/bench/table.py). A bench module
may instead define `figures()` returning `(figure, value, target, passed)` tuples; they join the
table under the module's name. The table is also written to `.bench-results.json` (gitignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.bench.table import BenchTable, render, write_json

RESULTS = Path(__file__).resolve().parents[2] / ".bench-results.json"
_TABLE = pytest.StashKey[BenchTable]()


def _table(config: pytest.Config) -> BenchTable:
    if _TABLE not in config.stash:
        config.stash[_TABLE] = BenchTable()
    return config.stash[_TABLE]


@pytest.fixture(scope="session")
def bench(pytestconfig: pytest.Config) -> BenchTable:
    return _table(pytestconfig)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Add the figures of modules that report through a `figures()` function."""
    table = _table(session.config)
    seen: set[str] = set()
    for item in session.items:
        module = getattr(item, "module", None)
        figures = getattr(module, "figures", None)
        if module is None or module.__name__ in seen or not callable(figures):
            continue
        seen.add(module.__name__)
        table.add_module_figures(module.__name__.rsplit(".", 1)[-1], list(figures()))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    table = _table(config)
    if not table.figures:
        return
    terminalreporter.section("benchmarks")
    for line in render(table.figures):
        terminalreporter.write_line(line)
    write_json(table.figures, RESULTS)
    terminalreporter.write_line(f"(also written to {RESULTS.name})")
