"""Our Engage clients against the Engage emulator: the wire format and every error mapping."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from core.agents import emulators
from core.agents.base import HttpAgentService
from core.agents.emulators.engage import create_app
from core.agents.engage import EngageConfig, EngageConversations, EngageRuns, build
from core.errors import AgentRejected, AgentServiceError, AgentUnavailable
from core.model import Conversation, Turn
from tests.servers import run_asgi

KEY, ORG, AGENT = "client-key", "org-1", "helper"
FAST = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.001, "max_backoff_s": 0.01}

Make = Callable[..., Any]


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    with run_asgi(create_app(api_keys={KEY})) as url:
        yield url


@pytest.fixture
def base_url(emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    httpx.post(f"{emulator}/_emulator/reset").raise_for_status()
    monkeypatch.setenv("ENGAGE_SMARTER_API_KEY", KEY)
    monkeypatch.setenv("ENGAGE_SMARTER_ORG_ID", ORG)
    return emulator


@pytest.fixture
async def make(base_url: str) -> AsyncIterator[Make]:
    """Build clients (against the emulator unless told otherwise); close them afterwards."""
    made: list[HttpAgentService] = []

    def factory(service: str = "engage-conversations", **overrides: Any) -> Any:
        config = EngageConfig.model_validate(
            {"service": service, "base_url": base_url, "agent": AGENT, **FAST, **overrides}
        )
        client = EngageConversations("a", config) if "conv" in service else EngageRuns("a", config)
        made.append(client)
        return client

    yield factory
    for client in made:
        await client.aclose()


async def call(method: str, url: str, **kwargs: Any) -> Any:
    """One request of the test's own (not through the client under test)."""
    async with httpx.AsyncClient(headers={"X-Api-Key": KEY, "X-Org-Id": ORG}) as http:
        response = await http.request(method, url, **kwargs)
    response.raise_for_status()
    return response.json()


async def fault(base_url: str, **spec: Any) -> None:
    await call("POST", f"{base_url}/_emulator/faults", json=spec)


async def seen(base_url: str) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = await call("GET", f"{base_url}/_emulator/requests")
    return log


def conversation(**fields: Any) -> Conversation:
    values: dict[str, Any] = {
        "id": "c1",
        "thread_key": "slack:W1/C1/T1",
        "source": "slack",
        "agent": "a",
        "data": {"team": "W1"},
    }
    return Conversation(**{**values, **fields})


def user(text: str) -> Turn:
    return Turn(role="user", content=text, name="Ann")


async def test_conversation_two_turns(make: Make, base_url: str) -> None:
    client = make()
    conv = conversation()
    conv.remote_id = await client.open(conv)
    assert conv.remote_id

    first = await client.respond(conv, [], [user("hello")])
    assert first.visible == [f"[{AGENT}] received: hello"]
    assert [(t.role, t.name) for t in first.turns] == [("agent", AGENT)]
    assert first.remote_id is None  # nothing new was opened
    second = await client.respond(conv, [user("hello"), *first.turns], [user("again")])
    assert second.visible == [f"[{AGENT}] received: again"]

    remote = await call("GET", f"{base_url}/v1/conversations/{conv.remote_id}/messages")
    assert [(m["role"], m["content"]) for m in remote] == [
        ("user", "hello"),
        ("agent", f"[{AGENT}] received: hello"),
        ("user", "again"),
        ("agent", f"[{AGENT}] received: again"),
    ]
    create, chat = (await seen(base_url))[:2]
    assert create["json"] == {"data": {"team": "W1"}, "source": "slack"}
    assert chat["query"] == {"agent": AGENT}
    assert chat["json"] == {"messages": [{"role": "user", "content": "hello", "name": "Ann"}]}


async def test_respond_opens_a_conversation_it_lacks(make: Make) -> None:
    answer = await make().respond(conversation(), [], [user("hi")])
    assert answer.remote_id
    assert answer.visible == [f"[{AGENT}] received: hi"]


async def test_update_metadata(make: Make, base_url: str) -> None:
    client = make()
    remote_id = await client.open(conversation())
    await client.update_metadata(remote_id, data=None, source="discord")
    await client.update_metadata(remote_id, data={"x": 1}, source=None)
    got = await call("GET", f"{base_url}/v1/conversations/{remote_id}")
    assert (got["data"], got["source"]) == ({"x": 1}, "discord")


async def test_runs_send_the_history(make: Make, base_url: str) -> None:
    client = make("engage-runs")
    assert await client.open(conversation()) is None
    history = [
        user("one"),
        Turn(role="agent", content="[helper] received: one", name=AGENT),
        Turn(role="tool", content="42", tool_call_id="t1"),
        user("two"),
        Turn(role="agent", content="[helper] received: two"),
    ]
    answer = await client.respond(conversation(), history, [user("three")])
    assert answer.visible == [f"[{AGENT}] received: three"]
    assert answer.remote_id

    (run,) = await seen(base_url)
    assert run["path"] == "/v1/runs/chat"
    assert run["query"] == {"agent": AGENT}
    assert run["json"]["data"] == {"team": "W1"}
    sent = [(m["role"], m["content"]) for m in run["json"]["messages"]]
    assert sent == [
        ("user", "one"),
        ("agent", "[helper] received: one"),
        ("user", "two"),
        ("agent", "[helper] received: two"),
        ("user", "three"),
    ]
    remote = await call("GET", f"{base_url}/v1/conversations/{answer.remote_id}/messages")
    assert len(remote) == 6


async def test_build_picks_the_class(base_url: str) -> None:
    kinds = [("engage-conversations", EngageConversations), ("engage-runs", EngageRuns)]
    for service, cls in kinds:
        client = build("a", EngageConfig.model_validate({"service": service, "agent": AGENT}))
        assert isinstance(client, cls)
        assert client.stateful is (cls is EngageConversations)
        await client.aclose()


# Error mapping


async def test_401_is_rejected_without_retry(
    make: Make, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENGAGE_SMARTER_API_KEY", "wrong")
    with pytest.raises(AgentRejected) as raised:
        await make().open(conversation())
    assert raised.value.status == 401
    assert "Invalid API key" in str(raised.value)
    assert len(await seen(base_url)) == 1


async def test_missing_key_header_is_omitted_and_rejected(
    make: Make, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ENGAGE_SMARTER_API_KEY")
    with pytest.raises(AgentRejected, match="Missing API key"):
        await make().open(conversation())


async def test_404_is_rejected(make: Make, base_url: str) -> None:
    with pytest.raises(AgentRejected) as raised:
        await make().respond(conversation(remote_id="nope"), [], [user("hi")])
    assert raised.value.status == 404
    assert "Conversation not found" in str(raised.value)
    assert len(await seen(base_url)) == 1


async def test_422_is_rejected(make: Make, base_url: str) -> None:
    client = make()
    with pytest.raises(AgentRejected) as raised:
        await client.request("POST", "/v1/conversations", json={"data": "not a dict"})
    assert raised.value.status == 422
    await fault(base_url, status=422)
    with pytest.raises(AgentRejected):
        await client.open(conversation())
    assert len(await seen(base_url)) == 2


async def test_429_waits_retry_after_then_succeeds(make: Make, base_url: str) -> None:
    await fault(base_url, status=429, retry_after=0.3, path_contains="/chat")
    client = make(max_backoff_s=1.0)
    conv = conversation(remote_id=await client.open(conversation()))
    started = time.monotonic()
    answer = await client.respond(conv, [], [user("hi")])
    assert time.monotonic() - started >= 0.3
    assert answer.visible == [f"[{AGENT}] received: hi"]
    assert [r["path"].rsplit("/", 1)[-1] for r in (await seen(base_url))] == [
        "conversations",
        "chat",
        "chat",
    ]


async def test_a_retry_after_beyond_max_backoff_gives_up_at_once(make: Make, base_url: str) -> None:
    await fault(base_url, status=429, retry_after=120, path_contains="/chat")
    client = make(max_backoff_s=1.0)
    conv = conversation(remote_id=await client.open(conversation()))
    with pytest.raises(AgentUnavailable) as raised:
        await client.respond(conv, [], [user("hi")])
    assert (raised.value.status, raised.value.retry_after) == (429, 120)
    assert [r["path"].rsplit("/", 1)[-1] for r in await seen(base_url)] == ["conversations", "chat"]


async def test_500_retries_then_unavailable(make: Make, base_url: str) -> None:
    await fault(base_url, status=500, times=10)
    with pytest.raises(AgentUnavailable) as raised:
        await make(retries=2).open(conversation())
    assert raised.value.status == 500
    assert len(await seen(base_url)) == 3


async def test_timeout_is_unavailable(make: Make, base_url: str) -> None:
    await fault(base_url, delay_s=2.0, times=2)
    with pytest.raises(AgentUnavailable, match="timed out"):
        await make("engage-runs", timeout_s=0.2, retries=1).respond(
            conversation(), [], [user("hi")]
        )
    assert len(await seen(base_url)) == 2


async def test_connection_refused_is_unavailable(make: Make) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AgentUnavailable, match="cannot reach"):
        await make(base_url=f"http://127.0.0.1:{port}", retries=1).open(conversation())


# Replies the emulator never sends: a real server on loopback that answers them.


def odd_service() -> FastAPI:
    app = FastAPI()
    message: dict[str, Any] = {"id": "m", "org_id": "o", "conversation_id": "rc", "run_id": "r"}
    message |= {"name": None, "user_id": None, "created": "2024-01-01T00:00:00Z"}

    @app.post("/v1/conversations")
    async def create() -> Any:
        return {"no": "id"}

    @app.post("/v1/conversations/{cid}/chat")
    async def chat(cid: str) -> Any:
        if cid == "dict":
            return {"messages": []}
        return [
            {**message, "role": "status", "content": "thinking"},
            {**message, "role": "info", "content": "{}"},
            {**message, "role": "agent", "content": "answer"},
        ]

    @app.post("/v1/runs/chat")
    async def run() -> Any:
        return [{**message, "role": "agent"}]  # no content

    return app


@pytest.fixture(scope="module")
def odd_url() -> Iterator[str]:
    with run_asgi(odd_service()) as url:
        yield url


async def test_only_agent_messages_are_shown(make: Make, odd_url: str) -> None:
    answer = await make(base_url=odd_url).respond(conversation(remote_id="x"), [], [user("q")])
    assert answer.visible == ["answer"]
    assert [t.content for t in answer.turns] == ["answer"]


@pytest.mark.parametrize(
    ("service", "remote_id", "problem"),
    [
        ("engage-conversations", None, "id"),
        ("engage-conversations", "dict", "list"),
        ("engage-runs", None, "content"),
    ],
)
async def test_a_reply_of_the_wrong_shape_is_rejected(
    make: Make, odd_url: str, service: str, remote_id: str | None, problem: str
) -> None:
    client = make(service, base_url=odd_url)
    with pytest.raises(AgentServiceError, match=problem) as raised:
        await client.respond(conversation(remote_id=remote_id), [], [user("q")])
    assert isinstance(raised.value, AgentRejected)


def test_emulators_load_by_name() -> None:
    assert emulators.load("engage") is create_app
    with pytest.raises(KeyError, match="engage"):
        emulators.load("nope")
