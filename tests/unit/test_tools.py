"""Tools from `[tools.NAME]`: HTTP and Python tools, the errors an agent gets back instead of
an exception, the config errors that stop a bad file at load, and a tool round trip through
the real bridge."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from core.agents.base import AgentResponse
from core.bridge import Bridge
from core.config import Config, parse_config
from core.errors import ConfigError
from core.model import Conversation, ToolCall, ToolSpec, Turn
from core.routing import Router
from core.store import Store
from core.tools import MAX_RESULT_CHARS, ConfiguredTools
from tests.bridgekit import RUNNING, RecordingChannel, inbound, make_config, stop_bridge
from tests.servers import run_asgi

HERE = __name__  # the Python tools below are named by this module's import path

ORDER_SCHEMA = {
    "type": "object",
    "properties": {"order_id": {"type": "string"}, "verbose": {"type": "boolean"}},
    "required": ["order_id"],
    "additionalProperties": False,
}

# -- Python tools (named in configs as f"{HERE}:NAME") -----------------------------------------


def lookup_order(order_id: str, verbose: bool = False) -> dict[str, Any]:
    return {"order_id": order_id, "status": "shipped", "thread": threading.current_thread().name}


async def add(a: int, b: int, delay: float = 0.0) -> int:
    await asyncio.sleep(delay)
    return a + b


def greet(name: str) -> str:
    return f"hello {name}"


def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


def leaky() -> str:
    raise RuntimeError("postgres://admin:hunter2@db/orders")


@dataclass
class Parcel:
    id: str
    weight: float


def parcel() -> Parcel:
    return Parcel("p1", 1.5)


def unserialisable() -> object:
    return object()


def huge() -> str:
    return "x" * (MAX_RESULT_CHARS + 500)


NOT_CALLABLE = 42

# -- an HTTP tool server on loopback ---------------------------------------------------------


async def echo(request: Request) -> Response:
    return JSONResponse(
        {
            "got": await request.json(),
            "content_type": request.headers.get("content-type"),
            "authorization": request.headers.get("authorization"),
            "x_api_key": request.headers.get("x-api-key"),
        }
    )


async def slow(request: Request) -> Response:
    await asyncio.sleep(1.0)
    return PlainTextResponse("too late")


async def broken(request: Request) -> Response:
    return PlainTextResponse("orders database is down", status_code=503)


async def big(request: Request) -> Response:
    return PlainTextResponse("y" * (MAX_RESULT_CHARS * 2))


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    app = Starlette(
        routes=[
            Route("/echo", echo, methods=["POST"]),
            Route("/slow", slow, methods=["POST"]),
            Route("/broken", broken, methods=["POST"]),
            Route("/big", big, methods=["POST"]),
        ]
    )
    with run_asgi(app) as url:
        yield url


# -- helpers ---------------------------------------------------------------------------------


def tools_config(tools: dict[str, dict[str, Any]], allowed: list[str] | None = None) -> Config:
    """Agent `demo` may use `allowed` (default: every tool); agent `other` may use none."""
    agents = {
        "demo": {"service": "local", "tools": list(tools) if allowed is None else allowed},
        "other": {"service": "local"},
    }
    return parse_config({"agents": agents, "tools": tools}, "t.toml")


@pytest.fixture
async def runners() -> AsyncIterator[list[ConfiguredTools]]:
    """Runners made by a test; their HTTP clients are closed after it."""
    made: list[ConfiguredTools] = []
    yield made
    for runner in made:
        await runner.aclose()


@pytest.fixture
def make(runners: list[ConfiguredTools]) -> Any:
    def build(tools: dict[str, dict[str, Any]], allowed: list[str] | None = None) -> Any:
        runner = ConfiguredTools(tools_config(tools, allowed))
        runners.append(runner)
        return runner

    return build


def call(name: str, arguments: Any) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall("c1", name, text)


def python_tool(function: str, **extra: Any) -> dict[str, Any]:
    return {"description": f"calls {function}", "python": f"{HERE}:{function}", **extra}


# -- HTTP tools ------------------------------------------------------------------------------


async def test_an_http_tool_gets_the_arguments_as_json_and_returns_the_body(
    make: Any, server: str
) -> None:
    runner = make({"lookup": {"description": "d", "url": f"{server}/echo"}})
    result = await runner.run("demo", call("lookup", {"order_id": "A1"}))
    body = json.loads(result)
    assert body["got"] == {"order_id": "A1"}
    assert body["content_type"] == "application/json"
    assert body["authorization"] is None


async def test_the_auth_header_comes_from_the_named_environment_variable(
    make: Any, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TB_TOOL_TOKEN", "Bearer s3cret")
    monkeypatch.setenv("TB_TOOL_KEY", "k-1")
    runner = make(
        {
            "default": {"description": "d", "url": f"{server}/echo", "auth_env": "TB_TOOL_TOKEN"},
            "custom": {
                "description": "d",
                "url": f"{server}/echo",
                "auth_header": "X-Api-Key",
                "auth_env": "TB_TOOL_KEY",
            },
        }
    )
    default = json.loads(await runner.run("demo", call("default", {})))
    custom = json.loads(await runner.run("demo", call("custom", {})))
    assert default["authorization"] == "Bearer s3cret"
    assert (custom["authorization"], custom["x_api_key"]) == (None, "k-1")


async def test_an_auth_variable_unset_at_run_time_is_an_error_result(
    make: Any, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TB_TOOL_TOKEN", "t")
    runner = make({"t": {"description": "d", "url": f"{server}/echo", "auth_env": "TB_TOOL_TOKEN"}})
    monkeypatch.delenv("TB_TOOL_TOKEN")
    result = json.loads(await runner.run("demo", call("t", {})))
    assert "TB_TOOL_TOKEN is not set" in result["error"]


async def test_proxy_variables_are_ignored(
    make: Any, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    runner = make({"lookup": {"description": "d", "url": f"{server}/echo"}})
    body = json.loads(await runner.run("demo", call("lookup", {"order_id": "A1"})))
    assert body["got"] == {"order_id": "A1"}


async def test_a_non_2xx_answer_is_an_error_naming_the_status(make: Any, server: str) -> None:
    runner = make({"t": {"description": "d", "url": f"{server}/broken"}})
    result = json.loads(await runner.run("demo", call("t", {})))
    assert result == {
        "error": "tool 't' answered HTTP 503",
        "details": "orders database is down",
    }


async def test_an_unreachable_tool_is_an_error_result_without_its_url(make: Any) -> None:
    runner = make({"t": {"description": "d", "url": "http://127.0.0.1:9/x?token=abc"}})
    result = await runner.run("demo", call("t", {}))
    assert json.loads(result) == {"error": "tool 't' could not be reached: ConnectError"}
    assert "abc" not in result


async def test_a_slow_http_tool_times_out(make: Any, server: str) -> None:
    runner = make({"t": {"description": "d", "url": f"{server}/slow", "timeout_s": 0.2}})
    started = time.monotonic()
    result = json.loads(await runner.run("demo", call("t", {})))
    assert result == {"error": "tool 't' did not answer within 0.2s"}
    assert time.monotonic() - started < 0.9


async def test_a_long_http_result_is_truncated_with_a_note(make: Any, server: str) -> None:
    runner = make({"t": {"description": "d", "url": f"{server}/big"}})
    result = await runner.run("demo", call("t", {}))
    kept, note = result.split("\n", 1)
    assert kept == "y" * MAX_RESULT_CHARS
    assert note == (
        "[truncated: the tool returned 32,000 characters; only the first 16,000 are shown]"
    )


# -- Python tools ----------------------------------------------------------------------------


async def test_a_sync_python_tool_runs_in_a_thread_and_its_value_is_json(make: Any) -> None:
    runner = make({"lookup": python_tool("lookup_order", arguments=ORDER_SCHEMA)})
    result = json.loads(await runner.run("demo", call("lookup", {"order_id": "A1"})))
    assert result["order_id"] == "A1" and result["status"] == "shipped"
    assert result["thread"] != threading.current_thread().name


async def test_an_async_python_tool_is_awaited(make: Any) -> None:
    runner = make({"add": python_tool("add")})
    assert await runner.run("demo", call("add", {"a": 2, "b": 3})) == "5"


async def test_a_string_result_is_returned_as_is_and_other_values_as_json(make: Any) -> None:
    runner = make({"greet": python_tool("greet"), "parcel": python_tool("parcel")})
    assert await runner.run("demo", call("greet", {"name": "Ann"})) == "hello Ann"
    assert json.loads(await runner.run("demo", call("parcel", ""))) == {"id": "p1", "weight": 1.5}


async def test_a_value_that_is_not_json_is_an_error_result(make: Any) -> None:
    runner = make({"odd": python_tool("unserialisable")})
    result = json.loads(await runner.run("demo", call("odd", {})))
    assert result == {"error": "tool 'odd' returned a object, which is not JSON"}


async def test_a_slow_python_tool_times_out(make: Any) -> None:
    runner = make(
        {
            "add": python_tool("add", timeout_s=0.1),
            "sleepy": python_tool("sleepy", timeout_s=0.1),
        }
    )
    result = json.loads(await runner.run("demo", call("add", {"a": 1, "b": 1, "delay": 5})))
    assert result == {"error": "tool 'add' did not answer within 0.1s"}
    result = json.loads(await runner.run("demo", call("sleepy", {"seconds": 0.3})))
    assert result == {"error": "tool 'sleepy' did not answer within 0.1s"}


async def test_a_tool_that_raises_gives_its_exception_type_and_logs_no_secret(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    runner = make({"leaky": python_tool("leaky")})
    with caplog.at_level(logging.ERROR, logger="core.tools"):
        result = await runner.run("demo", call("leaky", {}))
    assert json.loads(result) == {"error": "tool 'leaky' failed: RuntimeError"}
    assert "RuntimeError" in caplog.text and "leaky" in caplog.text
    assert "hunter2" not in caplog.text and "hunter2" not in result


async def test_arguments_the_function_does_not_take_are_an_error_result(make: Any) -> None:
    runner = make({"greet": python_tool("greet")})
    result = json.loads(await runner.run("demo", call("greet", {"nom": "Ann"})))
    assert result == {"error": "tool 'greet' failed: TypeError"}


async def test_a_long_python_result_is_truncated(make: Any) -> None:
    runner = make({"huge": python_tool("huge")})
    result = await runner.run("demo", call("huge", {}))
    assert result.startswith("x" * MAX_RESULT_CHARS + "\n[truncated: the tool returned 16,500")


# -- what the agent may call, and with what ----------------------------------------------------


async def test_an_unknown_tool_or_one_the_agent_may_not_use_is_an_error_result(
    make: Any,
) -> None:
    runner = make({"greet": python_tool("greet"), "add": python_tool("add")}, allowed=["greet"])
    unknown = json.loads(await runner.run("demo", call("nope", {})))
    assert unknown == {
        "error": "tool 'nope' is not available to agent 'demo'",
        "details": {"available": ["greet"]},
    }
    not_allowed = json.loads(await runner.run("demo", call("add", {"a": 1, "b": 2})))
    assert not_allowed["error"] == "tool 'add' is not available to agent 'demo'"
    other = json.loads(await runner.run("other", call("greet", {"name": "x"})))
    assert other == {
        "error": "tool 'greet' is not available to agent 'other'",
        "details": {"available": []},
    }


@pytest.mark.parametrize(
    ("arguments", "error", "details"),
    [
        ("{not json", "the arguments are not valid JSON", "Expecting property name"),
        ('["A1"]', "the arguments must be a JSON object", "got list"),
        ({}, "the arguments do not match the tool's schema", "'order_id' is a required property"),
        ({"order_id": 7}, "the arguments do not match the tool's schema", "7 is not of type"),
        (
            {"order_id": "A1", "colour": "red"},
            "the arguments do not match the tool's schema",
            "Additional properties are not allowed",
        ),
    ],
)
async def test_bad_arguments_are_an_error_result_the_agent_can_read(
    make: Any, arguments: Any, error: str, details: str
) -> None:
    runner = make({"lookup": python_tool("lookup_order", arguments=ORDER_SCHEMA)})
    result = json.loads(await runner.run("demo", call("lookup", arguments)))
    assert result["error"] == error
    assert details in json.dumps(result["details"])


async def test_schema_errors_say_where(make: Any) -> None:
    runner = make({"lookup": python_tool("lookup_order", arguments=ORDER_SCHEMA)})
    result = json.loads(await runner.run("demo", call("lookup", {"order_id": 1, "verbose": "yes"})))
    assert [d["path"] for d in result["details"]] == ["/order_id", "/verbose"]


async def test_specs_tell_each_agent_only_its_own_tools(make: Any) -> None:
    runner = make(
        {
            "lookup": python_tool("lookup_order", arguments=ORDER_SCHEMA),
            "greet": python_tool("greet"),
        },
        allowed=["lookup"],
    )
    assert runner.specs_for("demo") == [ToolSpec("lookup", "calls lookup_order", ORDER_SCHEMA)]
    assert runner.specs_for("other") == []
    assert runner.specs_for("nobody") == []
    default = make({"greet": python_tool("greet")}).specs_for("demo")
    assert default == [ToolSpec("greet", "calls greet", {"type": "object", "properties": {}})]


# -- config errors ---------------------------------------------------------------------------


def url_tool(**extra: Any) -> dict[str, Any]:
    return {"description": "d", "url": "http://127.0.0.1:1/x", **extra}


@pytest.mark.parametrize(
    ("tools", "allowed", "key", "words"),
    [
        ({}, ["lookup"], "agents.demo.tools", "unknown tool 'lookup'"),
        ({"t": url_tool()}, ["t", "ghost"], "agents.demo.tools", "unknown tool 'ghost'"),
        (
            {"t": url_tool(python=f"{HERE}:greet")},
            None,
            "tools.t",
            "exactly one of url and python",
        ),
        ({"t": {"description": "d"}}, None, "tools.t", "exactly one of url and python"),
        ({"t": {"url": "http://x/y"}}, None, "tools.t.description", "Field required"),
        ({"t": url_tool(colour="red")}, None, "tools.t.colour", "Extra inputs"),
        ({"t": url_tool(timeout_s=0)}, None, "tools.t.timeout_s", "greater than 0"),
        ({"t": url_tool(url="ftp://x/y")}, None, "tools.t.url", "not an http(s) URL"),
        (
            {"t": {"description": "d", "python": "no_colon"}},
            None,
            "tools.t.python",
            "package.module:function",
        ),
        (
            {"t": {"description": "d", "python": "tb_no_such_module:f"}},
            None,
            "tools.t.python",
            "No module named 'tb_no_such_module'",
        ),
        ({"t": python_tool("no_such_function")}, None, "tools.t.python", "cannot import"),
        ({"t": python_tool("NOT_CALLABLE")}, None, "tools.t.python", "not a callable"),
        (
            {"t": url_tool(arguments={"type": "objekt"})},
            None,
            "tools.t.arguments",
            "not a valid JSON Schema",
        ),
        (
            {"t": url_tool(arguments={"type": "object", "required": "order_id"})},
            None,
            "tools.t.arguments",
            "not a valid JSON Schema",
        ),
        ({"t": url_tool(arguments={"type": "string"})}, None, "tools.t.arguments", "an object"),
        ({"t": url_tool(arguments="{}")}, None, "tools.t.arguments", "valid dictionary"),
        ({"bad name": url_tool()}, [], "tools.bad name", "1-64 letters"),
        (
            {"t": url_tool(auth_env="TB_TEST_UNSET_TOOL_TOKEN")},
            None,
            "tools.t.auth_env",
            "TB_TEST_UNSET_TOOL_TOKEN is not set",
        ),
    ],
)
def test_config_errors_name_the_key(
    tools: dict[str, Any], allowed: list[str] | None, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        tools_config(tools, allowed)
    assert caught.value.file == "t.toml"
    assert caught.value.key == key
    assert key in str(caught.value) and words in str(caught.value)


def test_a_tool_no_agent_uses_still_loads_and_agents_default_to_none() -> None:
    config = tools_config({"t": url_tool()}, allowed=[])
    assert config.tool_configs["t"].timeout_s == 10
    assert config.tool_configs["t"].auth_header == "Authorization"
    assert config.agent_configs["other"].tools == []


# -- through the real bridge -------------------------------------------------------------------


class ToolAsker:
    """A test-only agent: asks for `lookup_order` once, then answers with what it returned."""

    name = "asker"
    stateful = False

    def __init__(self, specs: list[ToolSpec]) -> None:
        self.specs = specs
        self.calls: list[list[Turn]] = []

    async def open(self, conversation: Conversation) -> str | None:
        return None

    async def respond(
        self, conversation: Conversation, history: list[Turn], new: list[Turn]
    ) -> AgentResponse:
        self.calls.append(new)
        results = [turn for turn in new if turn.role == "tool"]
        if results:
            return AgentResponse(turns=[Turn("agent", f"the tool said: {results[0].content}")])
        ask = ToolCall("call-1", self.specs[0].name, json.dumps({"order_id": "A1"}))
        return AgentResponse(turns=[Turn("agent", "", tool_calls=[ask])], tool_calls=[ask])

    async def aclose(self) -> None:
        return None


async def test_the_bridge_runs_a_configured_tool_and_stores_its_result(store_url: str) -> None:
    config = make_config(
        store_url,
        agents={"helper": {"service": "local", "tools": ["lookup_order"]}},
        tools={"lookup_order": python_tool("lookup_order", arguments=ORDER_SCHEMA)},
        default_agent="helper",
    )
    tools = ConfiguredTools(config)
    asker = ToolAsker(tools.specs_for("helper"))
    store = Store(config.store.url)
    await store.migrate()
    bridge = Bridge(config, store, Router(config, store), {"helper": asker}, tools=tools)
    channel = RecordingChannel()
    bridge.add_adapter(channel)
    await bridge.start()
    RUNNING.append(bridge)
    try:
        await bridge.submit(inbound("t", "where is my order?"))
        await channel.wait_for(1)
        [answer] = channel.texts()
        assert answer.startswith('the tool said: {"order_id": "A1", "status": "shipped"')

        conversation = await store.conversation_for_thread("web:-/-/t")
        assert conversation is not None
        rows = await store.history(conversation.id)
        assert [row.role for row in rows] == ["user", "agent", "tool", "agent"]
        asked, tool = rows[1], rows[2]
        assert asked.tool_calls == [
            {"id": "call-1", "name": "lookup_order", "arguments": '{"order_id": "A1"}'}
        ]
        assert (tool.name, tool.tool_call_id) == ("lookup_order", "call-1")
        assert json.loads(tool.content)["status"] == "shipped"
        assert [t.role for t in asker.calls[1]] == ["tool"]
    finally:
        await stop_bridge(bridge)
        await tools.aclose()
