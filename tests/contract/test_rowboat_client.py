"""Our RowBoat client, both API generations, against the RowBoat emulator: the wire format,
multi-agent transfers with internal messages hidden, the tool loop, and every error mapping."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from core.agents import build_service, emulators
from core.agents.emulators.rowboat import create_app
from core.agents.rowboat import RowboatAgent, RowboatConfig, build
from core.bridge import Bridge
from core.errors import AgentRejected, AgentUnavailable
from core.model import Conversation, ToolCall, Turn
from core.routing import Router
from core.store import Store
from tests.bridgekit import RUNNING, RecordingChannel, inbound, make_config, stop_bridge
from tests.servers import run_asgi

KEY, PROJECT = "client-key", "proj-1"
PATH = f"/api/v1/{PROJECT}/chat"
FAST = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.001, "max_backoff_s": 0.01}
ASK_TOOL = '!tool lookup_order {"order_id": "A1"}'

Make = Callable[..., RowboatAgent]


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    with run_asgi(create_app(api_keys={KEY}, projects={PROJECT})) as url:
        yield url


@pytest.fixture
def base_url(emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    httpx.post(f"{emulator}/_emulator/reset").raise_for_status()
    monkeypatch.setenv("ROWBOAT_API_KEY", KEY)
    return emulator


@pytest.fixture
async def make(base_url: str) -> AsyncIterator[Make]:
    """Build clients (against the emulator unless told otherwise); close them afterwards."""
    made: list[RowboatAgent] = []

    def factory(api_version: str = "state", **overrides: Any) -> RowboatAgent:
        raw = {"service": "rowboat", "base_url": base_url, "project_id": PROJECT}
        config = RowboatConfig.model_validate(
            {**raw, "api_version": api_version, **FAST, **overrides}
        )
        client = build("rb", config)
        made.append(client)
        return client

    yield factory
    for client in made:
        await client.aclose()


async def seen(base_url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        log: list[dict[str, Any]] = (await http.get(f"{base_url}/_emulator/requests")).json()
    return log


async def fault(base_url: str, **spec: Any) -> None:
    async with httpx.AsyncClient() as http:
        (await http.post(f"{base_url}/_emulator/faults", json=spec)).raise_for_status()


def conversation(**fields: Any) -> Conversation:
    values: dict[str, Any] = {"id": "c1", "thread_key": "web:-/-/t", "source": "web", "agent": "rb"}
    return Conversation(**{**values, **fields})


def user(text: str) -> Turn:
    return Turn(role="user", content=text, name="Ann")


def shape(turns: list[Turn]) -> list[tuple[str, str, str | None, bool, int]]:
    return [(t.role, t.content, t.name, t.hidden, len(t.tool_calls)) for t in turns]


# messages + state


async def test_state_two_turns(make: Make, base_url: str) -> None:
    client = make()
    assert client.stateful is False
    conv = conversation()
    assert await client.open(conv) is None

    first = await client.respond(conv, [], [user("hello")])
    assert first.visible == ["[Hub] received: hello"]
    assert shape(first.turns) == [("agent", "[Hub] received: hello", "Hub", False, 0)]
    assert first.tool_calls == [] and first.remote_id is None
    assert first.state is not None and first.state["last_agent_name"] == "Hub"
    conv.state = first.state
    second = await client.respond(conv, [user("hello"), *first.turns], [user("again")])
    assert second.visible == ["[Hub] received: again"]

    one, two = await seen(base_url)
    assert one["path"] == PATH
    assert one["json"] == {"messages": [{"role": "user", "content": "hello"}], "state": None}
    assert two["json"] == {
        "messages": [
            {"role": "user", "content": "hello"},
            {
                "role": "assistant",
                "content": "[Hub] received: hello",
                "sender": "Hub",
                "agenticSender": "Hub",
                "response_type": "external",
                "agenticResponseType": "external",
            },
            {"role": "user", "content": "again"},
        ],
        "state": first.state,  # sent back untouched
    }


async def test_state_start_agent_is_the_first_state(make: Make, base_url: str) -> None:
    answer = await make(start_agent="Specialist").respond(conversation(), [], [user("hi")])
    assert answer.visible == ["[Specialist] received: hi"]
    (request,) = await seen(base_url)
    assert request["json"]["state"] == {"last_agent_name": "Specialist"}


async def test_state_transfer_keeps_internal_messages_hidden(make: Make, base_url: str) -> None:
    client = make()
    conv = conversation()
    asked = [user("please transfer me")]
    moved = await client.respond(conv, [], asked)
    assert moved.visible == ["[Specialist] received: please transfer me"]
    assert shape(moved.turns) == [
        ("agent", "Hub hands over to Specialist", "Hub", True, 0),
        ("agent", "", "Hub", True, 1),
        ("tool", '{"assistant": "Specialist"}', "transfer_to_specialist", True, 0),
        ("agent", "[Specialist] received: please transfer me", "Specialist", False, 0),
    ]
    transfer = moved.turns[1].tool_calls[0]
    assert transfer.name == "transfer_to_specialist"
    assert moved.turns[2].tool_call_id == transfer.id
    assert moved.tool_calls == []  # the service answered its own transfer
    assert moved.state is not None and moved.state["last_agent_name"] == "Specialist"

    conv.state = moved.state
    after = await client.respond(conv, [*asked, *moved.turns], [user("and now?")])
    assert after.visible == ["[Specialist] received: and now?"]
    sent = (await seen(base_url))[1]["json"]["messages"]
    assert sent[1]["response_type"] == sent[1]["agenticResponseType"] == "internal"
    assert sent[2] == {
        "role": "assistant",
        "content": None,
        "sender": "Hub",
        "agenticSender": "Hub",
        "response_type": "internal",
        "agenticResponseType": "internal",
        "tool_calls": [
            {
                "id": transfer.id,
                "type": "function",
                "function": {"name": "transfer_to_specialist", "arguments": transfer.arguments},
            }
        ],
    }
    assert sent[3] == {
        "role": "tool",
        "content": '{"assistant": "Specialist"}',
        "tool_call_id": transfer.id,
        "tool_name": "transfer_to_specialist",
    }


async def test_state_tool_round_trip(make: Make, base_url: str) -> None:
    client = make()
    conv = conversation()
    asked = await client.respond(conv, [], [user(ASK_TOOL)])
    assert asked.visible == []
    (call,) = asked.tool_calls
    assert (call.name, json.loads(call.arguments)) == ("lookup_order", {"order_id": "A1"})
    assert shape(asked.turns) == [("agent", "", "Hub", True, 1)]

    conv.state = asked.state
    result = Turn(role="tool", content="shipped", name=call.name, tool_call_id=call.id)
    answer = await client.respond(conv, [user(ASK_TOOL), *asked.turns], [result])
    assert answer.visible == ["tool lookup_order said: shipped"]
    assert answer.tool_calls == []
    sent = (await seen(base_url))[1]["json"]["messages"]
    assert sent[-1] == {
        "role": "tool",
        "content": "shipped",
        "tool_call_id": call.id,
        "tool_name": "lookup_order",
    }


async def test_state_mock_tools_are_answered_by_the_service(make: Make, base_url: str) -> None:
    client = make(mock_tools={"weather": "sunny"})
    answer = await client.respond(conversation(), [], [user("!tool weather")])
    assert answer.visible == ["tool weather said: sunny"]
    assert answer.tool_calls == []
    (request,) = await seen(base_url)
    assert request["json"]["mockTools"] == {"weather": "sunny"}


async def test_state_history_cut_by_memory_starts_at_a_user_turn(make: Make, base_url: str) -> None:
    orphan = Turn(role="tool", content="x", name="t", tool_call_id="call_gone")
    answer = await make().respond(conversation(), [orphan], [user("hi")])
    assert answer.visible == ["[Hub] received: hi"]
    (request,) = await seen(base_url)
    assert request["json"]["messages"] == [{"role": "user", "content": "hi"}]


# conversationId + turn


async def test_turn_two_turns(make: Make, base_url: str) -> None:
    client = make("turn")
    assert client.stateful is True
    conv = conversation()
    assert await client.open(conv) is None  # the first turn makes the conversation

    first = await client.respond(conv, [], [user("hello")])
    assert first.visible == ["[Hub] received: hello"]
    assert first.remote_id and first.state is None
    conv.remote_id = first.remote_id
    second = await client.respond(conv, [], [user("again")])
    assert second.visible == ["[Hub] received: again"]
    assert second.remote_id is None  # nothing new was made

    one, two = await seen(base_url)
    assert one["path"] == PATH
    assert one["json"] == {
        "messages": [{"role": "user", "content": "hello"}],
        "mockTools": None,
        "stream": False,
    }
    assert two["json"] == {
        "messages": [{"role": "user", "content": "again"}],
        "conversationId": conv.remote_id,
        "mockTools": None,
        "stream": False,
    }


async def test_turn_transfer_and_tool_round_trip(make: Make, base_url: str) -> None:
    client = make("turn", mock_tools={"weather": "sunny"})
    conv = conversation()
    moved = await client.respond(conv, [], [user("transfer, please")])
    conv.remote_id = moved.remote_id
    assert moved.visible == ["[Specialist] received: transfer, please"]
    assert [(t.role, t.hidden) for t in moved.turns] == [
        ("agent", True),
        ("agent", True),
        ("tool", True),
        ("agent", False),
    ]

    asked = await client.respond(conv, [], [user(ASK_TOOL)])
    (call,) = asked.tool_calls
    assert shape(asked.turns) == [("agent", "", "Specialist", True, 1)]
    result = Turn(role="tool", content="shipped", name=call.name, tool_call_id=call.id)
    answer = await client.respond(conv, [], [result])
    assert answer.visible == ["tool lookup_order said: shipped"]

    mocked = await client.respond(conv, [], [user("!tool weather")])
    assert mocked.visible == ["tool weather said: sunny"] and mocked.tool_calls == []

    requests = [r["json"] for r in await seen(base_url)]
    assert requests[2]["messages"] == [
        {"role": "tool", "content": "shipped", "toolCallId": call.id, "toolName": "lookup_order"}
    ]
    assert all(r["mockTools"] == {"weather": "sunny"} for r in requests)


async def test_turn_unknown_conversation_is_rejected(make: Make, base_url: str) -> None:
    with pytest.raises(AgentRejected) as raised:
        await make("turn").respond(conversation(remote_id="gone"), [], [user("hi")])
    assert raised.value.status == 404
    assert "Conversation not found" in str(raised.value)
    assert len(await seen(base_url)) == 1


# Config and registry


def test_config_keys_and_defaults() -> None:
    config = RowboatConfig.model_validate({"service": "rowboat", "project_id": "p"})
    assert (config.base_url, config.api_key_env) == ("http://localhost:3000", "ROWBOAT_API_KEY")
    assert (config.api_version, config.start_agent, config.mock_tools) == ("state", None, None)
    with pytest.raises(ValidationError, match="start_agent applies"):
        RowboatConfig.model_validate(
            {"service": "rowboat", "project_id": "p", "api_version": "turn", "start_agent": "A"}
        )
    with pytest.raises(ValidationError, match="project_id"):
        RowboatConfig.model_validate({"service": "rowboat"})
    with pytest.raises(ValidationError, match="api_version"):
        RowboatConfig.model_validate({"service": "rowboat", "project_id": "p", "api_version": "x"})


def test_the_emulator_loads_by_name() -> None:
    assert emulators.load("rowboat") is create_app


# Error mapping


async def test_missing_key_is_a_400_without_retry(
    make: Make, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ROWBOAT_API_KEY")
    with pytest.raises(AgentRejected, match="Bearer") as raised:
        await make().respond(conversation(), [], [user("hi")])
    assert raised.value.status == 400
    assert len(await seen(base_url)) == 1


async def test_bad_key_is_a_403_without_retry(
    make: Make, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROWBOAT_API_KEY", "wrong")
    with pytest.raises(AgentRejected, match="Invalid API key") as raised:
        await make().respond(conversation(), [], [user("hi")])
    assert raised.value.status == 403
    assert len(await seen(base_url)) == 1


async def test_unknown_project_is_a_404(make: Make, base_url: str) -> None:
    with pytest.raises(AgentRejected, match="Project not found") as raised:
        await make("turn", project_id="nope").respond(conversation(), [], [user("hi")])
    assert raised.value.status == 404
    assert len(await seen(base_url)) == 1


async def test_bad_body_is_a_400(make: Make, base_url: str) -> None:
    client = make()
    bodies: list[Any] = [
        {"messages": [{"role": "user"}], "state": None},
        {"messages": [{"role": "assistant", "content": "no response type"}], "state": None},
        {"messages": [{"role": "tool", "content": "x", "toolCallId": "c"}], "state": None},
        {"messages": [], "state": None},
        {"messages": [{"role": "user", "content": "hi"}], "stream": True},
        [],
    ]
    for body in bodies:
        with pytest.raises(AgentRejected, match="Invalid request") as raised:
            await client.request("POST", PATH, json=body)
        assert raised.value.status == 400
    assert len(await seen(base_url)) == len(bodies)


@pytest.mark.parametrize("status", [401, 422])
async def test_other_4xx_are_rejected_without_retry(make: Make, base_url: str, status: int) -> None:
    await fault(base_url, status=status)
    with pytest.raises(AgentRejected, match="emulated fault") as raised:
        await make().respond(conversation(), [], [user("hi")])
    assert raised.value.status == status
    assert len(await seen(base_url)) == 1


async def test_429_waits_retry_after_then_succeeds(make: Make, base_url: str) -> None:
    await fault(base_url, status=429, retry_after=0.3)
    started = time.monotonic()
    answer = await make(max_backoff_s=1.0).respond(conversation(), [], [user("hi")])
    assert time.monotonic() - started >= 0.3
    assert answer.visible == ["[Hub] received: hi"]
    assert len(await seen(base_url)) == 2


async def test_a_retry_after_beyond_max_backoff_gives_up_at_once(make: Make, base_url: str) -> None:
    await fault(base_url, status=429, retry_after=120)
    with pytest.raises(AgentUnavailable) as raised:
        await make(max_backoff_s=1.0).respond(conversation(), [], [user("hi")])
    assert (raised.value.status, raised.value.retry_after) == (429, 120)
    assert len(await seen(base_url)) == 1


async def test_500_retries_then_unavailable(make: Make, base_url: str) -> None:
    await fault(base_url, status=500, times=10)
    with pytest.raises(AgentUnavailable, match="emulated fault") as raised:
        await make("turn", retries=2).respond(conversation(), [], [user("hi")])
    assert raised.value.status == 500
    assert len(await seen(base_url)) == 3


async def test_timeout_is_unavailable(make: Make, base_url: str) -> None:
    await fault(base_url, delay_s=2.0, times=2)
    with pytest.raises(AgentUnavailable, match="timed out"):
        await make(timeout_s=0.2, retries=1).respond(conversation(), [], [user("hi")])
    assert len(await seen(base_url)) == 2


async def test_connection_refused_is_unavailable(make: Make) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AgentUnavailable, match="cannot reach"):
        await make(base_url=f"http://127.0.0.1:{port}", retries=1).respond(
            conversation(), [], [user("hi")]
        )


# Replies the emulator never sends


def odd_service() -> FastAPI:
    app = FastAPI()

    @app.post("/api/v1/{project}/chat")
    async def chat(project: str) -> Any:
        if project == "state-no-messages":
            return {"state": {}}
        if project == "turn-no-id":
            return {"turn": {"id": "t", "output": []}}
        if project == "bad-role":
            return {"messages": [{"role": "robot", "content": "x"}], "state": None}
        return {"messages": [{"role": "assistant", "content": "shown", "agentName": "A"}]}

    return app


@pytest.fixture(scope="module")
def odd_url() -> Iterator[str]:
    with run_asgi(odd_service()) as url:
        yield url


@pytest.mark.parametrize(
    ("project", "version", "problem"),
    [
        ("state-no-messages", "state", "messages"),
        ("turn-no-id", "turn", "conversationId"),
        ("bad-role", "state", "role"),
    ],
)
async def test_a_reply_of_the_wrong_shape_is_rejected(
    make: Make, odd_url: str, project: str, version: str, problem: str
) -> None:
    client = make(version, base_url=odd_url, project_id=project)
    with pytest.raises(AgentRejected, match=problem):
        await client.respond(conversation(remote_id="r"), [], [user("q")])


async def test_a_message_without_response_type_is_not_shown(make: Make, odd_url: str) -> None:
    answer = await make(base_url=odd_url, project_id="plain").respond(
        conversation(), [], [user("q")]
    )
    assert answer.visible == []
    assert shape(answer.turns) == [("agent", "shown", "A", True, 0)]
    assert answer.state is None  # no state: the conversation keeps the one it had


# The real bridge, with a tool runner


class OrderDesk:
    """A tool runner that knows one tool and remembers the calls it ran."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def run(self, agent: str, call: ToolCall) -> str:
        self.calls.append((agent, call.name, json.loads(call.arguments)))
        return json.dumps({"status": "shipped"})


@pytest.mark.parametrize("api_version", ["state", "turn"])
async def test_the_bridge_runs_a_transfer_and_a_tool_round_trip(
    store_url: str, base_url: str, api_version: str
) -> None:
    agent = {
        "service": "rowboat",
        "base_url": base_url,
        "project_id": PROJECT,
        "api_version": api_version,
        "tools": ["lookup_order"],
        **FAST,
    }
    tool = {
        "description": "Look up an order by id",
        "arguments": {"type": "object", "properties": {"order_id": {"type": "string"}}},
        "url": "http://127.0.0.1:9/lookup",  # never called: the test's runner answers
    }
    config = make_config(
        store_url, agents={"rb": agent}, tools={"lookup_order": tool}, default_agent="rb"
    )
    store = Store(config.store.url)
    await store.migrate()
    services = {name: build_service(name, cfg) for name, cfg in config.agent_configs.items()}
    desk = OrderDesk()
    bridge = Bridge(config, store, Router(config, store), services, tools=desk)
    channel = RecordingChannel()
    bridge.add_adapter(channel)
    await bridge.start()
    RUNNING.append(bridge)

    for count, text in enumerate(["hello", "transfer me", ASK_TOOL], start=1):
        await bridge.submit(inbound("t", text))
        await channel.wait_for(count)
    assert channel.texts() == [
        "[Hub] received: hello",
        "[Specialist] received: transfer me",
        'tool lookup_order said: {"status": "shipped"}',
    ]
    assert desk.calls == [("rb", "lookup_order", {"order_id": "A1"})]

    conv = await store.conversation_for_thread("web:-/-/t")
    assert conv is not None
    rows = await store.history(conv.id)
    assert [(r.role, r.kind) for r in rows] == [
        ("user", "message"),
        ("agent", "message"),
        ("user", "message"),
        ("agent", "hidden"),  # Hub hands over to Specialist
        ("agent", "hidden"),  # transfer_to_specialist
        ("tool", "hidden"),  # RowBoat's own answer to it
        ("agent", "message"),
        ("user", "message"),
        ("agent", "hidden"),  # Specialist asks for lookup_order
        ("tool", "message"),  # our tool's result
        ("agent", "message"),
    ]
    requests = [r["json"] for r in await seen(base_url)]
    assert len(requests) == 4  # hello, transfer, tool call, tool result
    if api_version == "state":
        assert conv.remote_id is None
        assert conv.state is not None and conv.state["last_agent_name"] == "Specialist"
        assert len(requests[3]["messages"]) == 10  # the whole history, internal messages too
        assert requests[0]["state"] is None
        sent = [r["state"]["last_agent_name"] for r in requests[1:]]
        assert sent == ["Hub", "Specialist", "Specialist"]
        # The tool loop's second call carries the state its first call returned.
        specialist = requests[3]["state"]["agent_data"][1]
        assert specialist["history"][-1]["tool_calls"][0]["function"]["name"] == "lookup_order"
    else:
        assert conv.remote_id and conv.state is None
        assert "conversationId" not in requests[0]  # RowBoat made it: its id is our remote_id
        assert all(r["conversationId"] == conv.remote_id for r in requests[1:])
        assert [len(r["messages"]) for r in requests] == [1, 1, 1, 1]  # only what is new
    await stop_bridge(bridge)
