"""Routing and search through the real `threadbridge serve` and the `threadbridge` command:
routes set/unset/history/explain, moving open threads, situations and metadata passed on to
the agent services (their emulators), search filters, updates, exports, and 4xx on every bad
parameter."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import pty
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.agents.emulators import engage as engage_emulator
from core.agents.emulators import sessions as sessions_emulator
from core.sql import conversations, messages
from core.store import Store
from tests.e2e.serve import ServeProcess
from tests.servers import run_asgi

# Each `threadbridge` command is a new process: on a busy machine these take minutes.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

THREADBRIDGE = str(Path(sys.executable).parent / "threadbridge")
TOKEN = "e2e-admin-token"
KEY = "e2e-service-key"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENV = {
    "TB_E2E_ADMIN_TOKEN": TOKEN,
    "TB_E2E_KEY": KEY,
    "TB_E2E_ORG": "org-e2e",
    "PYTHONIOENCODING": "utf-8",
}
AGENT_ID = "9bb48ef4-b6f7-4dd8-a5ea-ab775e2e8d1b"
SEEDED = 320


def config_text(tmp_path: Path, sessions: str, engage: str) -> str:
    fast = "timeout_s = 5\nretries = 1\nbackoff_s = 0.05\n"
    return f"""
default_agent = "demo"

[store]
url = "sqlite+aiosqlite:///{tmp_path}/tb.db"

[bridge]
poll_s = 0.05

[admin]
token_env = "TB_E2E_ADMIN_TOKEN"

[agents.demo]
service = "local"

[agents.other]
service = "local"
greeting = "I am the other agent."

[agents.coach]
service = "sessions"
base_url = "{sessions}"
api_key_env = "TB_E2E_KEY"
agent_id = "{AGENT_ID}"
situation = "You are a coach."
{fast}
[agents.pensions]
service = "engage-conversations"
base_url = "{engage}"
api_key_env = "TB_E2E_KEY"
org_id_env = "TB_E2E_ORG"
agent = "pensions-questions-latest"
{fast}
[[routes]]
source = "web"
agent = "demo"

[[routes]]
source = "slack"
workspace = "T1"
agent = "other"

[web]
enabled = true
"""


@pytest.fixture
def services() -> Iterator[tuple[str, str]]:
    with (
        run_asgi(sessions_emulator.create_app(api_keys={KEY})) as sessions,
        run_asgi(engage_emulator.create_app(api_keys={KEY})) as engage,
    ):
        yield sessions, engage


@pytest.fixture
def serve(tmp_path: Path, services: tuple[str, str]) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path, config_text(tmp_path, *services), env=ENV)
    try:
        yield process
    finally:
        process.stop()


def tb(serve: ServeProcess, *args: str, stderr: Any = subprocess.PIPE) -> Any:
    env = {k: v for k, v in serve.env.items() if not k.startswith("THREADBRIDGE_")}
    env["THREADBRIDGE_CONFIG"] = str(serve.config)
    return subprocess.run(
        [THREADBRIDGE, *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=serve.workdir,
        timeout=60,
        check=False,
    )


def ok(result: Any) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return str(result.stdout)


def refused_commands(serve: ServeProcess, cases: list[tuple[tuple[str, ...], int, str]]) -> None:
    """Run commands that must fail (side by side: they change nothing), each with its exit
    code and a reason on stderr, never a traceback."""
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda case: tb(serve, *case[0]), cases))
    for (args, code, words), result in zip(cases, results, strict=True):
        assert result.returncode == code, (args, result.stdout, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def tb_json(serve: ServeProcess, *args: str) -> Any:
    return json.loads(ok(tb(serve, *args, "--json")))


def api(serve: ServeProcess, method: str, path: str, **kwargs: Any) -> httpx.Response:
    if "content" in kwargs:  # a raw body, sent as JSON
        kwargs["headers"] = {**AUTH, "Content-Type": "application/json"}
    kwargs.setdefault("headers", AUTH)
    return httpx.request(method, f"{serve.url}{path}", timeout=15, **kwargs)


def good(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    detail = json.dumps(response.json()["detail"])
    for word in words:
        assert word in detail, (word, detail)


def converse(serve: ServeProcess, thread: str, text: str, done: int) -> dict[str, Any]:
    """Post to the web chat, wait for the answer, and return the thread's conversation."""
    assert serve.post(thread, text, user="ann").status_code == 202
    serve.wait_messages(thread, done)
    found = good(api(serve, "GET", "/api/conversations", params={"data": f"thread_id={thread}"}))
    return dict(found["items"][0])


def session_situation(sessions: str, remote_id: str) -> str:
    reply = httpx.get(f"{sessions}/sessions/{remote_id}", headers={"Authorization": KEY})
    reply.raise_for_status()
    return str(reply.json()["situation"])


def test_routes_through_the_cli_and_the_api(serve: ServeProcess, services: tuple[str, str]) -> None:
    sessions, _ = services
    serve.start()
    assert httpx.get(f"{serve.url}/api/routes", timeout=5).status_code == 401
    listed = good(api(serve, "GET", "/api/routes"))
    assert listed["default_agent"] == "demo"
    assert [(r["tier"], r["source"], r["origin"]) for r in listed["routes"]] == [
        ("workspace", "slack", "config"),
        ("source", "web", "config"),
    ]

    alpha = converse(serve, "alpha", "hello", 2)
    assert alpha["agent"] == "demo"

    # The CLI, another process, moves the web chat and its open threads to "other".
    out = ok(tb(serve, "routes", "set", "--source", "web", "other", "--move-open", "--by", "ann"))
    assert "route web/*/* → other" in out and "moved 1 open thread" in out
    time.sleep(1.2)  # the server sees another process's route within Router.cache_s
    moved = converse(serve, "alpha", "again", 2)  # the thread shows its new conversation
    assert moved["agent"] == "other" and moved["id"] != alpha["id"]
    assert moved["data"]["previous_conversation_id"] == alpha["id"]
    old = good(api(serve, "GET", f"/api/conversations/{alpha['id']}"))
    assert old["status"] == "closed" and old["data"]["moved_to_agent"] == "other"
    assert old["next_conversation_id"] == moved["id"]
    shown = ok(tb(serve, "conversations", "show", alpha["id"]))
    assert f"moved to agent other; continued in {moved['id']}" in shown

    table = ok(tb(serve, "routes", "list"))
    assert "config(overridden)" in table and " ann " in table
    body = tb_json(serve, "routes", "list")
    web = [r for r in body["routes"] if r["source"] == "web"]
    assert [(r["origin"], r["agent"], r["overridden"], r["set_by"]) for r in web] == [
        ("admin", "other", False, "ann"),
        ("config", "demo", True, None),
    ]
    assert web[0]["set_at"]

    explained = ok(tb(serve, "routes", "explain", "web:-/-/alpha"))
    assert "agent: other" in explained
    assert f"continues conversation {moved['id']} with agent other" in explained
    steps = good(api(serve, "GET", "/api/routes/explain", params={"thread": "web:-/-/new"}))
    assert steps["agent"] == "other" and steps["conversation"] is None
    assert [(s["tier"], s["agent"], s["chosen"]) for s in steps["steps"]] == [
        ("channel", None, False),
        ("workspace", None, False),
        ("source", "other", True),
        ("source", "demo", False),
        ("default", "demo", False),
    ]

    # The API routes the web chat to a sessions agent with a situation, then changes it.
    put = {"source": "web", "agent": "coach", "situation": "Coach the web.", "set_by": "bo"}
    assert good(api(serve, "PUT", "/api/routes", json=put))["change"]["old_agent"] == "other"
    time.sleep(0.1)
    beta = converse(serve, "beta", "coach me", 2)
    assert beta["agent"] == "coach"
    assert session_situation(sessions, beta["remote_id"]) == "Coach the web."
    changed = good(api(serve, "PUT", "/api/routes", json={**put, "situation": "Shorter."}))
    assert (changed["situations_updated"], changed["situation_failures"]) == (1, [])
    assert session_situation(sessions, beta["remote_id"]) == "Shorter."
    # ...and the CLI, with clients it builds from the config
    out = ok(tb(serve, "routes", "set", "--source", "web", "coach", "--situation", "Via CLI."))
    assert "new situation sent to 1 open session" in out
    assert session_situation(sessions, beta["remote_id"]) == "Via CLI."

    removed = good(api(serve, "DELETE", "/api/routes", params={"source": "web", "set_by": "cy"}))
    assert removed["change"]["action"] == "unset"
    history = good(api(serve, "GET", "/api/routes/history", params={"limit": 10}))
    assert history["total"] == 5
    assert [(c["action"], c["who"], c["old_agent"], c["new_agent"]) for c in history["items"]] == [
        ("unset", "cy", "coach", None),
        ("set", history["items"][1]["who"], "coach", "coach"),
        ("set", "bo", "coach", "coach"),
        ("set", "bo", "other", "coach"),
        ("set", "ann", None, "other"),
    ]
    assert history["items"][1]["who"].startswith("cli")
    assert history["items"][4]["moved"] == 1
    cli_history = tb_json(serve, "routes", "history", "--limit", "2")
    assert cli_history["total"] == 5 and [c["action"] for c in cli_history["items"]] == [
        "unset",
        "set",
    ]
    assert "Shorter. → Via CLI." in ok(tb(serve, "routes", "history"))

    bad_routes(serve)


def bad_routes(serve: ServeProcess) -> None:
    put = {"source": "slack", "workspace": "T1", "agent": "demo"}
    refused(api(serve, "PUT", "/api/routes", json={**put, "agent": "ghost"}), 422, "ghost")
    refused(
        api(serve, "PUT", "/api/routes", json={"source": "slack", "channel": "C1", "agent": "x"}),
        422,
        "unknown agent",
    )
    refused(
        api(
            serve, "PUT", "/api/routes", json={"source": "slack", "channel": "C1", "agent": "demo"}
        ),
        422,
        "needs its workspace",
    )
    refused(api(serve, "PUT", "/api/routes", json={**put, "source": "pager"}), 422, "pager")
    refused(api(serve, "PUT", "/api/routes", json={"source": "slack"}), 422, "agent")
    refused(api(serve, "PUT", "/api/routes", json={**put, "color": "red"}), 422, "color")
    refused(api(serve, "PUT", "/api/routes", json={**put, "move_open": "maybe"}), 422)
    refused(api(serve, "PUT", "/api/routes", content=b"not json"), 422)
    lone = b'{"source": "web", "agent": "demo", "situation": "\\ud800"}'
    refused(api(serve, "PUT", "/api/routes", content=lone), 422, "situation")
    refused(api(serve, "PUT", "/api/routes", json={**put, "workspace": "a/b"}), 422, "'/'")
    refused(api(serve, "DELETE", "/api/routes"), 422, "source")
    refused(api(serve, "DELETE", "/api/routes", params={"source": "pager"}), 422, "pager")
    refused(
        api(serve, "DELETE", "/api/routes", params={"source": "slack", "workspace": "T1"}),
        404,
        "config file",
    )
    refused(api(serve, "GET", "/api/routes/history", params={"limit": 0}), 422)
    refused(api(serve, "GET", "/api/routes/history", params={"offset": -1}), 422)
    refused(api(serve, "GET", "/api/routes/explain"), 422)
    refused(api(serve, "GET", "/api/routes/explain", params={"thread": "slack"}), 422, "thread")

    r = "routes"
    refused_commands(
        serve,
        [
            ((r, "set", "--source", "slack", "--channel", "C1", "demo"), 2, "needs its workspace"),
            ((r, "set", "--source", "pager", "demo"), 2, "unknown source"),
            ((r, "set", "--source", "web", "ghost"), 2, "unknown agent 'ghost'"),
            ((r, "set", "demo"), 2, "--source"),
            ((r, "unset", "--source", "discord"), 1, "no run-time route"),
            ((r, "explain", "nope"), 2, "not a thread"),
            ((r, "history", "--limit", "0"), 2, "limit"),
        ],
    )


def seed(url: str, count: int) -> None:
    """Conversations as the platforms make them, written straight into the database."""

    async def run() -> None:
        store = Store(url)
        await store.migrate()
        now = datetime.now(UTC) - timedelta(days=1)
        rows, texts = [], []
        for n in range(count):
            source = ("slack", "discord", "telegram")[n % 3]
            chat = "-1001234" if source == "telegram" else f"C{n % 5}"
            data: dict[str, Any] = {"n": n, "batch": "seed", "even": n % 2 == 0}
            if source == "slack":
                data["permalink"] = f"https://example.slack.com/archives/{chat}/p{n}"
            elif source == "discord":
                data["jump_url"] = f"https://discord.com/channels/G/{chat}/{n}"
            else:
                data["chat_id"] = -1001234
            cid = f"seed-{n:04d}"
            workspace = {"slack": "T9", "discord": "G9", "telegram": "-"}[source]
            thread = f"topic-{n}" if source == "telegram" else str(n)
            rows.append(
                {
                    "id": cid,
                    "thread_key": f"{source}:{workspace}/{chat}/{thread}",
                    "source": source,
                    "workspace": workspace,
                    "channel": chat,
                    "user_id": f"U{n % 7}",
                    "agent": "demo",
                    "data": data,
                    "status": "failed" if n % 10 == 0 else "closed",
                    "created": now + timedelta(seconds=n),
                    "updated": now + timedelta(seconds=n),
                }
            )
            for k, (role, text) in enumerate(
                [("user", f"question {n} about pensions"), ("agent", f'answer {n}, comma, "q"')]
            ):
                texts.append(
                    {
                        "conversation_id": cid,
                        "role": role,
                        "kind": "message",
                        "content": text,
                        "tool_calls": [{"id": "t1", "name": "lookup", "arguments": "{}"}]
                        if role == "agent" and n == 1
                        else None,
                        "created": now + timedelta(seconds=n, milliseconds=k),
                    }
                )

        def job(conn: Any) -> None:
            conn.execute(conversations.insert(), rows)
            conn.execute(messages.insert(), texts)

        await store.write(job)
        await store.close()

    asyncio.run(run())


def test_search_update_and_export(
    serve: ServeProcess, services: tuple[str, str], tmp_path: Path
) -> None:
    _, engage = services
    seed(f"sqlite+aiosqlite:///{tmp_path}/tb.db", SEEDED)
    serve.start()
    good(api(serve, "PUT", "/api/routes", json={"source": "web", "agent": "pensions"}))
    time.sleep(0.1)
    web = converse(serve, "gamma", "What about my pension pot?", 2)
    assert web["agent"] == "pensions" and web["remote_id"]

    def search(**params: Any) -> Any:
        return good(api(serve, "GET", "/api/conversations", params=params))

    assert search()["total"] == SEEDED + 1
    assert search(source="telegram")["total"] == SEEDED // 3
    both = search(data=["batch=seed", "even=true"], source="slack", limit=200)
    assert both["total"] == len([n for n in range(SEEDED) if n % 3 == 0 and n % 2 == 0])
    assert {i["data"]["even"] for i in both["items"]} == {True}
    assert [i["id"] for i in search(data="n=7")["items"]] == ["seed-0007"]
    assert search(text="pension")["total"] == SEEDED + 1  # prefix: pensions, pension
    assert [i["id"] for i in search(text='question "17"')["items"]] == ["seed-0017"]
    assert [i["id"] for i in search(text='"answer 18"')["items"]] == ["seed-0018"]
    assert search(text="pot", source="web")["items"][0]["id"] == web["id"]
    assert search(status="failed")["total"] == SEEDED // 10
    page = search(source="slack", limit=5, offset=5, reversed="false")
    assert [i["data"]["n"] for i in page["items"]] == [15, 18, 21, 24, 27]
    cli = tb_json(serve, "conversations", "search", "--data", "n=7", "--text", "question")
    assert [i["id"] for i in cli["items"]] == ["seed-0007"]

    found = search(data="n=2")["items"] + search(data="n=1")["items"]
    links = {i["source"]: i["link"] for i in found}
    assert links["telegram"] == "https://t.me/c/1234/2"
    assert links["discord"] == "https://discord.com/channels/G/C1/1"
    shown = ok(tb(serve, "conversations", "show", "seed-0000"))
    assert "link https://example.slack.com/archives/C0/p0" in shown
    assert "→ tool call lookup({})" in ok(tb(serve, "conversations", "show", "seed-0001"))

    # PATCH: merged key by key; the Engage conversation gets it too
    patched = good(
        api(
            serve,
            "PATCH",
            f"/api/conversations/{web['id']}",
            json={"data": {"case": "C-1", "user_agent": None}, "source": "web-import"},
        )
    )
    assert patched["mirrored"] is True and patched["source"] == "web-import"
    assert patched["data"]["case"] == "C-1" and "user_agent" not in patched["data"]
    remote = httpx.get(
        f"{engage}/v1/conversations/{web['remote_id']}",
        headers={"X-Api-Key": KEY, "X-Org-Id": "org-e2e"},
    ).json()
    assert remote["source"] == "web-import" and remote["data"] == patched["data"]
    updated = tb_json(
        serve, "conversations", "update", "seed-0004", "--data", "n=", "--data", "tag=x"
    )
    assert updated["mirrored"] is False and "n" not in updated["data"]
    assert updated["data"]["tag"] == "x"
    out = ok(tb(serve, "conversations", "update", "seed-0004", "--source", "archive"))
    assert "updated conversation seed-0004" in out and "source archive" in out

    export_checks(serve, tmp_path)
    bad_search_and_updates(serve, web["id"])


def export_checks(serve: ServeProcess, tmp_path: Path) -> None:
    lines = ok(tb(serve, "conversations", "export", "--source", "slack")).splitlines()
    assert len(lines) == len(range(0, SEEDED, 3))
    first = json.loads(lines[0])
    assert (
        first["source"] == "slack" and first["id"] == f"seed-{max(range(0, SEEDED, 3)):04d}"
    )  # newest first
    assert [m["role"] for m in first["messages"]] == ["user", "agent"]

    target = tmp_path / "all.csv"
    result = tb(serve, "conversations", "export", "--format", "csv", "--output", str(target))
    assert f"exported {SEEDED + 1} conversation(s) to {target}" in result.stderr
    with target.open(encoding="utf-8", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2 * (SEEDED + 1)
    row = next(r for r in table if r["conversation_id"] == "seed-0005" and r["role"] == "agent")
    assert row["content"] == 'answer 5, comma, "q"' and json.loads(row["data"])["n"] == 5

    filtered = ok(
        tb(
            serve,
            "conversations",
            "export",
            "--data",
            "even=false",
            "--oldest-first",
            "--text",
            "q",
        )
    )
    got = [json.loads(line)["data"]["n"] for line in filtered.splitlines()]
    assert got == [n for n in range(SEEDED) if n % 2]

    # On a terminal, the export shows a progress bar on stderr.
    master, slave = pty.openpty()
    shown: list[bytes] = []

    def pump() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            shown.append(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        result = tb(serve, "conversations", "export", "--format", "csv", stderr=slave)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    assert result.returncode == 0
    assert io.StringIO(result.stdout).readline().startswith("conversation_id,")
    terminal = b"".join(shown).decode("utf-8", "replace")
    assert "exporting" in terminal and f"exported {SEEDED + 1}" in terminal


def bad_search_and_updates(serve: ServeProcess, web_id: str) -> None:
    for params, words in (
        ({"status": "bogus"}, ("status",)),
        ({"limit": 0}, ("limit",)),
        ({"limit": 201}, ("limit",)),
        ({"offset": -1}, ("offset",)),
        ({"since": "yesterday"}, ("since",)),
        ({"until": "2025-13-01"}, ("until",)),
        ({"since": "2025-02-01", "until": "2025-01-01"}, ("before since",)),
        ({"data": "novalue"}, ("KEY=VALUE",)),
        ({"data": ["k=1", "k=2"]}, ("given twice",)),
        ({"data": "bad key=1"}, ("key",)),
        ({"text": ""}, ("text",)),
        ({"text": "!!!"}, ("no words",)),
        ({"text": "x" * 501}, ("text",)),
        ({"reversed": "sideways"}, ("reversed",)),
    ):
        refused(api(serve, "GET", "/api/conversations", params=params), 422, *words)
    refused(api(serve, "GET", "/api/conversations/nope"), 404, "nope")

    path = f"/api/conversations/{web_id}"
    refused(api(serve, "PATCH", "/api/conversations/nope", json={"source": "x"}), 404, "nope")
    refused(api(serve, "PATCH", path, json={}), 422, "nothing to change")
    refused(api(serve, "PATCH", path, json={"source": "has space"}), 422, "source")
    refused(api(serve, "PATCH", path, json={"data": [1, 2]}), 422, "data")
    refused(api(serve, "PATCH", path, json={"data": {}, "extra": 1}), 422, "extra")
    refused(api(serve, "PATCH", path, content=b"{"), 422)
    refused(api(serve, "PATCH", path, content=b'{"data": {"k": "\\udc00"}}'), 422, "Unicode")

    c = "conversations"
    refused_commands(
        serve,
        [
            ((c, "search", "--data", "novalue"), 2, "--data"),
            ((c, "search", "--text", "..."), 2, "no words"),
            ((c, "update", web_id), 2, "nothing to change"),
            ((c, "update", web_id, "--data", "novalue"), 2, "KEY=VALUE"),
            ((c, "update", "nope", "--source", "x"), 1, "no conversation 'nope'"),
            ((c, "export", "--format", "xml"), 2, "jsonl or csv"),
            ((c, "export", "--status", "bogus"), 2, "open, closed or failed"),
            ((c, "export", "--output", "/nonexistent/dir/x.csv"), 2, "--output"),
        ],
    )
