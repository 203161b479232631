"""The agent service fails, through the real `threadbridge serve`: 5xx, timeouts, a refused
connection, 429 with Retry-After, a body that is not JSON. The agent's circuit opens, people get
one immediate notice per message, nothing is lost; when the service is back a probe closes the
circuit and every kept message is answered exactly once, in order (or its person is asked to
send it again, in `ask_resend` mode).

The Engage emulator stands behind `Outage`, a switch this test flips: while it is on, requests
never reach the emulator, so the emulator's own log holds exactly the calls that were answered.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from core.agents.emulators.engage import create_app
from tests.e2e.serve import ServeProcess

pytestmark = pytest.mark.e2e

KEYS = {"ENGAGE_TEST_KEY": "e2e-key", "ENGAGE_TEST_ORG": "e2e-org"}
KEPT = "Agent down; your message is kept."
RESEND = "Agent back; please send that again."
ANSWER = "[pensions-questions-latest] received: "


class Outage:
    """ASGI middleware that fails every call to the service while `mode` is set."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.mode: str | None = None  # "500" | "timeout" | "429" | "garbage" | None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        mode = self.mode
        if scope["type"] != "http" or scope["path"].startswith("/_emulator") or mode is None:
            await self.app(scope, receive, send)
            return
        if mode == "timeout":  # hold the call until the client gives up on it
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        status, headers, body = {
            "500": (500, [(b"content-type", b"application/json")], b'{"detail": "down"}'),
            "429": (429, [(b"retry-after", b"2")], b'{"detail": "slow down"}'),
            "garbage": (200, [(b"content-type", b"application/json")], b"<html>oops</html>"),
        }[mode]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class AgentServer:
    """The emulator on loopback, stoppable and restartable on the same port."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        server = uvicorn.Server(config)
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(server.serve())
            finally:
                loop.close()

        self._server, self._thread = server, threading.Thread(target=run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "no emulator"
            time.sleep(0.01)
        self.port = server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = None


@pytest.fixture
def outage() -> Outage:
    return Outage(create_app(api_keys={"e2e-key"}))


@pytest.fixture
def agent(outage: Outage) -> Iterator[AgentServer]:
    server = AgentServer(outage)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def config_text(store_url: str, agent_url: str, on_recovery: str = "answer") -> str:
    return f"""
default_agent = "pensions"

[store]
url = "{store_url}"

[bridge]
poll_s = 0.1
lease_s = 30
breaker_failures = 1
breaker_cooldown_s = 0.5
on_recovery = "{on_recovery}"
kept_notice = "{KEPT}"
resend_notice = "{RESEND}"

[agents.pensions]
service = "engage-conversations"
base_url = "{agent_url}"
api_key_env = "ENGAGE_TEST_KEY"
org_id_env = "ENGAGE_TEST_ORG"
agent = "pensions-questions-latest"
timeout_s = 2
retries = 1
backoff_s = 0.05
max_backoff_s = 1

[web]
enabled = true
"""


@pytest.fixture
def serve(tmp_path: Path, agent: AgentServer) -> Iterator[ServeProcess]:
    text = config_text(f"sqlite+aiosqlite:///{tmp_path}/tb.db", agent.url)
    process = ServeProcess(tmp_path, text, env=KEYS)
    try:
        yield process
    finally:
        process.stop()


def until(check: Callable[[], Any], serve: ServeProcess, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not met in {timeout}s\n--- log ---\n{serve.log()}")
        time.sleep(0.05)


def shown(serve: ServeProcess, thread: str) -> list[tuple[str, str]]:
    return [(m["role"], m["text"]) for m in serve.messages(thread)]


def chats(agent: AgentServer) -> list[str]:
    """The user messages the emulator answered, in the order it got them."""
    seen = httpx.get(f"{agent.url}/_emulator/requests", timeout=10).json()
    return [
        m["content"]
        for r in seen
        if str(r["path"]).endswith("/chat")
        for m in r["json"]["messages"]
    ]


class Round:
    """One outage: thread `{name}-a` has talked to the agent before, `{name}-b` is new."""

    def __init__(self, serve: ServeProcess, switch: Outage, agent: AgentServer, kind: str) -> None:
        self.serve, self.switch, self.agent, self.kind = serve, switch, agent, kind
        self.a, self.b = f"{kind}-a", f"{kind}-b"
        self.answered = 0  # calls the emulator answered before the outage

    def warm_up(self) -> None:
        self.serve.post(self.a, "warm up")
        self.serve.wait_messages(self.a, 2)
        self.answered = len(chats(self.agent))

    def go_down(self) -> None:
        if self.kind == "refused":
            self.agent.stop()
        else:
            self.switch.mode = self.kind

    def come_back(self) -> None:
        if self.kind == "refused":
            self.agent.start()  # on the same port: the bridge's base_url is unchanged
        else:
            self.switch.mode = None

    def outage(self) -> None:
        """Three messages in two threads while the service is down; then it comes back."""
        serve, a, b = self.serve, self.a, self.b
        log = serve.log()
        opened, probes = log.count("circuit open ("), log.count("the probe failed")
        self.go_down()
        serve.post(a, "first in a")
        serve.post(b, "first in b")  # a new thread: opening it at the service fails too
        # each gets its notice at once, while the message itself waits
        until(lambda: ("system", KEPT) in shown(serve, a), serve)
        until(lambda: ("system", KEPT) in shown(serve, b), serve)
        assert serve.log().count("circuit open (") > opened
        # a message behind a kept one in its thread is told at once too
        serve.post(a, "second in a")
        until(lambda: shown(serve, a).count(("system", KEPT)) == 2, serve)
        # the cool-down ends, the probe fails, the circuit reopens: nobody is told twice
        until(lambda: serve.log().count("the probe failed") > probes, serve)
        waiting = [
            m["text"] for m in serve.messages(a) + serve.messages(b) if m["status"] != "done"
        ]
        assert sorted(waiting) == ["first in a", "first in b", "second in a"]
        assert shown(serve, a).count(("system", KEPT)) == 2
        assert shown(serve, b).count(("system", KEPT)) == 1
        assert not serve.api("/api/conversations", status="failed")["total"]
        self.come_back()

    def all_answered_once_in_order(self) -> None:
        """Every kept message is answered once, in its thread's order, after its notice."""
        serve, a, b = self.serve, self.a, self.b
        until(lambda: len(serve.messages(a)) == 8 and len(serve.messages(b)) == 3, serve)
        time.sleep(0.5)  # anything doubled would show by now
        assert shown(serve, a) == [
            ("user", "warm up"),
            ("agent", ANSWER + "warm up"),
            ("system", KEPT),
            ("system", KEPT),
            ("user", "first in a"),
            ("agent", ANSWER + "first in a"),
            ("user", "second in a"),
            ("agent", ANSWER + "second in a"),
        ]
        assert shown(serve, b) == [
            ("system", KEPT),
            ("user", "first in b"),
            ("agent", ANSWER + "first in b"),
        ]
        late = chats(self.agent)[self.answered :]
        assert sorted(late) == ["first in a", "first in b", "second in a"]
        assert late.index("first in a") < late.index("second in a")
        assert not serve.api("/api/conversations", status="failed")["total"]


def test_each_kind_of_outage_keeps_messages_and_answers_each_once_when_back(
    serve: ServeProcess, outage: Outage, agent: AgentServer
) -> None:
    serve.start()  # one server for every kind: starting the process is the slow part
    for kind in ("500", "timeout", "refused", "429", "garbage"):
        round_ = Round(serve, outage, agent, kind)
        if kind == "429":  # a short Retry-After is waited out by the client: no outage
            fault = {"status": 429, "retry_after": 0.2, "times": 1, "path_contains": "/chat"}
            httpx.post(f"{agent.url}/_emulator/faults", json=fault).raise_for_status()
        closed = serve.log().count("circuit closed")
        round_.warm_up()
        assert shown(serve, round_.a)[1] == ("agent", ANSWER + "warm up")
        round_.outage()
        round_.all_answered_once_in_order()
        assert serve.log().count("circuit closed") == closed + 1, kind


def test_in_ask_resend_mode_kept_messages_are_handed_back_to_their_people(
    serve: ServeProcess, outage: Outage, agent: AgentServer, tmp_path: Path
) -> None:
    serve.config.write_text(
        config_text(f"sqlite+aiosqlite:///{tmp_path}/tb.db", agent.url, "ask_resend")
    )
    serve.start()
    round_ = Round(serve, outage, agent, "500")
    a, b = round_.a, round_.b
    round_.warm_up()
    round_.outage()
    until(lambda: len(serve.messages(a)) == 8 and len(serve.messages(b)) == 3, serve)
    time.sleep(0.5)
    # The probe's message is answered (the agent did answer it); each other one is handed
    # back to its person once, and none is sent to the agent late.
    late = chats(agent)[round_.answered :]
    assert len(late) == 1 and late[0] in ("first in a", "first in b")

    def outcome(text: str) -> tuple[str, str]:
        return ("agent", ANSWER + text) if text in late else ("system", RESEND)

    assert shown(serve, a) == [
        ("user", "warm up"),
        ("agent", ANSWER + "warm up"),
        ("system", KEPT),
        ("system", KEPT),
        ("user", "first in a"),
        outcome("first in a"),
        ("user", "second in a"),
        ("system", RESEND),
    ]
    assert shown(serve, b) == [("system", KEPT), ("user", "first in b"), outcome("first in b")]
    assert not serve.api("/api/conversations", status="failed")["total"]
    serve.post(a, "and now?")  # once back, a new message is answered as usual
    until(lambda: ("agent", ANSWER + "and now?") in shown(serve, a), serve)


def test_an_outage_with_the_store_on_postgresql(
    serve: ServeProcess, outage: Outage, agent: AgentServer, postgres: Any
) -> None:
    serve.config.write_text(config_text(postgres.database(), agent.url))
    serve.start()
    round_ = Round(serve, outage, agent, "500")
    round_.warm_up()
    round_.outage()
    round_.all_answered_once_in_order()
