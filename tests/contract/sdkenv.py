"""Vendor SDKs in environments of their own, for contract tests against our emulators.

Some SDKs pin versions that clash with ours, and two generations of one SDK (rowboat 3 and 5)
cannot share an environment, so each gets a venv under `.sdk-envs/`, made once and reused while
its requirements stay the same. A contract test runs a short script with that venv's Python,
pointed at an emulator on loopback, and reads the JSON the script prints.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ENVS = ROOT / ".sdk-envs"


def sdk_python(name: str, *requirements: str) -> Path:
    """The Python of a venv holding `requirements` (made on first use, then reused)."""
    stamp = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:12]
    env = ENVS / f"{name}-{stamp}"
    python = env / "bin" / "python"
    done = env / ".installed"
    if done.exists():
        return python
    ENVS.mkdir(exist_ok=True)
    # Parallel test workers may want the same venv: one makes it, the others wait.
    with (ENVS / f"{name}-{stamp}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             *requirements],
            check=True,
            timeout=600,
        )  # fmt: skip
        done.write_text("\n".join(requirements), encoding="utf-8")
    return python


def run_sdk(python: Path, script: str, timeout: float = 60, **env: str) -> Any:
    """Run `script` (dedented) with the SDK's Python; return the JSON it printed last.

    `env` adds environment variables (the emulator's URL, a key). Proxies are cleared: the
    script may reach only loopback.
    """
    clean = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run(
        [str(python), "-c", textwrap.dedent(script)],
        env={**clean, **env, "NO_PROXY": "127.0.0.1,localhost"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"SDK script failed ({done.returncode}):\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None
