"""Our Scale GP execute client against the execute emulator: wire format, tools, last_k, errors,
and the real bridge running a conversation and a tool round trip through it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from core.agents import build_service, config_model, emulators
from core.agents.emulators.execute import create_app
from core.agents.execute import ExecuteAgent, ExecuteConfig, build, wire_messages
from core.bridge import Bridge
from core.config import parse_config
from core.errors import AgentRejected, AgentServiceError, AgentUnavailable, ConfigError
from core.model import Conversation, ToolCall, ToolSpec, Turn
from core.routing import Router
from core.store import Store
from tests.bridgekit import RUNNING, RecordingChannel, inbound, make_config, stop_bridge
from tests.servers import run_asgi

KEY = "client-key"
FAST = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.001, "max_backoff_s": 0.01}
LOOKUP = ToolSpec(
    "lookup_order",
    "Look up an order by id",
    {
        "type": "object",
        "properties": {"order_id": {"type": "string", "description": "the order's id"}},
        "required": ["order_id"],
    },
)
LOOKUP_WIRE = {
    "name": "lookup_order",
    "description": "Look up an order by id",
    "arguments": {
        "type": "object",
        "properties": {"order_id": {"type": "string", "description": "the order's id"}},
        "required": ["order_id"],
    },
}
ARGS = '{"order_id": "A1"}'
ASK_TOOL = f"!tool lookup_order {ARGS}"

Make = Callable[..., ExecuteAgent]


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    with run_asgi(create_app(api_keys={KEY})) as url:
        yield url


@pytest.fixture
def base_url(emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    httpx.post(f"{emulator}/_emulator/reset").raise_for_status()
    monkeypatch.setenv("SGP_API_KEY", KEY)
    return emulator


@pytest.fixture
async def make(base_url: str) -> AsyncIterator[Make]:
    """Build clients (against the emulator unless told otherwise); close them afterwards."""
    made: list[ExecuteAgent] = []

    def factory(tools: tuple[ToolSpec, ...] = (), **overrides: Any) -> ExecuteAgent:
        raw = {"service": "execute", "base_url": base_url, **FAST, **overrides}
        client = build("helper", ExecuteConfig.model_validate(raw), tools)
        made.append(client)
        return client

    yield factory
    for client in made:
        await client.aclose()


def seen(base_url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{base_url}/_emulator/requests").json())


def kept(base_url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{base_url}/_emulator/kept").json())


def fault(base_url: str, **spec: Any) -> None:
    httpx.post(f"{base_url}/_emulator/faults", json=spec).raise_for_status()


def conversation() -> Conversation:
    return Conversation(id="c1", thread_key="web:-/-/t", source="web", agent="helper")


def user(text: str) -> Turn:
    return Turn(role="user", content=text, name="Ann")


async def test_two_turns_send_the_history_and_the_settings(make: Make, base_url: str) -> None:
    client = make(
        instructions="Be brief.", memory_k=6, temperature=0.5, max_tokens=300, stop_sequences=["#"]
    )
    assert client.stateful is False
    assert await client.open(conversation()) is None

    first = await client.respond(conversation(), [], [user("hello")])
    assert first.visible == ["[gpt-4] received: hello"]
    assert (first.tool_calls, first.remote_id, first.state) == ([], None, None)
    second = await client.respond(conversation(), [user("hello"), *first.turns], [user("again")])
    assert second.visible == ["[gpt-4] received: again"]

    one, two = seen(base_url)
    assert (one["method"], one["path"], one["query"]) == ("POST", "/v4/agents/execute", {})
    assert one["json"] == {
        "messages": [{"role": "user", "content": "hello"}],
        "model": "gpt-4",
        "tools": [],
        "instructions": "Be brief.",
        "memory_strategy": {"name": "last_k", "params": {"k": 6}},
        "model_parameters": {"temperature": 0.5, "max_tokens": 300, "stop_sequences": ["#"]},
    }
    assert two["json"]["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "agent", "content": "[gpt-4] received: hello"},
        {"role": "user", "content": "again"},
    ]


async def test_defaults_omit_instructions_and_take_k_from_memory(make: Make, base_url: str) -> None:
    await make(memory=7, model="claude-2").respond(conversation(), [], [user("hi")])
    (call,) = seen(base_url)
    assert "instructions" not in call["json"]
    assert call["json"]["model"] == "claude-2"
    assert call["json"]["memory_strategy"] == {"name": "last_k", "params": {"k": 7}}
    assert call["json"]["model_parameters"] == {
        "temperature": 0.2,
        "max_tokens": None,
        "stop_sequences": None,
    }


async def test_the_account_id_header_is_sent_when_configured(
    make: Make, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TB_SGP_ACCOUNT", "acct-1")
    await make(account_id_env="TB_SGP_ACCOUNT").respond(conversation(), [], [user("a")])
    await make().respond(conversation(), [], [user("b")])
    assert [k["account_id"] for k in kept(base_url)] == ["acct-1", None]


async def test_tool_round_trip(make: Make, base_url: str) -> None:
    client = make(tools=(LOOKUP,))
    asked = await client.respond(conversation(), [], [user(ASK_TOOL)])
    (call,) = asked.tool_calls
    assert (call.name, json.loads(call.arguments)) == ("lookup_order", {"order_id": "A1"})
    assert call.id
    assert asked.visible == []
    (turn,) = asked.turns  # the agent's request, for the history the bridge keeps
    assert (turn.role, turn.content, turn.tool_calls) == ("agent", "", [call])

    result = Turn(
        role="tool", content='{"status": "shipped"}', name=call.name, tool_call_id=call.id
    )
    done = await client.respond(conversation(), [user(ASK_TOOL), *asked.turns], [result])
    assert done.visible == ['tool lookup_order said: {"status": "shipped"}']
    assert done.tool_calls == []

    first, second = seen(base_url)
    assert first["json"]["tools"] == [LOOKUP_WIRE]
    assert second["json"]["tools"] == [LOOKUP_WIRE]
    assert second["json"]["messages"] == [
        {"role": "user", "content": ASK_TOOL},
        {"role": "agent", "tool_request": {"name": "lookup_order", "arguments": call.arguments}},
        {"role": "tool", "name": "lookup_order", "content": '{"status": "shipped"}'},
    ]


async def test_a_tool_not_offered_is_not_requested(make: Make) -> None:
    answer = await make().respond(conversation(), [], [user(ASK_TOOL)])
    assert answer.tool_calls == []
    assert answer.visible == [f"[gpt-4] received: {ASK_TOOL}"]


async def test_tool_properties_without_a_description_are_described_by_name(
    make: Make, base_url: str
) -> None:
    bare = ToolSpec("ping", "Ping a host", {"properties": {"host": {"type": "string"}}})
    answer = await make(tools=(bare,)).respond(conversation(), [], [user("!tool ping")])
    assert [(c.name, c.arguments) for c in answer.tool_calls] == [("ping", "{}")]
    assert seen(base_url)[0]["json"]["tools"] == [
        {
            "name": "ping",
            "description": "Ping a host",
            "arguments": {
                "type": "object",
                "properties": {"host": {"type": "string", "description": "host"}},
            },
        }
    ]


async def test_last_k_keeps_only_the_newest_messages(make: Make, base_url: str) -> None:
    history = [
        user("one"),
        Turn(role="agent", content="[gpt-4] received: one"),
        user("two"),
        Turn(role="agent", content="[gpt-4] received: two"),
    ]
    answer = await make(memory_k=3).respond(conversation(), history, [user("three")])
    assert answer.visible == ["[gpt-4] received: three"]
    (memory,) = kept(base_url)
    assert (memory["k"], memory["received"]) == (3, 5)
    assert memory["kept"] == [
        {"role": "user", "content": "two"},
        {"role": "agent", "content": "[gpt-4] received: two"},
        {"role": "user", "content": "three"},
    ]
    assert len(seen(base_url)[0]["json"]["messages"]) == 5  # trimming is the service's job

    # With k=1 after a tool result, the model sees the result alone.
    result = Turn(role="tool", content="42", name="lookup_order", tool_call_id="x")
    lone = await make(memory_k=1).respond(conversation(), history, [result])
    assert lone.visible == ["tool lookup_order said: 42"]
    assert kept(base_url)[-1]["kept"] == [{"role": "tool", "name": "lookup_order", "content": "42"}]


def test_wire_messages_cover_every_role() -> None:
    calls = [ToolCall("a", "one", "{}"), ToolCall("b", "two", '{"x": 1}')]
    turns = [
        Turn(role="system", content="be nice"),
        Turn(role="user", content="hi", name="Ann", hidden=True),
        Turn(role="agent", content="let me look", tool_calls=calls),
        Turn(role="tool", content="1", tool_call_id="a"),
    ]
    assert wire_messages(turns) == [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "agent", "content": "let me look"},
        {"role": "agent", "tool_request": {"name": "one", "arguments": "{}"}},
        {"role": "agent", "tool_request": {"name": "two", "arguments": '{"x": 1}'}},
        {"role": "tool", "name": "tool", "content": "1"},
    ]


def test_the_config_names_a_bad_model_and_keeps_secrets_out() -> None:
    agent = {"service": "execute", "model": "gpt-5", "tools": ["lookup_order"]}
    with pytest.raises(ConfigError) as raised:
        parse_config({"agents": {"x": agent}, "default_agent": "x"}, "t.toml")
    assert "agents.x.model" in str(raised.value)
    with pytest.raises(ConfigError, match="api_key"):
        parse_config({"agents": {"x": {"service": "execute", "api_key": "s"}}}, "t.toml")
    assert config_model("execute") is ExecuteConfig


# Error mapping


async def test_401_is_rejected_without_retry(
    make: Make, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SGP_API_KEY", "wrong")
    with pytest.raises(AgentRejected) as raised:
        await make().respond(conversation(), [], [user("hi")])
    assert raised.value.status == 401
    assert "Invalid API key" in str(raised.value)
    monkeypatch.delenv("SGP_API_KEY")
    with pytest.raises(AgentRejected, match="Missing API key"):
        await make().respond(conversation(), [], [user("hi")])
    assert len(seen(base_url)) == 2


async def test_404_is_rejected_without_retry(make: Make, base_url: str) -> None:
    with pytest.raises(AgentRejected) as raised:
        await make(base_url=f"{base_url}/v3").respond(conversation(), [], [user("hi")])
    assert raised.value.status == 404
    fault(base_url, status=404)
    with pytest.raises(AgentRejected):
        await make().respond(conversation(), [], [user("hi")])
    assert len(seen(base_url)) == 2


async def test_422_is_rejected_without_retry(make: Make, base_url: str) -> None:
    odd_type = ToolSpec("t", "d", {"type": "object", "properties": {"x": {"type": "date"}}})
    with pytest.raises(AgentRejected) as raised:
        await make(tools=(odd_type,)).respond(conversation(), [], [user("hi")])
    assert raised.value.status == 422
    assert "tools" in str(raised.value)
    fault(base_url, status=422)
    with pytest.raises(AgentRejected):
        await make().respond(conversation(), [], [user("hi")])
    assert len(seen(base_url)) == 2


async def test_429_waits_retry_after_then_succeeds(make: Make, base_url: str) -> None:
    fault(base_url, status=429, retry_after=0.3)
    started = time.monotonic()
    answer = await make(max_backoff_s=1.0).respond(conversation(), [], [user("hi")])
    assert time.monotonic() - started >= 0.3
    assert answer.visible == ["[gpt-4] received: hi"]
    assert len(seen(base_url)) == 2


async def test_a_retry_after_beyond_max_backoff_gives_up_at_once(make: Make, base_url: str) -> None:
    fault(base_url, status=429, retry_after=120)
    with pytest.raises(AgentUnavailable) as raised:
        await make(max_backoff_s=1.0).respond(conversation(), [], [user("hi")])
    assert (raised.value.status, raised.value.retry_after) == (429, 120)
    assert len(seen(base_url)) == 1


async def test_500_retries_then_unavailable(make: Make, base_url: str) -> None:
    fault(base_url, status=500, times=10)
    with pytest.raises(AgentUnavailable) as raised:
        await make(retries=2).respond(conversation(), [], [user("hi")])
    assert raised.value.status == 500
    assert len(seen(base_url)) == 3


async def test_timeout_is_unavailable(make: Make, base_url: str) -> None:
    fault(base_url, delay_s=2.0, times=2)
    with pytest.raises(AgentUnavailable, match="timed out"):
        await make(timeout_s=0.2, retries=1).respond(conversation(), [], [user("hi")])
    assert len(seen(base_url)) == 2


async def test_connection_refused_is_unavailable(make: Make) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AgentUnavailable, match="cannot reach"):
        await make(base_url=f"http://127.0.0.1:{port}", retries=1).respond(
            conversation(), [], [user("hi")]
        )


# Replies the emulator never sends: a real server on loopback that answers them.


def odd_service() -> FastAPI:
    app = FastAPI()
    replies: dict[str, Any] = {
        "list": [],
        "action": {"action": "think", "context": {}},
        "tool": {"action": "tool_request", "context": {"content": "x", "tool_request": None}},
        "content": {"action": "content", "context": {"content": None}},
    }

    @app.post("/{kind}/v4/agents/execute")
    async def execute(kind: str) -> Any:
        return replies[kind]

    return app


@pytest.fixture(scope="module")
def odd_url() -> Iterator[str]:
    with run_asgi(odd_service()) as url:
        yield url


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("list", "unreadable"),
        ("action", "action"),
        ("tool", "without context.tool_request"),
        ("content", "without context.content"),
    ],
)
async def test_a_reply_of_the_wrong_shape_is_rejected(
    make: Make, odd_url: str, kind: str, problem: str
) -> None:
    client = make(base_url=f"{odd_url}/{kind}")
    with pytest.raises(AgentServiceError, match=problem) as raised:
        await client.respond(conversation(), [], [user("q")])
    assert isinstance(raised.value, AgentRejected)


def test_the_emulator_loads_by_name() -> None:
    assert emulators.load("execute") is create_app


# The real bridge, with a tool runner


class OrderDesk:
    """A tool runner that knows one tool and remembers the calls it ran."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def run(self, agent: str, call: ToolCall) -> str:
        self.calls.append((agent, call.name, json.loads(call.arguments)))
        return json.dumps({"status": "shipped"})


async def test_the_bridge_runs_a_conversation_and_a_tool_round_trip(
    store_url: str, base_url: str
) -> None:
    agent = {"service": "execute", "base_url": base_url, "tools": ["lookup_order"], **FAST}
    tool = {
        "description": LOOKUP.description,
        "arguments": LOOKUP.parameters,
        "url": "http://127.0.0.1:9/lookup",  # never called: the test's runner answers
    }
    config = make_config(
        store_url, agents={"helper": agent}, tools={"lookup_order": tool}, default_agent="helper"
    )
    store = Store(config.store.url)
    await store.migrate()
    services = {
        name: build_service(name, cfg, [LOOKUP] if name == "helper" else ())
        for name, cfg in config.agent_configs.items()
    }
    desk = OrderDesk()
    bridge = Bridge(config, store, Router(config, store), services, tools=desk)
    channel = RecordingChannel()
    bridge.add_adapter(channel)
    await bridge.start()
    RUNNING.append(bridge)

    await bridge.submit(inbound("t", "hello"))
    await channel.wait_for(1)
    await bridge.submit(inbound("t", ASK_TOOL))
    await channel.wait_for(2)
    assert channel.texts() == [
        "[gpt-4] received: hello",
        'tool lookup_order said: {"status": "shipped"}',
    ]
    assert desk.calls == [("helper", "lookup_order", {"order_id": "A1"})]

    calls = [r["json"] for r in seen(base_url)]
    assert len(calls) == 3
    assert calls[2]["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "agent", "content": "[gpt-4] received: hello"},
        {"role": "user", "content": ASK_TOOL},
        {
            "role": "agent",
            "tool_request": {"name": "lookup_order", "arguments": '{"order_id": "A1"}'},
        },
        {"role": "tool", "name": "lookup_order", "content": '{"status": "shipped"}'},
    ]
    assert all(c["tools"] == [LOOKUP_WIRE] for c in calls)

    conv = await store.conversation_for_thread("web:-/-/t")
    assert conv is not None and conv.remote_id is None  # execute keeps nothing remotely
    rows = await store.history(conv.id)
    assert [(r.role, bool(r.tool_calls), r.tool_call_id is not None) for r in rows] == [
        ("user", False, False),
        ("agent", False, False),
        ("user", False, False),
        ("agent", True, False),
        ("tool", False, True),
        ("agent", False, False),
    ]
    assert rows[4].tool_call_id == rows[3].tool_calls[0]["id"]
    await stop_bridge(bridge)
