"""A Scale GP agents execute emulator: `POST /v4/agents/execute`, at the root.

The emulated agent is stateless like the real one. It first applies the request's memory
strategy (last_k keeps the newest k messages) and sees only what that kept; the kept messages are
recorded for tests at `GET /_emulator/kept`. Then it answers deterministically:

- after a `tool` message: `tool NAME said: RESULT`;
- when the latest message is the user's and contains `!tool NAME {"json": "arguments"}` and the
  request offers a tool called NAME: a `tool_request` for it;
- otherwise `[MODEL] received: TEXT`, quoting the latest user message it kept.

Auth is the `x-api-key` header (`x-selected-account-id` is optional). Test controls live under
`/_emulator/` (see `common`).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.agents.emulators.common import EmulatorControls, parse_body
from core.agents.execute import Model

# Request bodies, as the real API validates them (unknown keys are ignored, as FastAPI does).


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ImageUrl(BaseModel):
    url: str
    detail: Literal["low", "high", "auto"] | None = None


class ImageUrlPart(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ImageUrl


class ImageData(BaseModel):
    data: str
    media_type: str
    detail: Literal["low", "high", "auto"] | None = None
    type: Literal["base64"] | None = None


class ImageDataPart(BaseModel):
    type: Literal["image_data"] = "image_data"
    image_data: ImageData


ContentPart = TextPart | ImageUrlPart | ImageDataPart


class UserMessage(BaseModel):
    role: Literal["user"]
    content: str | list[ContentPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return " ".join(p.text if isinstance(p, TextPart) else "[image]" for p in self.content)


class ToolRequest(BaseModel):
    name: str
    arguments: str


class AgentMessage(BaseModel):
    role: Literal["agent"]
    content: str | None = None
    tool_request: ToolRequest | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AgentMessage:
        if self.content is None and self.tool_request is None:
            raise ValueError("an agent message needs content or a tool_request")
        return self


class ToolMessage(BaseModel):
    role: Literal["tool"]
    name: str
    content: str


class SystemMessage(BaseModel):
    role: Literal["system"]
    content: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


Message = Annotated[
    UserMessage | AgentMessage | ToolMessage | SystemMessage | AssistantMessage,
    Field(discriminator="role"),
]

ArgumentType = Literal["string", "number", "integer", "boolean", "object", "array", "null"]


class ArgumentProperty(BaseModel):
    model_config = ConfigDict(extra="allow")  # default, examples, items… are JSON Schema too

    type: ArgumentType
    description: str


class ToolArguments(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["object"]
    properties: dict[str, ArgumentProperty] = {}
    required: list[str] = []


class Tool(BaseModel):
    name: str
    description: str
    arguments: ToolArguments


class LastKParams(BaseModel):
    k: int = Field(ge=1)


class MemoryStrategy(BaseModel):
    name: Literal["last_k"] = "last_k"
    params: LastKParams


class ModelParameters(BaseModel):
    temperature: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop_sequences: list[str] | None = Field(default=None, max_length=4)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    top_k: int | None = Field(default=None, alias="topK")
    top_p: float | None = Field(default=None, alias="topP")


class ExecuteRequest(BaseModel):
    messages: list[Message]
    model: Model
    tools: list[Tool]
    instructions: str | None = None
    memory_strategy: MemoryStrategy | None = None
    model_parameters: ModelParameters | None = None

    @model_validator(mode="before")
    @classmethod
    def _infer_roles(cls, data: Any) -> Any:
        """A message may omit `role`: its fields tell which kind it is (the SDK allows it)."""
        if isinstance(data, dict) and isinstance(data.get("messages"), list):
            data = {**data, "messages": [_with_role(m) for m in data["messages"]]}
        return data


def _with_role(message: Any) -> Any:
    if not isinstance(message, dict) or "role" in message:
        return message
    if "tool_request" in message:
        role = "agent"
    elif "name" in message:
        role = "tool"
    else:
        role = "user"
    return {**message, "role": role}


# The model

_TOOL = re.compile(r"!tool\s+(\S+)\s*(\{.*\})?", re.DOTALL)


def remember(body: ExecuteRequest) -> list[Any]:
    """What the memory strategy keeps of the messages: the newest k (all, with none given)."""
    if body.memory_strategy is None:
        return list(body.messages)
    return list(body.messages[-body.memory_strategy.params.k :])


def _tool_wanted(text: str, offered: set[str]) -> dict[str, str] | None:
    found = _TOOL.search(text)
    if found is None or found.group(1) not in offered:
        return None
    raw = found.group(2) or "{}"
    try:
        arguments = json.loads(raw)
    except ValueError:
        return None
    return {"name": found.group(1), "arguments": json.dumps(arguments)}


def answer(body: ExecuteRequest, kept: list[Any]) -> dict[str, Any]:
    """The agent's one step, from the messages it kept."""
    last = kept[-1] if kept else None
    if isinstance(last, ToolMessage):
        return _content(f"tool {last.name} said: {last.content}")
    if isinstance(last, UserMessage):
        wanted = _tool_wanted(last.text, {t.name for t in body.tools})
        if wanted is not None:
            return {"action": "tool_request", "context": {"content": None, "tool_request": wanted}}
    said = next((m.text for m in reversed(kept) if isinstance(m, UserMessage)), "")
    return _content(f"[{body.model}] received: {said}")


def _content(text: str) -> dict[str, Any]:
    return {"action": "content", "context": {"content": text, "tool_request": None}}


def create_app(*, api_keys: set[str] | None = None, latency_s: float = 0.0) -> FastAPI:
    """The emulator app; `api_keys=None` accepts any non-empty key.

    `latency_s` is added to every execute call, as a stand-in for the model's thinking.
    """
    kept_log: list[dict[str, Any]] = []
    controls = EmulatorControls(on_reset=kept_log.clear)
    app = FastAPI(title="Scale GP agents execute emulator")
    controls.install(app)
    app.state.execute_kept = kept_log

    def authorised(
        x_api_key: str | None = Header(default=None),
        x_selected_account_id: str | None = Header(default=None),
    ) -> str | None:
        if not x_api_key:
            raise HTTPException(401, detail="Missing API key (x-api-key header)")
        if api_keys is not None and x_api_key not in api_keys:
            raise HTTPException(401, detail="Invalid API key")
        return x_selected_account_id

    @app.post("/v4/agents/execute")
    async def execute(request: Request, account: str | None = Depends(authorised)) -> Any:
        body = await parse_body(request, ExecuteRequest)
        kept = remember(body)
        kept_log.append(
            {
                "account_id": account,
                "k": body.memory_strategy.params.k if body.memory_strategy else None,
                "received": len(body.messages),
                "kept": [m.model_dump(mode="json", exclude_none=True) for m in kept],
            }
        )
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        return answer(body, kept)

    @app.get("/_emulator/kept", include_in_schema=False)
    async def kept_messages() -> list[dict[str, Any]]:
        """Per execute call: k, how many messages came, and the ones the model kept."""
        return kept_log

    return app
