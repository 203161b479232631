"""The vendor SDK (scale-gp 0.1.0a62), unchanged, against our execute emulator.

The SDK runs in a venv of its own (`sdkenv`); each test runs a short script with it and checks
what it printed and what the emulator recorded.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.agents.emulators.execute import create_app
from tests.contract.sdkenv import run_sdk, sdk_python
from tests.servers import run_asgi

KEY = "sdk-key"

# Shared by the scripts: a client on the emulator, and the tool the agent may ask for.
PRELUDE = """
import json, os, time
import httpx
from scale_gp import SGPClient, AsyncSGPClient
from scale_gp import AuthenticationError, NotFoundError, UnprocessableEntityError
from scale_gp import InternalServerError

BASE = os.environ["BASE_URL"]
client = SGPClient(api_key=os.environ["SGP_API_KEY"], base_url=BASE, max_retries=0)
LOOKUP = {
    "name": "lookup_order",
    "description": "Look up an order by id",
    "arguments": {
        "type": "object",
        "properties": {"order_id": {"type": "string", "description": "the order's id"}},
        "required": ["order_id"],
    },
}
"""


@pytest.fixture(scope="module")
def python() -> Path:
    return sdk_python("scale-gp", "scale-gp==0.1.0a62")


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    with run_asgi(create_app(api_keys={KEY})) as url:
        yield url


@pytest.fixture
def base_url(emulator: str) -> str:
    httpx.post(f"{emulator}/_emulator/reset").raise_for_status()
    return emulator


def sdk(python: Path, base_url: str, script: str) -> Any:
    return run_sdk(python, PRELUDE + textwrap.dedent(script), BASE_URL=base_url, SGP_API_KEY=KEY)


def seen(base_url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{base_url}/_emulator/requests").json())


def kept(base_url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{base_url}/_emulator/kept").json())


def test_a_conversation_with_a_tool_round_trip(python: Path, base_url: str) -> None:
    out = sdk(
        python,
        base_url,
        """
        def step(messages):
            return client.agents.execute(
                messages=messages, model="gpt-4", tools=[LOOKUP], instructions="Be brief.",
                memory_strategy={"name": "last_k", "params": {"k": 10}},
                model_parameters={"temperature": 0.2, "max_tokens": None, "stop_sequences": None},
            )

        messages = [{"role": "user", "content": "hello"}]
        first = step(messages)
        messages += [
            {"role": "agent", "content": first.context.content},
            {"role": "user", "content": '!tool lookup_order {"order_id": "A1"}'},
        ]
        second = step(messages)
        request = second.context.tool_request
        messages += [
            {"role": "agent", "tool_request": request.model_dump()},
            {"role": "tool", "name": request.name, "content": "shipped"},
        ]
        third = step(messages)
        print(json.dumps([r.model_dump() for r in (first, second, third)]))
        """,
    )
    said = [(r["action"], r["context"]["content"], r["context"]["tool_request"]) for r in out]
    assert said == [
        ("content", "[gpt-4] received: hello", None),
        ("tool_request", None, {"name": "lookup_order", "arguments": '{"order_id": "A1"}'}),
        ("content", "tool lookup_order said: shipped", None),
    ]
    calls = seen(base_url)
    assert [c["path"] for c in calls] == ["/v4/agents/execute"] * 3
    assert calls[0]["json"] == {
        "messages": [{"role": "user", "content": "hello"}],
        "model": "gpt-4",
        "tools": [
            {
                "name": "lookup_order",
                "description": "Look up an order by id",
                "arguments": {
                    "type": "object",
                    "properties": {"order_id": {"type": "string", "description": "the order's id"}},
                    "required": ["order_id"],
                },
            }
        ],
        "instructions": "Be brief.",
        "memory_strategy": {"name": "last_k", "params": {"k": 10}},
        "model_parameters": {"temperature": 0.2, "max_tokens": None, "stop_sequences": None},
    }
    assert [m["role"] for m in calls[2]["json"]["messages"]] == [
        "user",
        "agent",
        "user",
        "agent",
        "tool",
    ]


def test_what_else_the_sdk_may_send(python: Path, base_url: str) -> None:
    out = sdk(
        python,
        base_url,
        """
        import asyncio

        messages = [
            {"content": "first"},
            {"tool_request": {"name": "lookup_order", "arguments": "{}"}},
            {"name": "lookup_order", "content": "none"},
            {"role": "assistant", "content": "ok"},
            {"role": "system", "content": "be kind"},
            {"content": [
                {"type": "text", "text": "look"},
                {"image_url": {"url": "https://example.com/a.png", "detail": "low"}},
                {"type": "image_data", "image_data": {"data": "aGk=", "media_type": "image/png"}},
            ]},
        ]

        async def main():
            async with AsyncSGPClient(
                api_key=os.environ["SGP_API_KEY"], base_url=BASE, account_id="acct-9"
            ) as aclient:
                return await aclient.agents.execute(
                    messages=messages, model="claude-2", tools=[],
                    memory_strategy={"params": {"k": 4}},
                    model_parameters={
                        "temperature": 0.7, "max_tokens": 50, "stop_sequences": ["END"],
                        "frequency_penalty": 0.1, "presence_penalty": 0.2,
                        "reasoning_effort": "low", "top_k": 5, "top_p": 0.9,
                    },
                )

        answer = asyncio.run(main())
        print(json.dumps(answer.model_dump()))
        """,
    )
    assert out == {
        "action": "content",
        "context": {"content": "[claude-2] received: look [image] [image]", "tool_request": None},
    }
    (call,) = seen(base_url)
    assert call["json"]["memory_strategy"] == {"params": {"k": 4}}
    assert call["json"]["model_parameters"] == {
        "temperature": 0.7,
        "max_tokens": 50,
        "stop_sequences": ["END"],
        "frequency_penalty": 0.1,
        "presence_penalty": 0.2,
        "reasoning_effort": "low",
        "topK": 5,
        "topP": 0.9,
    }
    (memory,) = kept(base_url)
    assert (memory["account_id"], memory["k"], memory["received"]) == ("acct-9", 4, 6)
    assert [m["role"] for m in memory["kept"]] == ["tool", "assistant", "system", "user"]
    assert memory["kept"][0] == {"role": "tool", "name": "lookup_order", "content": "none"}


def test_errors_are_the_sdk_errors_and_it_retries_on_its_own(python: Path, base_url: str) -> None:
    out = sdk(
        python,
        base_url,
        """
        def ask(target):
            return target.agents.execute(
                messages=[{"role": "user", "content": "hi"}], model="gpt-4", tools=[]
            )

        def fault(**spec):
            httpx.post(BASE + "/_emulator/faults", json=spec).raise_for_status()

        out = {}
        try:
            ask(SGPClient(api_key="wrong", base_url=BASE, max_retries=0))
        except AuthenticationError as exc:
            out["401"] = [exc.status_code, exc.body]
        try:
            ask(SGPClient(api_key=os.environ["SGP_API_KEY"], base_url=BASE + "/v3"))
        except NotFoundError as exc:
            out["404"] = exc.status_code
        try:
            client.agents.execute(messages=[{"content": "hi"}], model="gpt-5", tools=[])
        except UnprocessableEntityError as exc:
            out["422"] = [exc.status_code, exc.body["detail"][0]["loc"]]

        fault(status=429, retry_after=0.2)
        started = time.monotonic()
        answer = ask(client.with_options(max_retries=2))
        out["429"] = [answer.context.content, time.monotonic() - started]

        fault(status=500, times=5)
        try:
            ask(client.with_options(max_retries=1))
        except InternalServerError as exc:
            out["500"] = exc.status_code
        print(json.dumps(out))
        """,
    )
    assert out["401"] == [401, {"detail": "Invalid API key"}]
    assert out["404"] == 404
    assert out["422"] == [422, ["body", "model"]]
    assert out["429"][0] == "[gpt-4] received: hi"
    assert out["429"][1] >= 0.2
    assert out["500"] == 500
    # 401, 404, 422 once each; 429 then success; 500 twice (one retry).
    assert len(seen(base_url)) == 7
