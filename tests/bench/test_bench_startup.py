"""Benchmark 7 (issue 9): `threadbridge serve` ready — `/healthz` 200 — in ≤ 1.5 s.

The embedded default's shape (the web chat and the demo agent, SQLite), started STARTS times on
the same store; the figure is the median from starting the process to its first 200 on
`/healthz` (the first start also creates the store). When the median misses the target, one
more start runs with PYTHONPROFILEIMPORTTIME (`python -X importtime`) and the top-level packages
whose imports took longest are printed: what a fix would have to trim.
"""

from __future__ import annotations

import os
import re
import statistics
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.bench.common import DEMO_AGENT, THREADBRIDGE, process, write_config
from tests.bench.table import BenchTable

STARTS = int(os.environ.get("BENCH_STARTS", "5"))
TARGET_S = 1.5
BENCH_7 = "7 start-up"
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$", re.MULTILINE)


def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, "demo", DEMO_AGENT + "\n[web]\nenabled = true\n")


def start_once(tmp_path: Path, log: Path, env: dict[str, str] | None = None) -> float:
    """Seconds from starting `threadbridge serve` to /healthz 200."""
    command = [THREADBRIDGE, "serve", "--config", str(config(tmp_path)), "--port", "0"]
    with process(command, log, env) as serve:
        status = httpx.get(f"{serve.url}/healthz", timeout=5).status_code
    if status != 200:
        raise AssertionError(f"/healthz answered {status}; see {log}")
    return serve.ready_s


def import_profile(log: Path) -> tuple[float, list[tuple[str, float]]]:
    """From a PYTHONPROFILEIMPORTTIME log: (all imports in s, [(top-level package, s)])."""
    by_package: Counter[str] = Counter()
    for self_us, _, _, name in IMPORT_LINE.findall(log.read_text(errors="replace")):
        by_package[name.split(".")[0]] += int(self_us)
    total = sum(by_package.values()) / 1e6
    return total, [(name, us / 1e6) for name, us in by_package.most_common(10)]


@pytest.mark.timeout(300)
def test_startup(tmp_path: Path, bench: BenchTable) -> None:
    times = [start_once(tmp_path, tmp_path / f"serve-{n}.log") for n in range(STARTS)]
    median = statistics.median(times)
    print(f"\nstart-up, {STARTS} starts: " + ", ".join(f"{t:.2f}" for t in times) + " s")
    bench.record(BENCH_7, "first start (creates the store)", times[0], "s")
    bench.record(BENCH_7, f"median of {STARTS} starts", median, "s", at_most=TARGET_S)
    if median <= TARGET_S:
        return
    log = tmp_path / "serve-importtime.log"
    start_once(tmp_path, log, {"PYTHONPROFILEIMPORTTIME": "1"})
    total, top = import_profile(log)
    print(f"  imports, profiled (slower than unprofiled), take {total:.2f} s; the costliest:")
    for name, seconds in top:
        print(f"    {name:<24} {seconds:.3f} s")
    bench.record(BENCH_7, "imports, profiled", total, "s")
    bench.record(BENCH_7, "costliest imports", ", ".join(f"{n} {s:.2f}s" for n, s in top[:4]))
