"""Our OpenAI-compatible client against the emulator: the wire format, streaming, tools, every
error mapping, and the real bridge running a conversation and a tool round trip through it."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from core.agents import build_service, config_model, emulators
from core.agents.base import StreamEvent
from core.agents.emulators.openai import create_app
from core.agents.openai import OpenAIAgent, OpenAIConfig, build, chat_messages
from core.bridge import Bridge
from core.errors import AgentRejected, AgentUnavailable
from core.model import Conversation, ToolCall, ToolSpec, Turn
from core.routing import Router
from core.store import Store
from tests.bridgekit import RUNNING, RecordingChannel, inbound, make_config, stop_bridge
from tests.servers import run_asgi

KEY = "client-key"
MODEL = "gpt-4o-mini"
FAST = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.001, "max_backoff_s": 0.01}
LOOKUP = ToolSpec(
    "lookup_order",
    "Look up an order by id",
    {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
)
LOOKUP_WIRE = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Look up an order by id",
        "parameters": LOOKUP.parameters,
    },
}
ASK_TOOL = '!tool lookup_order {"order_id": "A1"}'
LONG = "x" * 300_000  # one streamed event longer than aiohttp's readline takes (128 KiB)

Make = Callable[..., OpenAIAgent]


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    with run_asgi(create_app(api_keys={KEY})) as url:
        yield url


@pytest.fixture
def base_url(emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    httpx.post(f"{emulator}/_emulator/reset").raise_for_status()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return emulator


@pytest.fixture
async def make(base_url: str) -> AsyncIterator[Make]:
    """Build clients (against the emulator unless told otherwise); close them afterwards."""
    made: list[OpenAIAgent] = []

    def factory(tools: tuple[ToolSpec, ...] = (), **overrides: Any) -> OpenAIAgent:
        raw = {"service": "openai", "base_url": base_url, "model": MODEL, **FAST, **overrides}
        client = build("gpt", OpenAIConfig.model_validate(raw), tools)
        made.append(client)
        return client

    yield factory
    for client in made:
        assert client._in_flight == 0  # every stream gave its place back
        await client.aclose()


def seen(base_url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{base_url}/_emulator/requests").json())


def fault(base_url: str, **spec: Any) -> None:
    httpx.post(f"{base_url}/_emulator/faults", json=spec).raise_for_status()


def conversation(**fields: Any) -> Conversation:
    return Conversation(id="c1", thread_key="web:-/-/t", source="web", agent="gpt", **fields)


def user(text: str, name: str | None = "Ann") -> Turn:
    return Turn(role="user", content=text, name=name)


def said(text: str, model: str = MODEL) -> str:
    return f"[{model}] received: {text}"


async def collect(client: OpenAIAgent, turns: list[Turn]) -> list[StreamEvent]:
    return [event async for event in client.stream(conversation(), [], turns)]


@pytest.mark.parametrize("stream", [False, True])
async def test_two_turns_send_the_history_and_the_settings(
    make: Make, base_url: str, stream: bool
) -> None:
    client = make(system_prompt="Be brief.", temperature=0.3, stream=stream)
    assert await client.open(conversation()) is None
    first = await client.respond(conversation(), [], [user("hello")])
    assert first.visible == [said("hello")]
    assert [(t.role, t.name, t.tool_calls) for t in first.turns] == [("agent", "gpt", [])]
    assert (first.tool_calls, first.remote_id, first.state) == ([], None, None)
    second = await client.respond(conversation(), [user("hello"), *first.turns], [user("again")])
    assert second.visible == [said("again")]

    bodies = [r["json"] for r in seen(base_url)]
    assert [r["path"] for r in seen(base_url)] == ["/chat/completions"] * 2
    assert bodies[1] == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello", "name": "Ann"},
            {"role": "assistant", "content": said("hello")},
            {"role": "user", "content": "again", "name": "Ann"},
        ],
        "temperature": 0.3,
        **({"stream": True} if stream else {}),
    }


async def test_defaults_send_only_model_and_messages(make: Make, base_url: str) -> None:
    await make().respond(conversation(), [], [user("hi", name=None)])
    (call,) = seen(base_url)
    assert call["json"] == {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


async def test_a_route_situation_replaces_the_system_prompt(make: Make, base_url: str) -> None:
    client = make(system_prompt="default")
    await client.respond(conversation(situation="You help with pensions."), [], [user("hi")])
    assert seen(base_url)[0]["json"]["messages"][0] == {
        "role": "system",
        "content": "You help with pensions.",
    }


async def test_user_names_are_sanitised_or_left_out(make: Make, base_url: str) -> None:
    turns = [user("a", "Ann Lee-Smith"), user("b", "太郎"), user("c", "x" * 80)]
    await make().respond(conversation(), [], turns)
    await make(send_names=False).respond(conversation(), [], turns)
    first, second = (r["json"]["messages"] for r in seen(base_url))
    assert [m.get("name") for m in first] == ["Ann_Lee-Smith", None, "x" * 64]
    assert all("name" not in m for m in second)


async def test_stream_yields_the_growing_text_then_the_answer(make: Make, base_url: str) -> None:
    events = await collect(make(), [user("one two three")])
    texts = [e.text for e in events if not e.done]
    assert texts == [
        "[gpt-4o-mini]",
        "[gpt-4o-mini] received:",
        "[gpt-4o-mini] received: one",
        "[gpt-4o-mini] received: one two",
        "[gpt-4o-mini] received: one two three",
    ]
    final = events[-1]
    assert final.done and [e.done for e in events].count(True) == 1
    assert final.text == said("one two three")
    assert final.response is not None and final.response.visible == [said("one two three")]
    assert seen(base_url)[0]["json"]["stream"] is True


async def test_a_stream_left_early_gives_its_connection_back(make: Make) -> None:
    client = make(max_connections=1)  # a connection kept would leave the next call waiting
    events = client.stream(conversation(), [], [user("one two three")])
    first = await anext(events)
    assert first.text == "[gpt-4o-mini]"
    assert client._in_flight == 1
    await events.aclose()
    assert client._in_flight == 0
    answer = await asyncio.wait_for(client.respond(conversation(), [], [user("again")]), 5)
    assert answer.visible == [said("again")]


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_round_trip(make: Make, base_url: str, stream: bool) -> None:
    client = make(tools=(LOOKUP,), stream=stream)
    asked = await client.respond(conversation(), [], [user(ASK_TOOL)])
    (call,) = asked.tool_calls
    assert (call.name, json.loads(call.arguments)) == ("lookup_order", {"order_id": "A1"})
    assert call.id.startswith("call_")
    (turn,) = asked.turns  # the agent's request, for the history the bridge keeps
    assert (turn.role, turn.content, turn.tool_calls) == ("agent", "", [call])
    assert asked.visible == []

    result = Turn(
        role="tool", content='{"status": "shipped"}', name=call.name, tool_call_id=call.id
    )
    answer = await client.respond(conversation(), [user(ASK_TOOL)], [turn, result])
    assert answer.visible == ['tool lookup_order said: {"status": "shipped"}']
    assert answer.tool_calls == []

    first, second = (r["json"] for r in seen(base_url))
    assert first["tools"] == second["tools"] == [LOOKUP_WIRE]
    assert second["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "lookup_order", "arguments": '{"order_id":"A1"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'},
    ]


async def test_a_tool_not_offered_is_not_requested(make: Make) -> None:
    answer = await make().respond(conversation(), [], [user(ASK_TOOL)])
    assert answer.tool_calls == []
    assert answer.visible == [said(ASK_TOOL)]


def test_history_pairs_every_call_with_its_result() -> None:
    calls = [ToolCall("c1", "a", "{}"), ToolCall("c2", "b", "{}")]
    turns = [
        Turn(role="tool", content="orphan: its call was cut from the history", tool_call_id="c0"),
        user("q"),
        Turn(role="agent", content="let me look", tool_calls=calls),
        user("interjection"),
        Turn(role="tool", content="r2", tool_call_id="c2"),
        Turn(role="tool", content="r1", tool_call_id="c1"),
        Turn(role="agent", content="", tool_calls=[ToolCall("c3", "a", "{}")]),  # never answered
        Turn(role="system", content="a note"),
        Turn(role="agent", content="done", hidden=True),
    ]
    assert chat_messages("sys", turns, send_names=False) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "let me look",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "r1"},
        {"role": "tool", "tool_call_id": "c2", "content": "r2"},
        {"role": "user", "content": "interjection"},
        {"role": "system", "content": "a note"},
        {"role": "assistant", "content": "done"},
    ]


async def test_the_emulator_accepts_a_repaired_history(make: Make) -> None:
    history = [
        user(ASK_TOOL),
        Turn(role="agent", content="", tool_calls=[ToolCall("call_1", "lookup_order", "{}")]),
    ]  # the bridge stopped the tool loop: the call has no result
    answer = await make(tools=(LOOKUP,)).respond(conversation(), history, [user("well?")])
    assert answer.visible == [said("well?")]


def test_the_config_keeps_secrets_out_and_defaults_to_openai() -> None:
    config = config_model("openai").model_validate({"service": "openai", "model": "gpt-4o"})
    assert isinstance(config, OpenAIConfig)
    assert (config.base_url, config.api_key_env) == ("https://api.openai.com/v1", "OPENAI_API_KEY")
    assert (config.stream, config.tools, config.temperature) == (False, [], None)
    with pytest.raises(ValueError, match="model"):
        OpenAIConfig.model_validate({"service": "openai"})
    with pytest.raises(ValueError, match="api_key"):
        OpenAIConfig.model_validate({"service": "openai", "model": "m", "api_key": "sk-1"})


# Error mapping


async def test_401_is_rejected_without_retry(
    make: Make, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-1234")
    with pytest.raises(AgentRejected) as raised:
        await make().respond(conversation(), [], [user("hi")])
    assert raised.value.status == 401
    assert "Incorrect API key provided" in str(raised.value)
    with pytest.raises(AgentRejected, match="401"):
        await collect(make(), [user("hi")])
    assert len(seen(base_url)) == 2


async def test_no_key_sends_no_header(
    make: Make, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(AgentRejected, match="didn't provide an API key"):
        await make().respond(conversation(), [], [user("hi")])
    with pytest.raises(AgentRejected, match="didn't provide an API key"):
        await make(api_key_env=None).respond(conversation(), [], [user("hi")])


@pytest.mark.parametrize("stream", [False, True])
async def test_404_unknown_model_is_rejected(make: Make, base_url: str, stream: bool) -> None:
    with pytest.raises(AgentRejected) as raised:
        await make(model="gpt-9", stream=stream).respond(conversation(), [], [user("hi")])
    assert raised.value.status == 404
    assert "does not exist" in str(raised.value)
    assert len(seen(base_url)) == 1


async def test_400_and_422_are_rejected_without_retry(make: Make, base_url: str) -> None:
    client = make()
    with pytest.raises(AgentRejected) as raised:
        await client.request("POST", "/chat/completions", json={"model": MODEL, "messages": []})
    assert raised.value.status == 400
    fault(base_url, status=422)
    with pytest.raises(AgentRejected) as raised:
        await client.respond(conversation(), [], [user("hi")])
    assert raised.value.status == 422
    assert len(seen(base_url)) == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_429_waits_retry_after_then_succeeds(make: Make, base_url: str, stream: bool) -> None:
    fault(base_url, status=429, retry_after=0.3)
    started = time.monotonic()
    answer = await make(max_backoff_s=1.0, stream=stream).respond(conversation(), [], [user("hi")])
    assert time.monotonic() - started >= 0.3
    assert answer.visible == [said("hi")]
    assert len(seen(base_url)) == 2


async def test_a_retry_after_beyond_max_backoff_gives_up_at_once(make: Make, base_url: str) -> None:
    fault(base_url, status=429, retry_after=120)
    with pytest.raises(AgentUnavailable) as raised:
        await make(max_backoff_s=1.0).respond(conversation(), [], [user("hi")])
    assert (raised.value.status, raised.value.retry_after) == (429, 120)
    assert len(seen(base_url)) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_500_retries_then_unavailable(make: Make, base_url: str, stream: bool) -> None:
    fault(base_url, status=500, times=10)
    with pytest.raises(AgentUnavailable) as raised:
        await make(retries=2, stream=stream).respond(conversation(), [], [user("hi")])
    assert raised.value.status == 500
    assert len(seen(base_url)) == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_timeout_is_unavailable(make: Make, base_url: str, stream: bool) -> None:
    fault(base_url, delay_s=2.0, times=2)
    client = make(timeout_s=0.2, retries=1, stream=stream)
    with pytest.raises(AgentUnavailable, match="timed out"):
        await client.respond(conversation(), [], [user("hi")])
    assert len(seen(base_url)) == 2


async def test_connection_refused_is_unavailable(make: Make) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AgentUnavailable, match="cannot reach"):
        await make(base_url=f"http://127.0.0.1:{port}", retries=1).respond(
            conversation(), [], [user("hi")]
        )


# What the emulator never sends: a real server on loopback that answers it.


def _sse(*events: Any, done: bool = True, stall_s: float = 0.0) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        for event in events:
            if isinstance(event, str) and event.startswith(":"):
                yield f"{event}\n"  # an SSE comment, as keep-alives are sent
            else:
                yield f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"
        if stall_s:
            await asyncio.sleep(stall_s)
        if done:
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def odd_service() -> FastAPI:
    """Answers by the latest user message: each a way some server out there streams."""
    app = FastAPI()

    @app.post("/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        case = body["messages"][-1]["content"]
        if case == "json-to-a-stream":  # a server that cannot stream
            message = {"role": "assistant", "content": "whole"}
            return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        if case == "no-choices":
            return {"id": "x", "choices": []}
        if case == "refusal":
            message = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
            return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        if case == "loose-tools":  # no index, id and name repeated, arguments as an object
            call = {"id": "t1", "function": {"name": "f", "arguments": {"k": 1}}}
            return _sse(
                {"choices": []},  # filter results first, as Azure sends
                ": a comment line",
                _chunk({"content": "Hi", "tool_calls": [call]}),
                _chunk({"tool_calls": [{"id": "t1", "function": {"name": "f"}}]}, "tool_calls"),
            )
        if case == "fragments":
            head = {"index": 1, "id": "b", "function": {"name": "g", "arguments": '{"x"'}}
            return _sse(
                _chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f"}}]}),
                _chunk({"tool_calls": [head]}),
                _chunk({"tool_calls": [{"index": 1, "function": {"arguments": ": 2}"}}]}),
                _chunk({}, "tool_calls"),
            )
        if case == "cut":
            return _sse(_chunk({"content": "half"}), done=False)
        if case == "error-event":
            return _sse(_chunk({"content": "a"}), {"error": {"message": "overloaded"}})
        if case == "not-json":
            return _sse("{oops")
        if case == "stall":
            return _sse(_chunk({"content": "slow"}), stall_s=1.0)
        if case == "line-separator":  # U+2028 unescaped (JSON allows it): not a line end in SSE
            return _sse(json.dumps(_chunk({"content": "a\u2028b"}, "stop"), ensure_ascii=False))
        if case == "long":
            return _sse(_chunk({"content": LONG}, "stop"))
        if case in ("crlf", "cr"):  # the other line ends SSE allows
            end = "\r\n" if case == "crlf" else "\r"
            lines = [
                f"data: {json.dumps(_chunk({'content': case}, 'stop'))}",
                "",
                "data: [DONE]",
                "",
            ]
            return StreamingResponse(iter([end.join(lines) + end]), media_type="text/event-stream")
        return _sse(_chunk({"content": "ok"}, "stop"), done=False)  # finish_reason, no [DONE]

    return app


@pytest.fixture(scope="module")
def odd_url() -> Iterator[str]:
    with run_asgi(odd_service()) as url:
        yield url


async def test_a_plain_answer_to_a_stream_request_is_the_answer(make: Make, odd_url: str) -> None:
    events = await collect(make(base_url=odd_url), [user("json-to-a-stream")])
    assert [(e.text, e.done) for e in events] == [("whole", True)]


async def test_loose_tool_call_chunks_are_assembled(make: Make, odd_url: str) -> None:
    answer = await make(base_url=odd_url, stream=True).respond(
        conversation(), [], [user("loose-tools")]
    )
    assert answer.visible == ["Hi"]
    assert answer.tool_calls == [ToolCall("t1", "f", '{"k": 1}')]


async def test_tool_call_fragments_are_assembled_by_index(make: Make, odd_url: str) -> None:
    answer = await make(base_url=odd_url, stream=True).respond(
        conversation(), [], [user("fragments")]
    )
    assert answer.tool_calls == [ToolCall("a", "f", "{}"), ToolCall("b", "g", '{"x": 2}')]


async def test_a_stream_may_end_at_its_finish_reason(make: Make, odd_url: str) -> None:
    answer = await make(base_url=odd_url, stream=True).respond(conversation(), [], [user("x")])
    assert answer.visible == ["ok"]


@pytest.mark.parametrize(
    ("case", "text"),
    [
        ("line-separator", "a\u2028b"),
        ("crlf", "crlf"),
        ("cr", "cr"),
        pytest.param("long", LONG, id="long"),
    ],
)
async def test_stream_lines_end_only_where_sse_says(
    make: Make, odd_url: str, case: str, text: str
) -> None:
    answer = await make(base_url=odd_url, stream=True).respond(conversation(), [], [user(case)])
    assert answer.visible == [text]


async def test_a_refusal_is_the_answer(make: Make, odd_url: str) -> None:
    answer = await make(base_url=odd_url).respond(conversation(), [], [user("refusal")])
    assert answer.visible == ["I can't help with that."]


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("no-choices", AgentRejected, "no choices"),
        ("cut", AgentUnavailable, "ended before"),
        ("error-event", AgentUnavailable, "overloaded"),
        ("not-json", AgentRejected, "not JSON"),
        ("stall", AgentUnavailable, "stalled"),
    ],
)
async def test_a_broken_reply_is_an_error(
    make: Make, odd_url: str, case: str, error: type[Exception], match: str
) -> None:
    client = make(base_url=odd_url, stream=case != "no-choices", timeout_s=0.3)
    with pytest.raises(error, match=match):
        await client.respond(conversation(), [], [user(case)])


def test_build_and_the_registries() -> None:
    assert emulators.load("openai") is create_app
    config = OpenAIConfig.model_validate({"service": "openai", "model": "m", "stream": True})
    client = build("gpt", config, [LOOKUP])
    assert isinstance(client, OpenAIAgent)
    assert (client.stateful, client.streaming, client.tools) == (False, True, [LOOKUP])


# The real bridge, with a tool runner


class OrderDesk:
    """A tool runner that knows one tool and remembers the calls it ran."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def run(self, agent: str, call: ToolCall) -> str:
        self.calls.append((agent, call.name, json.loads(call.arguments)))
        return json.dumps({"status": "shipped"})


@pytest.mark.parametrize("stream", [False, True])
async def test_the_bridge_runs_a_conversation_and_a_tool_round_trip(
    store_url: str, base_url: str, stream: bool
) -> None:
    agent = {"service": "openai", "base_url": base_url, "model": MODEL, "stream": stream}
    agent |= {"tools": ["lookup_order"], "system_prompt": "Be brief.", **FAST}
    tool = {
        "description": LOOKUP.description,
        "arguments": LOOKUP.parameters,
        "url": "http://127.0.0.1:9/lookup",  # never called: the test's runner answers
    }
    config = make_config(
        store_url, agents={"gpt": agent}, tools={"lookup_order": tool}, default_agent="gpt"
    )
    store = Store(config.store.url)
    await store.migrate()
    services = {
        name: build_service(name, cfg, [LOOKUP] if name == "gpt" else ())
        for name, cfg in config.agent_configs.items()
    }
    desk = OrderDesk()
    bridge = Bridge(config, store, Router(config, store), services, tools=desk)
    channel = RecordingChannel()
    bridge.add_adapter(channel)
    await bridge.start()
    RUNNING.append(bridge)
    try:
        await bridge.submit(inbound("t", "hello"))
        await channel.wait_for(1)
        await bridge.submit(inbound("t", ASK_TOOL))
        await channel.wait_for(2)
        assert channel.texts() == [said("hello"), 'tool lookup_order said: {"status": "shipped"}']
        assert desk.calls == [("gpt", "lookup_order", {"order_id": "A1"})]

        calls = [r["json"] for r in seen(base_url)]
        assert len(calls) == 3
        assert all(c["tools"] == [LOOKUP_WIRE] and c.get("stream", False) is stream for c in calls)
        call_id = calls[2]["messages"][4]["tool_calls"][0]["id"]
        assert calls[2]["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello", "name": "Ann"},
            {"role": "assistant", "content": said("hello")},
            {"role": "user", "content": ASK_TOOL, "name": "Ann"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "lookup_order", "arguments": '{"order_id":"A1"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": '{"status": "shipped"}'},
        ]

        conv = await store.conversation_for_thread("web:-/-/t")
        assert conv is not None and conv.remote_id is None  # stateless: nothing kept remotely
        rows = await store.history(conv.id)
        assert [(r.role, bool(r.tool_calls), r.tool_call_id) for r in rows] == [
            ("user", False, None),
            ("agent", False, None),
            ("user", False, None),
            ("agent", True, None),
            ("tool", False, call_id),
            ("agent", False, None),
        ]
    finally:
        await stop_bridge(bridge)
