"""Our Julep sessions client against the sessions emulator: wire format, tools, error mapping,
and the bridge end to end."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from core.agents import build_service, emulators
from core.agents.emulators.sessions import create_app
from core.agents.sessions import TOOLS, USERS, SessionsAgent, SessionsConfig, build
from core.bridge import Bridge
from core.errors import AgentRejected, AgentUnavailable, ConfigError
from core.model import Conversation, ToolCall, ToolSpec, Turn
from core.routing import Router
from core.store import Store
from tests.bridgekit import RecordingChannel, inbound, make_config, start_bridge, stop_bridge
from tests.servers import run_asgi

KEY = "client-key"
AGENT_ID = "9bb48ef4-b6f7-4dd8-a5ea-ab775e2e8d1b"
USER_ID = "621ff51c-a813-4046-bfc6-ec425003e8c7"
FAST = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.001, "max_backoff_s": 0.01}
LOOKUP = ToolSpec(
    "lookup_order",
    "Look up an order by id",
    {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
)

Make = Callable[..., SessionsAgent]


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    with run_asgi(create_app(api_keys={KEY})) as url:
        yield url


@pytest.fixture
def base_url(emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    httpx.post(f"{emulator}/_emulator/reset").raise_for_status()
    monkeypatch.setenv("JULEP_API_KEY", KEY)
    return emulator


@pytest.fixture
async def make(base_url: str) -> AsyncIterator[Make]:
    """Build clients (against the emulator unless told otherwise); close them afterwards."""
    made: list[SessionsAgent] = []

    def factory(tools: tuple[ToolSpec, ...] = (), **overrides: Any) -> SessionsAgent:
        raw = {"service": "sessions", "base_url": base_url, "agent_id": AGENT_ID, **FAST}
        client = build("coach", SessionsConfig.model_validate({**raw, **overrides}), tools)
        made.append(client)
        return client

    yield factory
    for client in made:
        await client.aclose()


async def call(method: str, url: str, **kwargs: Any) -> Any:
    """One request of the test's own (not through the client under test)."""
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http:
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
        "thread_key": "slack:T1/C1/1700000000.1",
        "source": "slack",
        "agent": "coach",
        "data": {"team_id": "T1", "user_id": "U1"},
    }
    return Conversation(**{**values, **fields})


def user(text: str) -> Turn:
    return Turn(role="user", content=text, name="Ann", author_id="U1")


async def test_session_two_turns(make: Make, base_url: str) -> None:
    client = make(user_id=USER_ID, situation="You are Sara, a coach.")
    conv = conversation()
    conv.remote_id = await client.open(conv)
    assert conv.remote_id

    first = await client.respond(conv, [], [user("hello")])
    assert first.visible == ["received: hello"]
    assert first.remote_id is None  # nothing new was opened
    assert first.tool_calls == []
    second = await client.respond(conv, [user("hello"), *first.turns], [user("again")])
    assert second.visible == ["received: again"]

    history = await call("GET", f"{base_url}/sessions/{conv.remote_id}/history")
    assert [(m["role"], m["content"]) for m in history["items"]] == [
        ("user", "hello"),
        ("assistant", "received: hello"),
        ("user", "again"),
        ("assistant", "received: again"),
    ]
    create, chat, again = (await seen(base_url))[:3]
    assert (create["method"], create["path"]) == ("POST", "/sessions")
    assert create["json"] == {
        "agent_id": AGENT_ID,
        "user_id": USER_ID,
        "situation": "You are Sara, a coach.",
        "metadata": {"source": "slack", "data": {"team_id": "T1", "user_id": "U1"}},
    }
    assert chat["path"] == f"/sessions/{conv.remote_id}/chat"
    assert chat["json"] == {"messages": [{"role": "user", "content": "hello", "name": "Ann"}]}
    assert again["json"] == {"messages": [{"role": "user", "content": "again", "name": "Ann"}]}

    session = await call("GET", f"{base_url}/sessions/{conv.remote_id}")
    assert (session["agent_id"], session["user_id"]) == (AGENT_ID, USER_ID)
    assert session["situation"] == "You are Sara, a coach."


async def test_respond_opens_a_session_it_lacks(make: Make) -> None:
    answer = await make().respond(conversation(), [], [user("hi")])
    assert answer.remote_id
    uuid.UUID(answer.remote_id)
    assert answer.visible == ["received: hi"]


async def test_the_real_base_url_ends_in_api(make: Make, base_url: str) -> None:
    client = make(base_url=f"{base_url}/api")
    answer = await client.respond(conversation(), [], [user("hi")])
    assert answer.visible == ["received: hi"]
    assert [r["path"] for r in await seen(base_url)] == [
        "/api/sessions",
        f"/api/sessions/{answer.remote_id}/chat",
    ]


@pytest.mark.parametrize(
    ("route", "data", "configured", "sent"),
    [
        ("from the route", {"situation": "from data"}, "from config", "from the route"),
        (None, {"situation": "from data"}, "from config", "from data"),
        (None, {}, "from config", "from config"),
        (None, {"situation": ""}, None, None),
    ],
)
async def test_which_situation_a_session_opens_with(
    make: Make,
    base_url: str,
    route: str | None,
    data: dict[str, Any],
    configured: str | None,
    sent: str | None,
) -> None:
    client = make(situation=configured)
    remote_id = await client.open(conversation(situation=route, data=data))
    (create,) = await seen(base_url)
    assert create["json"].get("situation") == sent
    assert "situation" in create["json"] or sent is None
    session = await call("GET", f"{base_url}/sessions/{remote_id}")
    assert session["situation"] == sent


async def test_user_id_is_derived_per_platform_user(make: Make, base_url: str) -> None:
    client = make()
    await client.open(conversation(data={"user_id": "U1"}))
    await client.open(conversation(thread_key="slack:T1/C1/2", data={"user_id": "U1"}))
    await client.open(conversation(data={"user_id": "U2"}))
    await client.open(conversation(source="web", data={"user_name": "ann"}))
    await client.open(conversation(source="web", data={}))
    users = [r["json"]["user_id"] for r in await seen(base_url)]
    assert users[:4] == [
        str(uuid.uuid5(USERS, "slack:U1")),
        str(uuid.uuid5(USERS, "slack:U1")),
        str(uuid.uuid5(USERS, "slack:U2")),
        str(uuid.uuid5(USERS, "web:ann")),
    ]
    assert users[4] == str(uuid.uuid5(USERS, "web:thread:slack:T1/C1/1700000000.1"))


async def test_sessions_are_found_by_source(make: Make, base_url: str) -> None:
    client = make()
    slack = [await client.open(conversation()) for _ in range(2)]
    web = await client.open(conversation(source="web", data={"thread_id": "w"}))
    found = await call(
        "GET", f"{base_url}/sessions", params={"metadata_filter": json.dumps({"source": "slack"})}
    )
    assert [s["id"] for s in found["items"]] == slack[::-1]  # newest first
    wanted = {"data": {"thread_id": "w"}}
    found = await call(
        "GET", f"{base_url}/sessions", params={"metadata_filter": json.dumps(wanted)}
    )
    assert [s["id"] for s in found["items"]] == [web]


async def test_update_situation_patches_the_open_session(make: Make, base_url: str) -> None:
    client = make(situation="old")
    remote_id = await client.open(conversation())
    await client.update_situation(remote_id, "You now coach runners.")
    patch = (await seen(base_url))[-1]
    assert (patch["method"], patch["path"]) == ("PATCH", f"/sessions/{remote_id}")
    assert patch["json"] == {"situation": "You now coach runners."}
    session = await call("GET", f"{base_url}/sessions/{remote_id}")
    assert session["situation"] == "You now coach runners."
    assert session["metadata"]["source"] == "slack"  # untouched
    with pytest.raises(AgentRejected) as raised:
        await client.update_situation(str(uuid.uuid4()), "x")
    assert raised.value.status == 404


async def test_sampling_options_go_with_each_chat(make: Make, base_url: str) -> None:
    client = make(temperature=0.3, max_tokens=200)
    await client.respond(conversation(), [], [user("hi")])
    chat = (await seen(base_url))[-1]
    assert chat["json"] == {
        "messages": [{"role": "user", "content": "hi", "name": "Ann"}],
        "temperature": 0.3,
        "max_tokens": 200,
    }


async def test_tool_round_trip(make: Make, base_url: str) -> None:
    client = make(tools=(LOOKUP,))
    conv = conversation()
    conv.remote_id = await client.open(conv)
    asked = await client.respond(
        conv, [], [user('where is it? !tool lookup_order {"order_id": "42"}')]
    )
    assert asked.visible == []
    [tool_call] = asked.tool_calls
    assert (tool_call.name, json.loads(tool_call.arguments)) == ("lookup_order", {"order_id": "42"})
    assert tool_call.id
    [turn] = asked.turns
    assert (turn.role, turn.content, turn.tool_calls) == ("agent", "", [tool_call])

    result = Turn(
        role="tool", content='{"status": "shipped"}', name="lookup_order", tool_call_id=tool_call.id
    )
    answer = await client.respond(conv, [user("where is it?"), turn], [result])
    assert answer.visible == ['tool lookup_order said: {"status": "shipped"}']
    assert answer.tool_calls == []

    _, ask, reply = await seen(base_url)
    assert ask["json"]["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "lookup_order",
                "description": "Look up an order by id",
                "parameters": LOOKUP.parameters,
            },
            "id": str(uuid.uuid5(TOOLS, "lookup_order")),
        }
    ]
    assert reply["json"]["messages"] == [
        {"role": "function", "content": '{"status": "shipped"}', "name": "lookup_order"}
    ]
    history = await call("GET", f"{base_url}/sessions/{conv.remote_id}/history")
    assert [m["role"] for m in history["items"]] == [
        "user",
        "function_call",
        "function",
        "assistant",
    ]


async def test_a_tool_the_agent_was_not_given_is_not_called(make: Make) -> None:
    answer = await make().respond(conversation(), [], [user('!tool lookup_order {"a": 1}')])
    assert answer.tool_calls == []
    assert answer.visible == ['received: !tool lookup_order {"a": 1}']


def test_config_checks_ids_and_registers_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JULEP_API_KEY", KEY)
    with pytest.raises(ConfigError, match=r"agents\.coach\.agent_id.*not a UUID"):
        make_config(tmp_path, agents={"coach": {"service": "sessions", "agent_id": "coach"}})
    config = make_config(
        tmp_path,
        agents={"coach": {"service": "sessions", "agent_id": AGENT_ID.upper()}},
        default_agent="coach",
    )
    parsed = config.agent_configs["coach"]
    assert isinstance(parsed, SessionsConfig)
    assert parsed.agent_id == AGENT_ID  # normalised
    assert parsed.base_url == "https://api-alpha.julep.ai/api"
    assert parsed.api_key_env == "JULEP_API_KEY"


async def test_build_service_makes_a_stateful_client(base_url: str) -> None:
    config = SessionsConfig.model_validate({"service": "sessions", "agent_id": AGENT_ID})
    client = build_service("coach", config, [LOOKUP])
    assert isinstance(client, SessionsAgent)
    assert client.stateful is True
    assert client.tools == [LOOKUP]
    await client.aclose()


# Error mapping


async def test_401_is_rejected_without_retry(
    make: Make, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JULEP_API_KEY", "wrong")
    with pytest.raises(AgentRejected) as raised:
        await make().open(conversation())
    assert raised.value.status == 401
    assert "Invalid API key" in str(raised.value)
    assert len(await seen(base_url)) == 1


async def test_missing_key_is_rejected(
    make: Make, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JULEP_API_KEY")
    with pytest.raises(AgentRejected, match="Missing API key"):
        await make().open(conversation())


async def test_404_is_rejected(make: Make, base_url: str) -> None:
    gone = str(uuid.uuid4())
    with pytest.raises(AgentRejected) as raised:
        await make().respond(conversation(remote_id=gone), [], [user("hi")])
    assert raised.value.status == 404
    assert "Session not found" in str(raised.value)
    assert len(await seen(base_url)) == 1


async def test_422_is_rejected(make: Make, base_url: str) -> None:
    client = make()
    with pytest.raises(AgentRejected) as raised:
        await client.request("POST", "/sessions", json={"agent_id": "not-a-uuid"})
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
    assert answer.visible == ["received: hi"]
    assert [r["path"].rsplit("/", 1)[-1] for r in await seen(base_url)] == [
        "sessions",
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
    assert len(await seen(base_url)) == 2


async def test_500_retries_then_unavailable(make: Make, base_url: str) -> None:
    await fault(base_url, status=500, times=10)
    with pytest.raises(AgentUnavailable) as raised:
        await make(retries=2).open(conversation())
    assert raised.value.status == 500
    assert len(await seen(base_url)) == 3


async def test_timeout_is_unavailable(make: Make, base_url: str) -> None:
    await fault(base_url, delay_s=2.0, times=2)
    with pytest.raises(AgentUnavailable, match="timed out"):
        await make(timeout_s=0.2, retries=1).open(conversation())
    assert len(await seen(base_url)) == 2


async def test_connection_refused_is_unavailable(make: Make) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AgentUnavailable, match="cannot reach"):
        await make(base_url=f"http://127.0.0.1:{port}", retries=1).open(conversation())


# Replies the emulator never sends: a real server on loopback that answers them.

ODD = "00000000-0000-4000-8000-00000000000"


def odd_service() -> FastAPI:
    app = FastAPI()

    @app.post("/sessions")
    async def create() -> Any:
        return {"created_at": "2024-01-01T00:00:00Z"}  # no id

    @app.post("/sessions/{sid}/chat")
    async def chat(sid: str) -> Any:
        message = {"name": None, "created_at": "2024-01-01T00:00:00Z", "id": "m1"}
        kind = sid[-1]
        if kind == "1":
            return {"id": "r", "response": "text"}
        if kind == "2":
            return {"id": "r", "response": [[{**message, "role": "function_call", "content": "?"}]]}
        content = json.dumps({"name": "t", "arguments": {"a": 1}})
        return {
            "id": "r",
            "finish_reason": "tool_calls",
            "response": [
                [
                    {**message, "role": "system", "content": "a thought"},
                    {**message, "role": "function_call", "content": content},
                ]
            ],
        }

    return app


@pytest.fixture(scope="module")
def odd_url() -> Iterator[str]:
    with run_asgi(odd_service()) as url:
        yield url


@pytest.mark.parametrize(
    ("remote_id", "problem"),
    [(None, "id"), (ODD + "1", "response"), (ODD + "2", "not JSON")],
)
async def test_a_reply_of_the_wrong_shape_is_rejected(
    make: Make, odd_url: str, remote_id: str | None, problem: str
) -> None:
    client = make(base_url=odd_url)
    with pytest.raises(AgentRejected, match=problem):
        await client.respond(conversation(remote_id=remote_id), [], [user("q")])


async def test_only_assistant_messages_and_calls_are_kept(make: Make, odd_url: str) -> None:
    client = make(base_url=odd_url)
    answer = await client.respond(conversation(remote_id=ODD + "3"), [], [user("q")])
    assert answer.tool_calls == [ToolCall("m1", "t", '{"a": 1}')]
    assert [t.content for t in answer.turns] == [""]


# The emulator's own rules, where the client does not reach them.


async def test_emulator_rules(base_url: str) -> None:
    agent = {"agent_id": AGENT_ID}
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": KEY}) as http:
        created = (await http.post("/api/sessions", json={**agent, "metadata": {"a": 1}})).json()
        sid = created["id"]
        assert created["jobs"] == []
        bad = await http.get("/sessions", params={"metadata_filter": "{nope"})
        assert bad.status_code == 400
        assert (await http.put(f"/sessions/{sid}", json={"situation": None})).status_code == 422
        await http.patch(f"/sessions/{sid}", json={"metadata": {"b": 2}, "situation": None})
        assert (await http.get(f"/sessions/{sid}")).json()["metadata"] == {"a": 1, "b": 2}
        await http.put(f"/sessions/{sid}", json={"situation": "s", "metadata": {"c": 3}})
        got = (await http.get(f"/sessions/{sid}")).json()
        assert (got["situation"], got["metadata"]) == ("s", {"c": 3})
        forget = {"messages": [{"role": "user", "content": "x"}], "remember": False}
        assert (await http.post(f"/sessions/{sid}/chat", json=forget)).status_code == 200
        assert (await http.get(f"/sessions/{sid}/history")).json() == {"items": []}
        second = (await http.post("/sessions", json=agent)).json()["id"]
        await http.patch(f"/sessions/{sid}", json={"situation": "later"})
        oldest = await http.get("/sessions", params={"order": "asc", "sort_by": "updated_at"})
        assert [s["id"] for s in oldest.json()["items"]] == [second, sid]  # sid was updated last
        assert (await http.get("/sessions/not-a-uuid")).status_code == 422
        assert (await http.get(f"/sessions/{uuid.uuid4()}")).status_code == 404


def test_emulators_load_by_name() -> None:
    assert emulators.load("sessions") is create_app


# Through the real bridge


class OrderTools:
    """A tool runner that knows one tool, and notes the calls it ran."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ToolCall]] = []

    async def run(self, agent: str, call: ToolCall) -> str:
        self.calls.append((agent, call))
        order = json.loads(call.arguments)["order_id"]
        return json.dumps({"order_id": order, "status": "shipped"})


async def test_bridge_two_turns_and_a_tool_round_trip(
    tmp_path: Path, emulator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    httpx.post(f"{emulator}/_emulator/reset").raise_for_status()
    coach = {
        "service": "sessions",
        "base_url": f"{emulator}/api",
        "api_key_env": "TB_JULEP_KEY",
        "agent_id": AGENT_ID,
        "situation": "from config",
        **FAST,
    }
    routes = [{"source": "web", "agent": "coach", "situation": "You help with orders."}]
    monkeypatch.setenv("TB_JULEP_KEY", KEY)
    config = make_config(tmp_path, agents={"coach": coach}, routes=routes)
    store = Store(config.store.url)
    await store.migrate()
    # The tools go straight to the builder: the [tools.NAME] tables are the runner's business.
    services = {
        name: build_service(name, agent, [LOOKUP] if name == "coach" else [])
        for name, agent in config.agent_configs.items()
    }
    tools = OrderTools()
    bridge = Bridge(config, store, Router(config, store), services, tools=tools)
    channel = RecordingChannel()
    bridge.add_adapter(channel)
    await bridge.start()
    try:
        await bridge.submit(inbound("t", "hello", data={"thread_id": "t", "user_name": "ann"}))
        await channel.wait_for(1)
        await bridge.submit(inbound("t", 'where? !tool lookup_order {"order_id": "42"}'))
        await channel.wait_for(2)
        shipped = json.dumps({"order_id": "42", "status": "shipped"})
        assert channel.texts() == ["received: hello", f"tool lookup_order said: {shipped}"]
        assert [(agent, c.name) for agent, c in tools.calls] == [("coach", "lookup_order")]

        conv = await store.conversation_for_thread("web:-/-/t")
        assert conv is not None and conv.remote_id
        rows = await store.history(conv.id)
        assert [(r.role, r.content) for r in rows] == [
            ("user", "hello"),
            ("agent", "received: hello"),
            ("user", 'where? !tool lookup_order {"order_id": "42"}'),
            ("agent", ""),
            ("tool", shipped),
            ("agent", f"tool lookup_order said: {shipped}"),
        ]
        assert rows[3].tool_calls[0]["name"] == "lookup_order"

        log = await seen(emulator)
        opens = [r for r in log if r["method"] == "POST" and r["path"] == "/api/sessions"]
        assert len(opens) == 1
        assert opens[0]["json"]["situation"] == "You help with orders."  # the route's
        assert opens[0]["json"]["metadata"] == {
            "source": "web",
            "data": {"thread_id": "t", "user_name": "ann"},
        }
        chats = [r["json"]["messages"] for r in log if r["path"].endswith("/chat")]
        assert [[m["role"] for m in c] for c in chats] == [["user"], ["user"], ["function"]]
    finally:
        await stop_bridge(bridge)


async def test_bridge_with_start_bridge_and_the_default_route(
    tmp_path: Path, emulator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    httpx.post(f"{emulator}/_emulator/reset").raise_for_status()
    monkeypatch.setenv("JULEP_API_KEY", KEY)
    coach = {"service": "sessions", "base_url": emulator, "agent_id": AGENT_ID, "user_id": USER_ID}
    config = make_config(tmp_path, agents={"coach": coach}, default_agent="coach")
    channel = RecordingChannel()
    bridge = await start_bridge(config, channel)
    try:
        await bridge.submit(inbound("a", "one"))
        await channel.wait_for(1)
        await bridge.submit(inbound("a", "two"))
        await channel.wait_for(2)
        assert channel.texts() == ["received: one", "received: two"]
        conv = await bridge.store.conversation_for_thread("web:-/-/a")
        assert conv is not None and conv.remote_id
        session = await call("GET", f"{emulator}/sessions/{conv.remote_id}")
        assert (session["user_id"], session["situation"]) == (USER_ID, None)
    finally:
        await stop_bridge(bridge)
