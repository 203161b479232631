"""`threadbridge serve`, the real process: web chat, Engage emulator, search, restarts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.agents.emulators.engage import create_app
from tests.e2e.serve import ServeProcess
from tests.servers import run_asgi

pytestmark = pytest.mark.e2e

KEYS = {"ENGAGE_TEST_KEY": "e2e-key", "ENGAGE_TEST_ORG": "e2e-org"}


def config_text(tmp_path: Path, engage_url: str, **bridge: object) -> str:
    extra = "".join(f"{k} = {v!r}\n" for k, v in bridge.items())
    return f"""
default_agent = "pensions"

[store]
url = "sqlite+aiosqlite:///{tmp_path}/tb.db"

[bridge]
poll_s = 0.1
lease_s = 30
{extra}
[agents.pensions]
service = "engage-conversations"
base_url = "{engage_url}"
api_key_env = "ENGAGE_TEST_KEY"
org_id_env = "ENGAGE_TEST_ORG"
agent = "pensions-questions-latest"
timeout_s = 10
retries = 1
backoff_s = 0.05

[agents.demo]
service = "local"

[web]
enabled = true
"""


@pytest.fixture
def engage() -> Iterator[str]:
    with run_asgi(create_app(api_keys={"e2e-key"})) as url:
        yield url


@pytest.fixture
def serve(tmp_path: Path, engage: str) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path, config_text(tmp_path, engage), env=KEYS)
    try:
        yield process
    finally:
        process.stop()


def emulator_requests(engage: str) -> list[dict[str, object]]:
    return list(httpx.get(f"{engage}/_emulator/requests").json())


def test_two_web_threads_reach_the_agent_and_are_searchable(
    serve: ServeProcess, engage: str
) -> None:
    serve.start()
    assert serve.post("alpha", "What is a pension?", user="ann").status_code == 202
    assert serve.post("beta", "How much can I save?", user="bob").status_code == 202
    alpha = serve.wait_messages("alpha", 2)
    beta = serve.wait_messages("beta", 2)
    assert [(m["role"], m["text"]) for m in alpha] == [
        ("user", "What is a pension?"),
        ("agent", "[pensions-questions-latest] received: What is a pension?"),
    ]
    assert beta[1]["text"] == "[pensions-questions-latest] received: How much can I save?"
    serve.post("alpha", "And a second question", user="ann")
    assert serve.wait_messages("alpha", 4)[3]["text"].endswith("And a second question")

    found = serve.api("/api/conversations", source="web")
    assert found["total"] == 2
    by_thread = {c["data"]["thread_id"]: c for c in found["items"]}
    assert set(by_thread) == {"alpha", "beta"}
    alpha_row = by_thread["alpha"]
    assert (alpha_row["source"], alpha_row["agent"]) == ("web", "pensions")
    assert alpha_row["data"]["user_name"] == "ann"
    # the conversation was opened at the service once, with our source and data
    opens = [r for r in emulator_requests(engage) if r["path"] == "/v1/conversations"]
    assert len(opens) == 2
    assert {o["json"]["source"] for o in opens} == {"web"}  # type: ignore[index]
    remote = httpx.get(
        f"{engage}/v1/conversations/{alpha_row['remote_id']}",
        headers={"X-Api-Key": "e2e-key", "X-Org-Id": "e2e-org"},
    ).json()
    assert remote["source"] == "web"
    assert remote["data"]["thread_id"] == "alpha"
    shown = serve.api(f"/api/conversations/{alpha_row['id']}")
    assert [m["role"] for m in shown["messages"]] == ["user", "agent", "user", "agent"]
    assert serve.api("/api/conversations", source="slack")["total"] == 0
    assert serve.api("/api/conversations", text="second")["total"] == 1


def test_a_crash_between_submit_and_reply_answers_exactly_once(
    serve: ServeProcess, engage: str
) -> None:
    serve.start()
    # the agent will take 3 s, long enough to kill the server while it waits
    httpx.post(
        f"{engage}/_emulator/faults", json={"delay_s": 3, "times": 1, "path_contains": "/chat"}
    ).raise_for_status()
    assert serve.post("crash", "survive this").status_code == 202
    deadline = time.monotonic() + 10
    while not any(str(r["path"]).endswith("/chat") for r in emulator_requests(engage)):
        assert time.monotonic() < deadline, serve.log()
        time.sleep(0.05)
    serve.kill()
    serve.start()
    messages = serve.wait_messages("crash", 2)
    time.sleep(1.0)  # anything doubled would show up by now
    messages = serve.messages("crash")
    assert [(m["role"], m["text"]) for m in messages] == [
        ("user", "survive this"),
        ("agent", "[pensions-questions-latest] received: survive this"),
    ]
    conversations = serve.api("/api/conversations", source="web")
    assert conversations["total"] == 1


def test_sigterm_finishes_the_turn_in_flight(serve: ServeProcess, engage: str) -> None:
    serve.start()
    httpx.post(
        f"{engage}/_emulator/faults", json={"delay_s": 1.5, "times": 1, "path_contains": "/chat"}
    ).raise_for_status()
    serve.post("graceful", "finish me")
    deadline = time.monotonic() + 10
    while not any(str(r["path"]).endswith("/chat") for r in emulator_requests(engage)):
        assert time.monotonic() < deadline, serve.log()
        time.sleep(0.05)
    assert serve.terminate() in (0, -15)  # uvicorn re-raises SIGTERM once shut down
    serve.start()
    messages = serve.messages("graceful")
    assert [m["role"] for m in messages] == ["user", "agent"], serve.log()
    chats = [r for r in emulator_requests(engage) if str(r["path"]).endswith("/chat")]
    assert len(chats) == 1  # finished before exit, not redone after the restart


def test_an_open_event_stream_does_not_hold_up_shutdown(serve: ServeProcess) -> None:
    serve.start()
    with httpx.stream("GET", f"{serve.url}/api/chat/tab/events", timeout=30) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("retry:")
        started = time.monotonic()
        # uvicorn alone would wait its 15 s graceful timeout for this stream to end
        assert serve.terminate(timeout=8) in (0, -15)
    assert time.monotonic() - started < 8


def test_an_agent_that_is_down_is_retried_then_the_user_is_told(
    serve: ServeProcess, engage: str
) -> None:
    serve.start()
    httpx.post(
        f"{engage}/_emulator/faults", json={"status": 500, "times": 2, "path_contains": "/chat"}
    ).raise_for_status()
    serve.post("down", "hello?")
    messages = serve.wait_messages("down", 2)
    assert messages[0] == {**messages[0], "role": "user", "text": "hello?"}
    assert messages[1]["role"] == "system"
    assert "could not answer" in messages[1]["text"]
    failed = serve.api("/api/conversations", status="failed")
    assert failed["total"] == 1
    shown = serve.api(f"/api/conversations/{failed['items'][0]['id']}")
    assert "HTTP 500" in shown["failures"][0]["error"]
    # the message is kept: it is in the transcript an admin reads
    assert shown["messages"][0]["content"] == "hello?"


def test_the_embedded_default_config_serves_the_demo_agent(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    text = (root / "config/threadbridge.toml").read_text(encoding="utf-8")
    process = ServeProcess(tmp_path, text)
    try:
        process.start()
        page = httpx.get(process.url + "/", timeout=10)
        assert page.status_code == 200
        assert "New conversation" in page.text
        process.post("tab", "hi demo")
        answer = process.wait_messages("tab", 2)[1]["text"]
        assert "You said: “hi demo”" in answer
        assert (tmp_path / "data" / "threadbridge.db").exists()
    finally:
        process.stop()
