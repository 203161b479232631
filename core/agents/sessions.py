"""Julep sessions API (0.2/0.3 generation, with `situation`): stateful, one session a thread.

`open` creates a session for the agent (`agent_id`), a user, the situation that sets its
background, and `metadata = {"source": ..., "data": ...}` so that sessions can be listed by
platform (`metadata_filter={"source": "slack"}`). The session's id is the conversation's
`remote_id`; each turn then sends only the new messages to `/sessions/{id}/chat`.

Tools: the agent's tools go with every chat as OpenAI-style functions. When the model calls one,
the service answers a `function_call` message whose content is `{"name", "arguments"}` (one call
at a time); its result goes back as a `function` message on the next chat.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from core.agents.base import (
    AgentResponse,
    HttpAgentConfig,
    HttpAgentService,
    env_secret,
)
from core.errors import AgentRejected
from core.model import Conversation, ToolCall, ToolSpec, Turn

# Namespaces of the UUID5s we derive: users from platform users, tool ids from tool names.
USERS = uuid.UUID("3d0c5d0e-2a53-4f43-9a8c-6a1f0e0f7b21")
TOOLS = uuid.UUID("b7e1b6f2-6f0a-4b8e-8f4e-2f9d8f6c1a44")


def _uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a UUID (Julep ids look like 9bb48ef4-b6f7-…)") from None


UuidText = Annotated[str, AfterValidator(_uuid)]


class SessionsConfig(HttpAgentConfig):
    """`service = "sessions"`: a Julep agent, one session per thread."""

    service: Literal["sessions"]
    base_url: str = "https://api-alpha.julep.ai/api"
    api_key_env: str | None = "JULEP_API_KEY"
    agent_id: UuidText = Field(description="the Julep agent's id")
    user_id: UuidText | None = Field(
        default=None,
        description="the Julep user every session is opened with (unset: one user per "
        "platform user, a UUID5 of source and platform user id)",
    )
    situation: str | None = Field(
        default=None, description="background of every session (a route may set its own)"
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str
    name: str | None = None
    id: str | None = None


class _ChatResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    finish_reason: str | None = None
    response: list[list[_Message]]


class _FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class _Resource(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str


def _read(model: type[Any], body: Any, what: str) -> Any:
    """`body` as `model`; AgentRejected naming the first problem when it is not one."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "body"
        raise AgentRejected(
            f"sessions: unreadable reply to {what}: {where}: {error['msg']} "
            f"({exc.error_count()} problem(s))"
        ) from None


def _headers(config: SessionsConfig) -> dict[str, str]:
    key = env_secret(config.api_key_env)
    return {"Authorization": f"Bearer {key}"} if key else {}


def tool_definitions(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """The chat request's `tools`: each needs an id, stable per name."""
    return [
        {
            "type": "function",
            "function": {
                "name": spec.name,
                "description": spec.description,
                "parameters": spec.parameters,
            },
            "id": str(uuid.uuid5(TOOLS, spec.name)),
        }
        for spec in tools
    ]


def chat_messages(turns: list[Turn]) -> list[dict[str, Any]]:
    """New turns as ChatML input: user messages, and tool results as `function` messages."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        if turn.role == "user":
            message: dict[str, Any] = {"role": "user", "content": turn.content}
        elif turn.role == "tool":
            message = {"role": "function", "content": turn.content}
        else:
            continue  # the service keeps its own answers; system notices are ours
        if turn.name:
            message["name"] = turn.name
        messages.append(message)
    return messages


def _tool_call(message: _Message, what: str) -> ToolCall:
    try:
        raw = json.loads(message.content)
    except ValueError:
        raise AgentRejected(f"sessions: a function_call in {what} is not JSON") from None
    call: _FunctionCall = _read(_FunctionCall, raw, what)
    arguments = call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)
    return ToolCall(id=message.id or uuid.uuid4().hex, name=call.name, arguments=arguments)


def agent_response(body: Any, what: str, remote_id: str | None) -> AgentResponse:
    """The agent's messages as turns; a `function_call` becomes a tool call to run."""
    reply: _ChatResponse = _read(_ChatResponse, body, what)
    turns: list[Turn] = []
    calls: list[ToolCall] = []
    for message in reply.response[0] if reply.response else []:
        if message.role == "function_call":
            call = _tool_call(message, what)
            calls.append(call)
            turns.append(Turn(role="agent", content="", name=message.name, tool_calls=[call]))
        elif message.role == "assistant":
            turns.append(Turn(role="agent", content=message.content, name=message.name))
    return AgentResponse(turns=turns, tool_calls=calls, remote_id=remote_id)


class SessionsAgent(HttpAgentService):
    """A Julep agent through its sessions API; Julep keeps the history."""

    stateful = True

    def __init__(self, name: str, config: SessionsConfig, tools: Sequence[ToolSpec] = ()) -> None:
        super().__init__(name, config, _headers(config))
        self.sessions = config
        self.tools = list(tools)

    def situation_for(self, conversation: Conversation) -> str | None:
        """The route's situation (set by the bridge, or kept in the conversation's data), else
        the agent's."""
        if conversation.situation:
            return conversation.situation
        from_data = conversation.data.get("situation")
        if isinstance(from_data, str) and from_data:
            return from_data
        return self.sessions.situation

    def user_for(self, conversation: Conversation) -> str:
        """The configured user, else a UUID5 of the platform user (the thread when unknown).

        The SDK cannot read a session without a user, so every session gets one.
        """
        if self.sessions.user_id:
            return self.sessions.user_id
        data = conversation.data
        who = data.get("user_id") or data.get("user_name") or f"thread:{conversation.thread_key}"
        return str(uuid.uuid5(USERS, f"{conversation.source}:{who}"))

    async def open(self, conversation: Conversation) -> str | None:
        return await self._create(conversation)

    async def _create(self, conversation: Conversation) -> str:
        body: dict[str, Any] = {
            "agent_id": self.sessions.agent_id,
            "user_id": self.user_for(conversation),
            "metadata": {"source": conversation.source, "data": conversation.data},
        }
        situation = self.situation_for(conversation)
        if situation is not None:
            body["situation"] = situation
        reply = await self.request("POST", "/sessions", json=body)
        resource: _Resource = _read(_Resource, reply, "POST /sessions")
        return resource.id

    async def respond(
        self, conversation: Conversation, history: list[Turn], new: list[Turn]
    ) -> AgentResponse:
        """Send the new turns; opens the session first if the conversation has none yet."""
        remote_id = conversation.remote_id
        opened = None
        if remote_id is None:
            remote_id = opened = await self._create(conversation)
        path = f"/sessions/{quote(remote_id, safe='')}/chat"
        body: dict[str, Any] = {"messages": chat_messages(new)}
        if self.tools:
            body["tools"] = tool_definitions(self.tools)
        if self.sessions.temperature is not None:
            body["temperature"] = self.sessions.temperature
        if self.sessions.max_tokens is not None:
            body["max_tokens"] = self.sessions.max_tokens
        reply = await self.request("POST", path, json=body)
        return agent_response(reply, f"POST {path}", opened)

    async def update_situation(self, remote_id: str, situation: str) -> None:
        """Give an open session a new situation (e.g. an admin changed its route's)."""
        path = f"/sessions/{quote(remote_id, safe='')}"
        reply = await self.request("PATCH", path, json={"situation": situation})
        _read(_Resource, reply, f"PATCH {path}")


def build(name: str, config: SessionsConfig, tools: Sequence[ToolSpec] = ()) -> SessionsAgent:
    """The sessions client; `tools` go with every chat."""
    return SessionsAgent(name, config, tools)
