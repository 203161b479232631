"""An OpenAI-compatible chat completions emulator: `/chat/completions`, plain and streamed, and
`/models`, at the root and under `/v1` (so a base URL copied with its `/v1` works too).

The model answers deterministically: `[MODEL] received: TEXT`, quoting the latest user message.
When that message contains `!tool NAME {"json": "arguments"}` and the request offers a tool called
NAME, it asks for that tool instead; once the result comes back it answers `tool NAME said:
RESULT`. Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and the
message list is checked as OpenAI checks it (every tool call answered, every result asked for).
Test controls live under `/_emulator/` (see `common`).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from core.agents.emulators.common import EmulatorControls, parse_body

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1", "o4-mini")
_CREATED = 1_700_000_000  # the models' fixed `created` time
_NAME = r"^[A-Za-z0-9_-]{1,64}$"
_TOOL_ASK = re.compile(r"!tool\s+([A-Za-z0-9_-]{1,64})")
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error"}
_ERROR_TYPES |= {422: "invalid_request_error", 429: "rate_limit_error"}


# Request bodies, as the API reads them (unknown keys are ignored).


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionSpec(_Body):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(_Body):
    type: Literal["function"]
    function: FunctionSpec


class CalledFunction(_Body):
    name: str
    arguments: str


class CallIn(_Body):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(default=None, pattern=_NAME)
    tool_calls: list[CallIn] | None = Field(default=None, min_length=1)
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    model: str
    messages: list[Message] = Field(min_length=1)
    tools: list[ToolSpec] | None = Field(default=None, min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> Any:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def check_pairing(messages: Sequence[Message]) -> None:
    """Raise ApiError 400 where tool calls and tool results do not pair up, as OpenAI does."""
    pending: list[str] = []
    for index, message in enumerate(messages):
        if message.role == "tool":
            if message.tool_call_id not in pending:
                raise ApiError(
                    400,
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceding message with 'tool_calls'.",
                    param=f"messages.[{index}].role",
                )
            pending.remove(message.tool_call_id)
            continue
        if pending:
            break
        pending = [call.id for call in message.tool_calls or []]
    if pending:
        raise ApiError(
            400,
            "An assistant message with 'tool_calls' must be followed by tool messages responding "
            f"to each 'tool_call_id'. The following tool_call_ids did not have response "
            f"messages: {', '.join(pending)}",
            param="messages",
        )


class Model:
    """The emulated model: what it answers to a request."""

    def __init__(self) -> None:
        self.count = 0

    def next_id(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count:06d}"

    def answer(self, request: ChatRequest) -> tuple[str | None, list[dict[str, Any]]]:
        """The reply's content, or the tool calls it makes."""
        last = request.messages[-1]
        if last.role == "tool":
            return self._after_tools(request.messages), []
        said = next((m.text() for m in reversed(request.messages) if m.role == "user"), "")
        offered = {tool.function.name for tool in request.tools or []}
        asked = _TOOL_ASK.search(said)
        if asked and asked.group(1) in offered:
            arguments = _arguments(said[asked.end() :])
            function = {"name": asked.group(1), "arguments": arguments}
            return None, [
                {"id": self.next_id("call_emu"), "type": "function", "function": function}
            ]
        return f"[{request.model}] received: {said}", []

    @staticmethod
    def _after_tools(messages: Sequence[Message]) -> str:
        start = max(i for i, m in enumerate(messages) if m.tool_calls)
        names = {c.id: c.function.name for c in messages[start].tool_calls or []}
        return "\n".join(
            f"tool {names.get(m.tool_call_id or '', '?')} said: {m.text()}"
            for m in messages[start + 1 :]
        )


def _arguments(rest: str) -> str:
    """The JSON object after `!tool NAME`, as compact JSON text ('{}' when there is none)."""
    start = rest.find("{")
    if start < 0:
        return "{}"
    try:
        value, _ = json.JSONDecoder().raw_decode(rest[start:])
    except ValueError:
        return "{}"
    return json.dumps(value, separators=(",", ":"))


def _usage(request: ChatRequest, content: str | None, calls: list[dict[str, Any]]) -> Any:
    prompt = sum(len(m.text().split()) + 3 for m in request.messages)
    completion = len((content or "").split()) + sum(len(c["function"]["arguments"]) for c in calls)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion(
    completion_id: str, request: ChatRequest, content: str | None, calls: list[dict[str, Any]]
) -> Any:
    """A ChatCompletion."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    choice = {"index": 0, "message": message, "logprobs": None}
    choice["finish_reason"] = "tool_calls" if calls else "stop"
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [choice],
        "usage": _usage(request, content, calls),
        "system_fingerprint": "fp_emu",
    }


def chunks(
    completion_id: str, request: ChatRequest, content: str | None, calls: list[dict[str, Any]]
) -> list[Any]:
    """The ChatCompletionChunks of a streamed reply: role first, then pieces, then the finish."""
    first = {"role": "assistant", "content": "" if content else None, "refusal": None}
    deltas: list[dict[str, Any]] = [first]
    deltas += [{"content": piece} for piece in re.findall(r"\s*\S+", content or "")]
    for index, call in enumerate(calls):
        head = {**call, "index": index, "function": {**call["function"], "arguments": ""}}
        deltas.append({"tool_calls": [head]})
        arguments = call["function"]["arguments"]
        deltas += [
            {"tool_calls": [{"index": index, "function": {"arguments": arguments[at : at + 8]}}]}
            for at in range(0, len(arguments), 8)
        ]
    finish = "tool_calls" if calls else "stop"
    choices: list[list[dict[str, Any]]] = [
        [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}] for d in deltas
    ]
    choices.append([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}])
    with_usage = request.stream_options is not None and request.stream_options.include_usage
    base: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk"}
    base |= {"created": int(time.time()), "model": request.model, "system_fingerprint": "fp_emu"}
    out = [{**base, "choices": c, **({"usage": None} if with_usage else {})} for c in choices]
    if with_usage:
        out.append({**base, "choices": [], "usage": _usage(request, content, calls)})
    return out


async def _sse(events: list[Any], latency_s: float) -> AsyncIterator[str]:
    for event in events:
        if latency_s > 0:
            await asyncio.sleep(latency_s / len(events))  # the thinking, spread over the stream
        yield f"data: {json.dumps(event)}\n\n"
    yield "data: [DONE]\n\n"


def _model_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _CREATED, "owned_by": "emulator"}


def create_app(
    api_keys: set[str] | None = None,
    latency_s: float = 0.0,
    *,
    models: Sequence[str] = DEFAULT_MODELS,
) -> FastAPI:
    """The emulator app; `api_keys=None` accepts any non-empty key.

    `latency_s` is added to every completion (spread over the chunks of a streamed one);
    `models` are the model names it serves (others get 404 `model_not_found`).
    """
    model = Model()
    controls = EmulatorControls(on_reset=lambda: setattr(model, "count", 0), error_body=error_body)
    app = FastAPI(title="OpenAI-compatible emulator")
    controls.install(app)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.code, exc.param), exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = f"Invalid request: {where}: {first['msg']}"
        return JSONResponse(error_body(400, message, param=where or None), 400)

    @app.exception_handler(HTTPException)
    async def not_found(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"Invalid URL ({request.method} {request.url.path})"
        return JSONResponse(error_body(exc.status_code, message), exc.status_code)

    def caller(authorization: str | None = Header(default=None)) -> str:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if api_keys is not None and key.strip() not in api_keys:
            shown = f"{key[:3]}****{key[-4:]}" if len(key) > 8 else "****"
            raise ApiError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")
        return key

    def known(model_id: str) -> str:
        if model_id not in models:
            raise ApiError(
                404,
                f"The model `{model_id}` does not exist or you do not have access to it.",
                code="model_not_found",
                param="model",
            )
        return model_id

    router = APIRouter(dependencies=[Depends(caller)])

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await parse_body(request, ChatRequest)
        known(body.model)
        check_pairing(body.messages)
        content, calls = model.answer(body)
        completion_id = model.next_id("chatcmpl-emu")
        if body.stream:
            events = chunks(completion_id, body, content, calls)
            return StreamingResponse(_sse(events, latency_s), media_type="text/event-stream")
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        return completion(completion_id, body, content, calls)

    @router.get("/models")
    async def list_models() -> Any:
        return {"object": "list", "data": [_model_card(m) for m in models]}

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> Any:
        return _model_card(known(model_id))

    app.include_router(router)
    app.include_router(router, prefix="/v1")
    return app
