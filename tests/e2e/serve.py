"""The real `threadbridge serve` process, started on a free port for end-to-end tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

THREADBRIDGE = str(Path(sys.executable).parent / "threadbridge")
LISTENING = re.compile(r"threadbridge: serving on (http://[\d.]+:\d+)")


class ServeProcess:
    """Starts, stops, kills and restarts one `threadbridge serve` in `workdir`."""

    def __init__(self, workdir: Path, config_text: str, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.config = workdir / "threadbridge.toml"
        self.config.write_text(config_text, encoding="utf-8")
        self.env = {**os.environ, **(env or {})}
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            self.env.pop(var, None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"serve-{self.starts}.log"

    def start(self, timeout: float = 30.0) -> str:
        self.starts += 1
        with self.log_path.open("wb") as log:  # the child keeps its own copy of the handle
            self.proc = subprocess.Popen(
                [THREADBRIDGE, "serve", "--config", str(self.config), "--port", "0"],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = LISTENING.search(self.log_path.read_text(encoding="utf-8", errors="replace"))
            if found:
                self.url = found.group(1)
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return self.url
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"serve did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return "\n".join(
            p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(self.workdir.glob("serve-*.log"))
        )

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM: the graceful path; return the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def post(self, thread: str, text: str, **extra: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/api/chat/{thread}", json={"text": text, **extra}, timeout=10)

    def messages(self, thread: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/chat/{thread}/messages", timeout=10)
        response.raise_for_status()
        return list(response.json())

    def wait_messages(self, thread: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until the thread shows `count` finished messages (user and agent)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(thread)
            done = [m for m in found if m["status"] == "done"]
            if len(done) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{thread}: {found}\n--- log ---\n{self.log()}")
            time.sleep(0.05)

    def api(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        response.raise_for_status()
        return response.json()


def command(serve: ServeProcess, *args: str) -> str:
    """`threadbridge ARGS --config` `serve`'s config: what it printed (it must succeed)."""
    done = subprocess.run(
        [THREADBRIDGE, *args, "--config", str(serve.config)],
        cwd=serve.workdir,
        env=serve.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def search(serve: ServeProcess, *args: str) -> list[dict[str, Any]]:
    """`threadbridge conversations search --json ARGS` against `serve`'s config: the items."""
    found: list[dict[str, Any]] = json.loads(
        command(serve, "conversations", "search", "--json", *args)
    )["items"]
    return found
