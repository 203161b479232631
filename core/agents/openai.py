"""A client of any OpenAI-compatible chat completions endpoint (OpenAI, vLLM, Ollama, LiteLLM).

Stateless: every call sends the system prompt and the history. The agent's tool calls are stored
on its turn, and the tool results follow it as `tool` messages paired by `tool_call_id`, as the
API requires. With `stream = true` the reply arrives as Server-Sent Events; `stream()` yields the
text as it grows and `respond()` reads the whole stream.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from pydantic import Field

from core.agents.base import (
    AgentResponse,
    HttpAgentConfig,
    HttpAgentService,
    HttpReply,
    StreamEvent,
    env_secret,
    read_whole,
    why,
)
from core.errors import AgentRejected, AgentUnavailable
from core.model import Conversation, ToolCall, ToolSpec, Turn

PATH = "/chat/completions"


class OpenAIConfig(HttpAgentConfig):
    """`service = "openai"`: a model behind an OpenAI-compatible `/chat/completions`."""

    service: Literal["openai"]
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY", description="sent as a Bearer token; empty: no key (local)"
    )
    model: str = Field(min_length=1, description="the model name the server knows")
    system_prompt: str | None = Field(
        default=None, description="sent first as the system message; a route's situation wins"
    )
    temperature: float | None = Field(default=None, ge=0, le=2, description="None: server default")
    stream: bool = Field(default=False, description="ask for Server-Sent Events")
    tools: list[str] = Field(default_factory=list, description="names of [tools.NAME] it may call")
    send_names: bool = Field(
        default=True, description="send each user's name (as OpenAI's `name`, sanitised)"
    )


class _StreamOpened(Exception):
    """Carries a streamed 200 response out of the shared retry loop (see `OpenAIAgent._send`)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        super().__init__("stream opened")
        self.response = response  # holds a connection (and a place in _in_flight) till released


@dataclass(slots=True)
class _Reply:
    """A reply being read: its text, refusal and tool calls (by index, as fragments arrive)."""

    text: str = ""
    refusal: str = ""
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    finished: bool = False

    def add_calls(self, raw_calls: Any) -> None:
        for position, raw in enumerate(raw_calls if isinstance(raw_calls, list) else []):
            if not isinstance(raw, dict):
                continue
            index = raw.get("index")
            call = self.calls.setdefault(index if isinstance(index, int) else position, {})
            function = raw.get("function")
            function = function if isinstance(function, dict) else {}
            arguments = function.get("arguments")
            if isinstance(arguments, dict):  # a few servers send an object, not JSON text
                arguments = json.dumps(arguments)
            _grow(call, "id", raw.get("id"))
            _grow(call, "name", function.get("name"))
            if isinstance(arguments, str):
                call["arguments"] = call.get("arguments", "") + arguments

    def response(self, agent: str) -> AgentResponse:
        calls = [
            ToolCall(
                id=c.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                name=c.get("name", ""),
                arguments=c.get("arguments") or "{}",
            )
            for _, c in sorted(self.calls.items())
        ]
        content = self.text or self.refusal
        if not content and not calls:
            return AgentResponse()
        turn = Turn(role="agent", content=content, name=agent, tool_calls=calls)
        return AgentResponse(turns=[turn], tool_calls=calls)


def _grow(call: dict[str, str], key: str, piece: Any) -> None:
    # The SDK concatenates id and name fragments; some servers repeat them whole in every chunk.
    if isinstance(piece, str) and piece and call.get(key) != piece:
        call[key] = call.get(key, "") + piece


def tool_schema(spec: ToolSpec) -> dict[str, Any]:
    """A ToolSpec as one entry of the request's `tools`."""
    function = {"name": spec.name, "description": spec.description, "parameters": spec.parameters}
    return {"type": "function", "function": function}


_NOT_NAME = re.compile(r"[^A-Za-z0-9_-]")


def _name(name: str | None) -> str | None:
    # OpenAI rejects a `name` outside ^[A-Za-z0-9_-]{1,64}$; a name with no such letters is dropped.
    clean = _NOT_NAME.sub("_", name or "")[:64]
    return clean if clean.strip("_") else None


def chat_messages(
    system: str | None, turns: Sequence[Turn], *, send_names: bool = True
) -> list[dict[str, Any]]:
    """The turns as OpenAI messages, each tool result right after the call it answers.

    A call with no result (the history was cut, or the tool loop was stopped) is dropped, and so
    is a result with no call: the API refuses either.
    """
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    used: set[int] = set()
    for at, turn in enumerate(turns):
        if turn.role == "user":
            message: dict[str, Any] = {"role": "user", "content": turn.content}
            name = _name(turn.name) if send_names else None
            messages.append({**message, "name": name} if name else message)
        elif turn.role == "system" and turn.content:
            messages.append({"role": "system", "content": turn.content})
        elif turn.role == "agent":
            answered = []
            for call in turn.tool_calls:
                result = _result_for(call.id, turns, at, used)
                if result is not None:
                    used.add(result)
                    answered.append((call, turns[result]))
            if not turn.content and not answered:
                continue
            message = {"role": "assistant", "content": turn.content or None}
            if answered:
                message["tool_calls"] = [_call_json(call) for call, _ in answered]
            messages.append(message)
            messages.extend(
                {"role": "tool", "tool_call_id": call.id, "content": result.content}
                for call, result in answered
            )
    return messages


def _result_for(call_id: str, turns: Sequence[Turn], after: int, used: set[int]) -> int | None:
    for index in range(after + 1, len(turns)):
        turn = turns[index]
        if turn.role == "tool" and turn.tool_call_id == call_id and index not in used:
            return index
    return None


def _call_json(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


class OpenAIAgent(HttpAgentService):
    """An agent behind `POST {base_url}/chat/completions`; sends the history every call."""

    stateful = False

    def __init__(self, name: str, config: OpenAIConfig, tools: Sequence[ToolSpec] = ()) -> None:
        key = env_secret(config.api_key_env)
        super().__init__(name, config, {"Authorization": f"Bearer {key}"} if key else {})
        self.openai = config
        self.tools = list(tools)
        self.streaming = config.stream  # True: a caller that can show growing text uses stream()

    async def open(self, conversation: Conversation) -> str | None:
        return None

    def body(
        self, conversation: Conversation, history: list[Turn], new: list[Turn], *, stream: bool
    ) -> dict[str, Any]:
        """The request body for one call."""
        system = conversation.situation or self.openai.system_prompt
        body: dict[str, Any] = {
            "model": self.openai.model,
            "messages": chat_messages(system, [*history, *new], send_names=self.openai.send_names),
        }
        if self.tools:
            body["tools"] = [tool_schema(spec) for spec in self.tools]
        if self.openai.temperature is not None:
            body["temperature"] = self.openai.temperature
        if stream:
            body["stream"] = True
        return body

    async def respond(
        self, conversation: Conversation, history: list[Turn], new: list[Turn]
    ) -> AgentResponse:
        """Send the history and the new turns; return the answer or the tools it asks for."""
        if self.openai.stream:
            async with aclosing(self.stream(conversation, history, new)) as events:
                async for event in events:
                    if event.response is not None:
                        return event.response
            raise AssertionError("stream() always ends with the answer or an error")
        body = self.body(conversation, history, new, stream=False)
        return _read_completion(await self.request("POST", PATH, json=body), self.name)

    async def stream(
        self, conversation: Conversation, history: list[Turn], new: list[Turn]
    ) -> AsyncGenerator[StreamEvent, None]:
        """Ask for a streamed answer; yield the text each time it grows, then the answer.

        Failures before the first byte are retried like any call; a stream that breaks midway
        raises AgentUnavailable. A server that answers plain JSON yields just the answer.
        """
        body = self.body(conversation, history, new, stream=True)
        try:
            # request() holds the retry policy; an opened stream leaves it as _StreamOpened.
            plain = await self.request("POST", PATH, json=body)
        except _StreamOpened as opened:
            response = opened.response
        else:
            final = _read_completion(plain, self.name)
            yield StreamEvent(text=final.visible[0] if final.visible else "", response=final)
            return
        reply = _Reply()
        try:
            async for data in _sse_data(response, self.openai.timeout_s):
                if data == "[DONE]":
                    reply.finished = True
                    break
                if _read_chunk(reply, data):
                    yield StreamEvent(text=reply.text)
        finally:
            self._in_flight -= 1
            response.release()  # back to the pool once read to the end; closed otherwise
        if not reply.finished:
            raise AgentUnavailable("openai: the stream ended before the answer was complete")
        final = reply.response(self.name)
        yield StreamEvent(text=reply.text, response=final)

    async def _send(
        self, method: str, path: str, *, json: Any, params: dict[str, Any] | None
    ) -> HttpReply:
        """Send a call; a streamed one keeps its connection open past this method.

        An error status is read whole and returned, so the shared policy maps and retries it; a
        200 event stream is raised as _StreamOpened, past that policy, to the caller of request().
        """
        if not (isinstance(json, dict) and json.get("stream")):
            return await super()._send(method, path, json=json, params=params)
        self._in_flight += 1
        opened = False
        try:
            response = await self._open(method, path, json=json, params=params)
            kind = response.headers.get("content-type", "")
            # A server that cannot stream may answer JSON: that goes the usual way.
            if 200 <= response.status < 300 and not kind.startswith("application/json"):
                opened = True
                raise _StreamOpened(response)
            return await read_whole(response)
        finally:
            if not opened:
                self._in_flight -= 1


async def _sse_data(response: aiohttp.ClientResponse, timeout_s: float) -> AsyncIterator[str]:
    """The `data:` fields of an event stream, one event at a time."""
    lines: list[str] = []
    try:
        async for line in _lines(response.content):
            if line.startswith("data:"):
                lines.append(line[5:].removeprefix(" "))
            elif not line and lines:
                yield "\n".join(lines)
                lines = []
    except TimeoutError as exc:  # before ClientError: aiohttp's read timeout is both
        raise AgentUnavailable(f"openai: the stream stalled for {timeout_s:g}s") from exc
    except aiohttp.ClientError as exc:
        raise AgentUnavailable(f"openai: the stream broke: {why(exc)}") from exc
    if lines:
        yield "\n".join(lines)


_LINE_END = re.compile(rb"\r\n|\r|\n")


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The lines of an event stream as it arrives, each ended by CRLF, LF or CR and nothing else
    (not U+2028, which a model may well write unescaped), however long.

    Not aiohttp's readline: it ends lines at LF only, and refuses one over 128 KiB (a tool
    call's arguments can be longer).
    """
    pending = b""
    async for chunk in content.iter_any():
        pending += chunk
        held = pending.endswith(b"\r")  # maybe the first half of a CRLF: wait for the next byte
        *done, pending = _LINE_END.split(pending[:-1] if held else pending)
        if held:
            pending += b"\r"
        for line in done:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.rstrip(b"\r").decode("utf-8", "replace")


def _read_chunk(reply: _Reply, data: str) -> bool:
    """Add one chunk to `reply`; True when its text grew."""
    try:
        chunk = json.loads(data)
    except ValueError:
        raise AgentRejected(f"openai: a stream event is not JSON: {data[:100]!r}") from None
    if not isinstance(chunk, dict):
        raise AgentRejected(f"openai: a stream event is not an object: {data[:100]!r}")
    if chunk.get("error"):
        raise AgentUnavailable(f"openai: the stream failed: {_error_text(chunk['error'])}")
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return False  # usage or filter results: no text
    choice = choices[0]
    delta = choice.get("delta") or {}
    reply.finished = reply.finished or bool(choice.get("finish_reason"))
    reply.add_calls(delta.get("tool_calls"))
    refusal = delta.get("refusal")
    reply.refusal += refusal if isinstance(refusal, str) else ""
    piece = delta.get("content")
    if isinstance(piece, str) and piece:
        reply.text += piece
        return True
    return False


def _read_completion(body: Any, agent: str) -> AgentResponse:
    """A plain ChatCompletion's first choice as the agent's answer."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise AgentRejected("openai: unreadable reply: no choices[0]")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise AgentRejected("openai: unreadable reply: choices[0] has no message")
    content = message.get("content")
    reply = _Reply(
        text=content if isinstance(content, str) else "",
        refusal=message["refusal"] if isinstance(message.get("refusal"), str) else "",
    )
    reply.add_calls(message.get("tool_calls"))
    return reply.response(agent)


def _error_text(error: Any) -> str:
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:200]
    return str(error)[:200]


def build(name: str, config: OpenAIConfig, tools: Sequence[ToolSpec] = ()) -> OpenAIAgent:
    """The client of an OpenAI-compatible agent that may call `tools`."""
    return OpenAIAgent(name, config, tools)
