"""The vendor SDK (`openai`), unchanged, against our OpenAI-compatible emulator.

The SDK runs in its own venv (see `sdkenv`); each test runs one short script with it and checks
the JSON the script prints, and what the emulator recorded.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.agents.emulators.openai import create_app
from tests.contract.sdkenv import run_sdk, sdk_python
from tests.servers import run_asgi

KEY = "sdk-key"
SDK = "openai==3.57.0"  # the newest on PyPI when this was written; bump it to re-check

HEADER = """
import json, os
from openai import OpenAI
client = OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["KEY"], max_retries=0)
LOOKUP = {"type": "function", "function": {"name": "lookup", "description": "Look up an order",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}}
"""


@pytest.fixture(scope="module")
def python() -> Path:
    return sdk_python("openai", SDK)


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    with run_asgi(create_app(api_keys={KEY})) as url:
        yield url


@pytest.fixture
def base_url(emulator: str) -> str:
    httpx.post(f"{emulator}/_emulator/reset").raise_for_status()
    return emulator


def sdk(python: Path, base_url: str, script: str, key: str = KEY) -> Any:
    return run_sdk(python, HEADER + textwrap.dedent(script), BASE_URL=base_url, KEY=key)


def seen(base_url: str) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = httpx.get(f"{base_url}/_emulator/requests").json()
    return log


def test_create_plain_and_a_tool_round_trip(python: Path, base_url: str) -> None:
    out = sdk(
        python,
        base_url,
        """
        first = client.chat.completions.create(model="gpt-4o-mini", temperature=0.2, messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello", "name": "Ann"}])
        messages = [{"role": "user", "content": 'find it !tool lookup {"order_id": "A1"}'}]
        asked = client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, tools=[LOOKUP])
        call = asked.choices[0].message.tool_calls[0]
        messages += [asked.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "shipped"}]
        answered = client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, tools=[LOOKUP])
        print(json.dumps({
            "first": first.model_dump(), "asked": asked.model_dump(),
            "answered": answered.choices[0].message.content}))
        """,
    )
    first = out["first"]
    assert first["object"] == "chat.completion"
    assert first["id"].startswith("chatcmpl-")
    assert first["model"] == "gpt-4o-mini"
    (choice,) = first["choices"]
    assert choice["message"]["content"] == "[gpt-4o-mini] received: hello"
    assert (choice["message"]["role"], choice["finish_reason"]) == ("assistant", "stop")
    assert first["usage"]["total_tokens"] > 0

    asked = out["asked"]["choices"][0]
    assert asked["finish_reason"] == "tool_calls"
    assert asked["message"]["content"] is None
    (call,) = asked["message"]["tool_calls"]
    assert call["type"] == "function"
    assert call["function"] == {"name": "lookup", "arguments": '{"order_id":"A1"}'}
    assert out["answered"] == "tool lookup said: shipped"

    bodies = [r["json"] for r in seen(base_url)]
    assert bodies[0] == {
        "model": "gpt-4o-mini",
        "temperature": 0.2,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello", "name": "Ann"},
        ],
    }
    assert bodies[2]["messages"][1]["tool_calls"][0]["id"] == call["id"]
    assert bodies[2]["messages"][2] == {
        "role": "tool",
        "tool_call_id": call["id"],
        "content": "shipped",
    }


def test_stream_text_and_tool_calls(python: Path, base_url: str) -> None:
    out = sdk(
        python,
        base_url,
        """
        text = [c.choices[0].delta.content for c in client.chat.completions.create(
            model="gpt-4o-mini", stream=True,
            messages=[{"role": "user", "content": "one two three"}]) if c.choices]
        usage = [c.usage.model_dump() for c in client.chat.completions.create(
            model="gpt-4o-mini", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "x"}]) if c.usage]
        with client.chat.completions.stream(model="gpt-4o-mini", tools=[LOOKUP], messages=[
                {"role": "user", "content": '!tool lookup {"order_id": "A-1234567"}'}]) as s:
            tool = s.get_final_completion().choices[0]
        with client.chat.completions.stream(model="gpt-4o-mini", messages=[
                {"role": "user", "content": "streamed helper"}]) as s:
            helper = s.get_final_completion().choices[0].message.content
        print(json.dumps({"text": text, "usage": usage, "helper": helper,
                          "tool": tool.model_dump(exclude_none=True)}))
        """,
    )
    assert out["text"] == ["", "[gpt-4o-mini]", " received:", " one", " two", " three", None]
    assert len(out["usage"]) == 1
    assert out["usage"][0]["completion_tokens"] > 0
    assert out["helper"] == "[gpt-4o-mini] received: streamed helper"
    assert out["tool"]["finish_reason"] == "tool_calls"
    (call,) = out["tool"]["message"]["tool_calls"]
    assert call["function"]["name"] == "lookup"
    assert call["function"]["arguments"] == '{"order_id":"A-1234567"}'  # sent in 8-char pieces
    assert call["id"].startswith("call_")
    assert all(r["json"]["stream"] is True for r in seen(base_url))


def test_async_client_streams(python: Path, base_url: str) -> None:
    out = sdk(
        python,
        base_url,
        """
        import asyncio
        from openai import AsyncOpenAI
        async def main():
            aclient = AsyncOpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["KEY"])
            stream = await aclient.chat.completions.create(model="gpt-4o", stream=True,
                messages=[{"role": "user", "content": "async hi"}])
            parts = [c.choices[0].delta.content or "" async for c in stream]
            await aclient.close()
            return "".join(parts)
        print(json.dumps(asyncio.run(main())))
        """,
    )
    assert out == "[gpt-4o] received: async hi"


def test_models_list_and_retrieve_also_under_v1(python: Path, base_url: str) -> None:
    out = sdk(
        python,
        base_url,
        """
        v1 = OpenAI(base_url=os.environ["BASE_URL"] + "/v1", api_key=os.environ["KEY"])
        print(json.dumps({
            "ids": [m.id for m in client.models.list()],
            "one": client.models.retrieve("gpt-4o").model_dump(exclude_none=True),
            "v1": [m.id for m in v1.models.list()][:1],
            "v1_chat": v1.chat.completions.create(model="o4-mini",
                messages=[{"role": "user", "content": "via v1"}]).choices[0].message.content}))
        """,
    )
    assert out["ids"] == ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1", "o4-mini"]
    assert out["one"] == {
        "id": "gpt-4o",
        "object": "model",
        "created": 1_700_000_000,
        "owned_by": "emulator",
    }
    assert out["v1"] == ["gpt-4o-mini"]
    assert out["v1_chat"] == "[o4-mini] received: via v1"
    assert [r["path"] for r in seen(base_url)][-2:] == ["/v1/models", "/v1/chat/completions"]


def test_errors_are_the_sdk_errors(python: Path, base_url: str) -> None:
    httpx.post(
        f"{base_url}/_emulator/faults", json={"status": 429, "retry_after": 0, "times": 2}
    ).raise_for_status()
    out = sdk(
        python,
        base_url,
        """
        import openai
        def fails(call):
            try:
                call()
            except openai.APIStatusError as exc:
                return [type(exc).__name__, exc.status_code, exc.code, exc.message]
        user = [{"role": "user", "content": "hi"}]
        limited = fails(lambda: client.chat.completions.create(model="gpt-4o", messages=user))
        retried = OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["KEY"],
            max_retries=1).chat.completions.create(model="gpt-4o", messages=user)
        bad_key = OpenAI(base_url=os.environ["BASE_URL"], api_key="sk-wrong-key-1234",
            max_retries=0)
        print(json.dumps({
            "limited": limited,
            "retried": retried.choices[0].message.content,
            "auth": fails(lambda: bad_key.models.list()),
            "model": fails(lambda: client.chat.completions.create(model="nope", messages=user)),
            "unpaired": fails(lambda: client.chat.completions.create(model="gpt-4o", messages=[
                *user, {"role": "tool", "tool_call_id": "call_x", "content": "r"}])),
            "invalid": fails(lambda: client.chat.completions.create(model="gpt-4o",
                messages=[])),
            "streamed_auth": fails(lambda: bad_key.chat.completions.create(
                model="gpt-4o", messages=user, stream=True)),
        }))
        """,
    )
    assert out["limited"][:2] == ["RateLimitError", 429]
    assert out["retried"] == "[gpt-4o] received: hi"  # the SDK's own retry, after Retry-After
    assert out["auth"][:3] == ["AuthenticationError", 401, "invalid_api_key"]
    assert out["auth"][3].endswith("Incorrect API key provided: sk-****1234.")
    assert out["model"][:3] == ["NotFoundError", 404, "model_not_found"]
    assert "does not exist" in out["model"][3]
    assert out["unpaired"][:2] == ["BadRequestError", 400]
    assert "'tool_calls'" in out["unpaired"][3]
    assert out["invalid"][:2] == ["BadRequestError", 400]
    assert out["streamed_auth"][:2] == ["AuthenticationError", 401]
