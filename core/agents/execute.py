"""Scale GP agents execute API (`POST /v4/agents/execute`): a stateless agent with tools.

Every call sends the history, the model, the instructions, the tools and the memory strategy;
the agent answers with one action: `content` (its answer) or `tool_request` (one tool for the
bridge to run, whose result goes back as a `tool` message on the next call). Execute keeps
nothing between calls, so a conversation has no `remote_id` there.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.agents.base import (
    AgentResponse,
    HttpAgentConfig,
    HttpAgentService,
    env_secret,
)
from core.errors import AgentRejected
from core.model import Conversation, ToolCall, ToolSpec, Turn

PATH = "/v4/agents/execute"

# The models the API accepts; anything else is a 422 there, so it is a config error here.
Model = Literal[
    "gpt-4",
    "gpt-4-0613",
    "gpt-4-32k",
    "gpt-4-32k-0613",
    "gpt-3.5-turbo",
    "gpt-3.5-turbo-0613",
    "gpt-3.5-turbo-16k",
    "gpt-3.5-turbo-16k-0613",
    "claude-instant-1",
    "claude-instant-1.1",
    "claude-2",
    "claude-2.0",
]


class ExecuteConfig(HttpAgentConfig):
    """`service = "execute"`: a Scale GP agent run step by step through /v4/agents/execute."""

    service: Literal["execute"]
    base_url: str = "https://api.egp.scale.com"
    api_key_env: str | None = "SGP_API_KEY"
    account_id_env: str | None = Field(
        default=None, description="variable holding the account id (x-selected-account-id)"
    )
    model: Model = "gpt-4"
    instructions: str | None = Field(
        default=None, description="the agent's instructions (omitted: the service's default)"
    )
    memory_k: int | None = Field(
        default=None,
        ge=1,
        description="k of the last_k memory strategy: how many of the most recent messages "
        "the model sees (default: `memory`)",
    )
    temperature: float = Field(default=0.2, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop_sequences: list[str] | None = Field(default=None, max_length=4)


class _ToolRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str


class _Context(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: str | None = None
    tool_request: _ToolRequest | None = None


class _ExecuteResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    action: Literal["tool_request", "content"]
    context: _Context


def tool_format(spec: ToolSpec) -> dict[str, Any]:
    """A ToolSpec as the execute API takes a tool: name, description, arguments (JSON Schema).

    The API wants a `description` on every argument property (the SDK marks it required);
    a property configured without one is described by its own name.
    """
    arguments: dict[str, Any] = {"type": "object", "properties": {}, **spec.parameters}
    properties = arguments["properties"]
    if isinstance(properties, dict):
        arguments["properties"] = {
            key: {"description": key, **value} if isinstance(value, dict) else value
            for key, value in properties.items()
        }
    return {"name": spec.name, "description": spec.description, "arguments": arguments}


def wire_messages(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    """Stored turns as execute messages; an agent turn that asked for tools becomes one
    `tool_request` message per call (the API has one request per agent message)."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        if turn.role == "agent":
            if turn.content or not turn.tool_calls:
                messages.append({"role": "agent", "content": turn.content})
            messages.extend(
                {"role": "agent", "tool_request": {"name": c.name, "arguments": c.arguments}}
                for c in turn.tool_calls
            )
        elif turn.role == "tool":
            messages.append({"role": "tool", "name": turn.name or "tool", "content": turn.content})
        else:  # user and system messages carry only their text
            messages.append({"role": turn.role, "content": turn.content})
    return messages


def read_response(body: Any) -> AgentResponse:
    """The agent's answer, or the tool it asks for (stored as an agent turn with tool_calls)."""
    try:
        reply = _ExecuteResponse.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "body"
        raise AgentRejected(f"execute: unreadable reply: {where}: {error['msg']}") from None
    context = reply.context
    if reply.action == "tool_request":
        if context.tool_request is None:
            raise AgentRejected("execute: a tool_request reply without context.tool_request")
        request = context.tool_request
        call = ToolCall(f"call_{uuid.uuid4().hex[:16]}", request.name, request.arguments)
        turn = Turn(role="agent", content="", tool_calls=[call])
        return AgentResponse(turns=[turn], tool_calls=[call])
    if context.content is None:
        raise AgentRejected("execute: a content reply without context.content")
    return AgentResponse(turns=[Turn(role="agent", content=context.content)])


def _headers(config: ExecuteConfig) -> dict[str, str]:
    values = {
        "x-api-key": env_secret(config.api_key_env),
        "x-selected-account-id": env_secret(config.account_id_env),
    }
    return {key: value for key, value in values.items() if value}


class ExecuteAgent(HttpAgentService):
    """Scale GP's execute API: stateless; each call carries the history the bridge kept."""

    stateful = False

    def __init__(self, name: str, config: ExecuteConfig, tools: Sequence[ToolSpec] = ()) -> None:
        super().__init__(name, config, _headers(config))
        self.execute = config
        self.tools = [tool_format(spec) for spec in tools]

    async def open(self, conversation: Conversation) -> str | None:
        return None

    def body(self, turns: Sequence[Turn]) -> dict[str, Any]:
        """The request body for a call that sends `turns`."""
        config = self.execute
        body: dict[str, Any] = {
            "messages": wire_messages(turns),
            "model": config.model,
            "tools": self.tools,
        }
        if config.instructions is not None:
            body["instructions"] = config.instructions
        body["memory_strategy"] = {
            "name": "last_k",
            "params": {"k": config.memory_k or config.memory},
        }
        body["model_parameters"] = {
            "temperature": config.temperature,
            "max_tokens": config.max_tokens,
            "stop_sequences": config.stop_sequences,
        }
        return body

    async def respond(
        self, conversation: Conversation, history: list[Turn], new: list[Turn]
    ) -> AgentResponse:
        """Send the history (the bridge bounds it by `memory`) and the new turns; the answer
        is either content or one tool call for the bridge to run and send back."""
        reply = await self.request("POST", PATH, json=self.body([*history, *new]))
        return read_response(reply)


def build(name: str, config: ExecuteConfig, tools: Sequence[ToolSpec] = ()) -> ExecuteAgent:
    """The client of an execute agent; `tools` are offered to the agent on every call."""
    return ExecuteAgent(name, config, tools)
