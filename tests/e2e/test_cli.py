"""The installed `threadbridge` command, run as a real process against a config in tmp_path."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

THREADBRIDGE = Path(sys.executable).parent / "threadbridge"
COMMANDS = ("serve", "chat", "conversations", "routes", "emulate", "db", "config")

CONFIG = """\
default_agent = "demo"

[store]
url = "sqlite+aiosqlite:///{db}"

[bridge]
poll_s = 0.05
max_message_chars = 50

[agents.demo]
service = "local"

[agents.other]
service = "local"
greeting = "I am the other agent."

[[routes]]
source = "web"
channel = "lobby"
agent = "other"

[web]
enabled = true
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment whose config file lives in tmp_path, with its database beside it."""
    (tmp_path / "tb.toml").write_text(CONFIG.format(db=tmp_path / "tb.db"), encoding="utf-8")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("THREADBRIDGE_")}
    clean.update(THREADBRIDGE_CONFIG=str(tmp_path / "tb.toml"), PYTHONIOENCODING="utf-8")
    return clean


def tb(
    env: dict[str, str], cwd: Path, *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(THREADBRIDGE), *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def search(env: dict[str, str], cwd: Path, *args: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(ok(tb(env, cwd, "conversations", "search", *args, "--json")))
    return body


def test_help_lists_every_command(env: dict[str, str], tmp_path: Path) -> None:
    out = ok(tb(env, tmp_path, "--help"))
    for command in COMMANDS:
        assert re.search(rf"^\W*{command}\b", out, re.MULTILINE), (command, out)
    search_help = ok(tb(env, tmp_path, "conversations", "search", "--help"))
    for option in (
        "--source",
        "--workspace",
        "--channel",
        "--user",
        "--agent",
        "--text",
        "--since",
        "--until",
        "--limit",
        "--offset",
        "--reversed",
        "--json",
    ):
        assert option in search_help, option
    assert "--agent" in ok(tb(env, tmp_path, "chat", "--help"))


def test_db_upgrade_creates_the_database(env: dict[str, str], tmp_path: Path) -> None:
    out = ok(tb(env, tmp_path, "db", "upgrade"))
    assert "up to date" in out
    with sqlite3.connect(tmp_path / "tb.db") as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master")}
    assert {"conversations", "messages", "inbox", "outbox", "alembic_version"} <= tables
    ok(tb(env, tmp_path, "db", "upgrade"))  # again: nothing to do, still fine


def test_config_check(env: dict[str, str], tmp_path: Path) -> None:
    out = ok(tb(env, tmp_path, "config", "check"))
    assert f"{tmp_path / 'tb.toml'}: ok" in out
    assert "demo (local)" in out and "routes: 1" in out and "channel web: on" in out

    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.format(db=tmp_path / "x.db").replace('agent = "other"', 'agent = "x"'))
    result = tb(env, tmp_path, "config", "check", "--config", str(bad))
    assert result.returncode == 2
    assert "routes[0].agent" in result.stderr and "unknown agent 'x'" in result.stderr


def test_chat_through_stdin_then_search_and_show(env: dict[str, str], tmp_path: Path) -> None:
    result = tb(env, tmp_path, "chat", stdin="hello\n/new\nagain\n/quit\n", timeout=60)
    out = ok(result)
    assert "You said: “hello”" in out
    assert "You said: “again”" in out
    assert "a new conversation starts" in out
    assert out.index("You said: “hello”") < out.index("You said: “again”")

    found = search(env, tmp_path, "--source", "cli")
    assert found["total"] == 2
    assert {i["source"] for i in found["items"]} == {"cli"}
    assert {i["agent"] for i in found["items"]} == {"demo"}
    newest, oldest = found["items"]
    assert (newest["status"], oldest["status"]) == ("open", "closed")
    assert newest["thread_key"] == oldest["thread_key"]  # one terminal thread, two conversations

    # The rest only read the store: run them side by side.
    s = ("conversations", "search")
    calls = {
        "web": (*s, "--source", "web", "--json"),
        "text": (*s, "--text", "again", "--json"),
        "oldest": (*s, "--oldest-first", "--json"),
        "paged": (*s, "--limit", "1", "--offset", "1", "--json"),
        "dates": (*s, "--since", "2000-01-01", "--until", "2999-01-01T00:00:00", "--json"),
        "future": (*s, "--since", "2999-01-01", "--json"),
        "table": (*s, "--source", "cli"),
        "none": (*s, "--source", "slack"),
        "show": ("conversations", "show", oldest["id"]),
        "json": ("conversations", "show", newest["id"], "--json"),
    }
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(tb, env, tmp_path, *args) for name, args in calls.items()}
        outs = {name: ok(future.result()) for name, future in futures.items()}

    assert json.loads(outs["web"])["total"] == 0
    assert [i["id"] for i in json.loads(outs["text"])["items"]] == [newest["id"]]
    assert [i["id"] for i in json.loads(outs["oldest"])["items"]] == [oldest["id"], newest["id"]]
    assert json.loads(outs["dates"])["total"] == 2
    assert json.loads(outs["future"])["total"] == 0
    paged = json.loads(outs["paged"])
    assert (paged["total"], [i["id"] for i in paged["items"]]) == (2, [oldest["id"]])

    table = outs["table"]
    assert table.splitlines()[0].split() == [
        "id", "source", "agent", "status", "created", "thread", "user"
    ]  # fmt: skip
    assert newest["id"] in table and oldest["id"] in table
    assert "1-2 of 2" in table
    assert "no conversations match" in outs["none"]

    shown = outs["show"]
    assert f"conversation {oldest['id']} · cli · agent demo · closed" in shown
    assert "hello" in shown and "You said: “hello”" in shown and "again" not in shown
    body = json.loads(outs["json"])
    assert body["id"] == newest["id"]
    assert [(m["role"], m["content"]) for m in body["messages"]][0] == ("user", "again")
    assert [m["role"] for m in body["messages"]] == ["user", "agent"]


def test_chat_with_a_chosen_agent_keeps_it_after_new(env: dict[str, str], tmp_path: Path) -> None:
    lines = " \none\n/new\ntwo\n"  # the blank line opens nothing
    out = ok(tb(env, tmp_path, "chat", "--agent", "other", stdin=lines, timeout=60))
    assert "agent other" in out.splitlines()[0]
    assert out.count("I am the other agent.") == 2, out
    found = search(env, tmp_path, "--source", "cli")
    assert found["total"] == 2
    assert [i["agent"] for i in found["items"]] == ["other", "other"]


def test_chat_refuses_an_empty_line_and_an_unknown_agent(
    env: dict[str, str], tmp_path: Path
) -> None:
    out = ok(tb(env, tmp_path, "chat", stdin=f"   \n{'x' * 51}\nreal\n", timeout=60))
    assert "empty" in out and "You said: “real”" in out
    assert "51 characters long; the limit is 50" in out and "You said: “x" not in out
    (item,) = search(env, tmp_path)["items"]
    body = json.loads(ok(tb(env, tmp_path, "conversations", "show", item["id"], "--json")))
    assert [m["content"] for m in body["messages"] if m["role"] == "user"] == ["real"]

    result = tb(env, tmp_path, "chat", "--agent", "nosuch", stdin="hi\n")
    assert result.returncode == 2
    assert "nosuch" in result.stderr and "demo, other" in result.stderr


def test_show_and_search_errors(env: dict[str, str], tmp_path: Path) -> None:
    missing = tb(env, tmp_path, "conversations", "show", "unknown-id")
    assert missing.returncode == 1
    assert "no conversation 'unknown-id'" in missing.stderr
    assert "Traceback" not in missing.stderr

    bogus = tb(env, tmp_path, "conversations", "search", "--status", "bogus")
    assert bogus.returncode == 2
    assert "open, closed or failed" in bogus.stderr
    for args in (("--limit", "500"), ("--offset", "-1"), ("--since", "yesterday")):
        result = tb(env, tmp_path, "conversations", "search", *args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr


def test_routes_list_shows_the_files_route_and_the_default(
    env: dict[str, str], tmp_path: Path
) -> None:
    out = ok(tb(env, tmp_path, "routes", "list"))
    lines = out.splitlines()
    assert re.search(r"^channel\s+web\s+\*\s+lobby\s+other\s+config$", out, re.MULTILINE), out
    assert re.search(r"^default\s+\*\s+\*\s+\*\s+demo\s+config$", out, re.MULTILINE), out
    assert lines[0].split()[0] == "tier"
    body = json.loads(ok(tb(env, tmp_path, "routes", "list", "--json")))
    assert body["default_agent"] == "demo"
    assert [(r["source"], r["channel"], r["agent"]) for r in body["routes"]] == [
        ("web", "lobby", "other")
    ]


def test_emulate_engage_serves_and_stops_on_sigterm(env: dict[str, str], tmp_path: Path) -> None:
    unknown = tb(env, tmp_path, "emulate", "nosuch", "--port", "0")
    assert unknown.returncode == 2
    assert "nosuch" in unknown.stderr and "engage" in unknown.stderr

    proc = subprocess.Popen(
        [str(THREADBRIDGE), "emulate", "engage", "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=tmp_path,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    try:
        url = None
        deadline = time.monotonic() + 20
        seen: list[str] = []
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(line)
            match = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
            url = match.group(1) if match else None
        assert url is not None, f"no 'serving on' line: {seen}"
        assert not url.endswith(":0")

        headers = {"X-Api-Key": "any-key", "X-Org-Id": "org-1"}
        created = httpx.post(
            f"{url}/v1/conversations", json={"source": "cli"}, headers=headers, timeout=5
        )
        assert created.status_code == 200, created.text
        assert created.json()["source"] == "cli" and created.json()["id"]
        refused = httpx.post(f"{url}/v1/conversations", json={}, timeout=5)
        assert refused.status_code == 401

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        pumping.join(timeout=5)  # the pipe ends with the process; then close our end
        if proc.stderr is not None:
            proc.stderr.close()
