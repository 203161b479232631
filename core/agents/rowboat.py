"""RowBoat chat API clients, both generations, on one route: `POST /api/v1/{projectId}/chat`.

- `api_version = "state"` (messages+state): stateless. Every call sends the whole history and the
  `state` the previous call returned; the state is kept on the conversation.
- `api_version = "turn"` (conversationId+turn): stateful. The first call makes the conversation
  (its `conversationId` is our `remote_id`); later calls send only the new messages.

A RowBoat project is a team of agents. Their hand-overs (transfers) are tool calls the service
answers itself, and an agent's `internal` messages are meant for the others, not for people: all
of these are stored as hidden turns, and only `external` messages are shown. A tool call that the
service leaves unanswered at the end of a turn is ours: the bridge runs it and sends the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import quote

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.agents.base import AgentResponse, HttpAgentConfig, HttpAgentService, env_secret
from core.errors import AgentRejected
from core.model import Conversation, ToolCall, ToolSpec, Turn

ApiVersion = Literal["state", "turn"]


class RowboatConfig(HttpAgentConfig):
    """`service = "rowboat"`: the agents of one RowBoat project."""

    service: Literal["rowboat"]
    base_url: str = "http://localhost:3000"
    api_key_env: str | None = "ROWBOAT_API_KEY"
    project_id: str = Field(min_length=1, description="the RowBoat project's id")
    api_version: ApiVersion = Field(
        default="state", description='"state": messages+state API; "turn": conversationId+turn API'
    )
    start_agent: str | None = Field(
        default=None,
        min_length=1,
        description="state API: the agent that takes a new conversation (sent as the first "
        "turn's state.last_agent_name); unset: the project's own start agent",
    )
    mock_tools: dict[str, str] | None = Field(
        default=None, description="tool name -> canned result RowBoat uses instead of the tool"
    )

    @model_validator(mode="after")
    def _start_agent_needs_state(self) -> RowboatConfig:
        if self.start_agent is not None and self.api_version != "state":
            raise ValueError(
                'start_agent applies to api_version = "state" only; the turn API starts '
                "every conversation with the project's start agent"
            )
        return self


# Wire models: one message model reads both generations, and both spellings of each field.


class _Function(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str = "{}"


class _WireCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    function: _Function


class WireMessage(BaseModel):
    """One RowBoat message, in the snake_case (state) or camelCase (turn) spelling."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    sender: str | None = Field(
        default=None,
        validation_alias=AliasChoices("sender", "agenticSender", "agenticName", "agentName"),
    )
    response_type: Literal["internal", "external"] | None = Field(
        default=None,
        validation_alias=AliasChoices("response_type", "agenticResponseType", "responseType"),
    )
    tool_calls: list[_WireCall] | None = Field(
        default=None, validation_alias=AliasChoices("tool_calls", "toolCalls")
    )
    tool_call_id: str | None = Field(
        default=None, validation_alias=AliasChoices("tool_call_id", "toolCallId")
    )
    tool_name: str | None = Field(
        default=None, validation_alias=AliasChoices("tool_name", "toolName")
    )


class _StateReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[WireMessage]
    state: dict[str, Any] | None = None


class _Turn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    output: list[WireMessage]


class _TurnReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    conversationId: str = Field(min_length=1)  # the wire's camelCase name
    turn: _Turn


# Field names of each generation: (sender, response type, tool calls, tool call id, tool name).
# The state API was spelled both ways over its life (the turn API's server renamed agenticName
# to agentName): send both, so servers of either age read it.
_SPELLING: dict[ApiVersion, tuple[tuple[str, ...], tuple[str, ...], str, str, str]] = {
    "state": (
        ("sender", "agenticSender"),
        ("response_type", "agenticResponseType"),
        "tool_calls",
        "tool_call_id",
        "tool_name",
    ),
    "turn": (
        ("agenticName", "agentName"),
        ("responseType",),
        "toolCalls",
        "toolCallId",
        "toolName",
    ),
}


def wire_message(turn: Turn, version: ApiVersion) -> dict[str, Any] | None:
    """A stored turn as the API's message (None for what RowBoat has no message for)."""
    senders, kind_keys, calls_key, call_id_key, tool_name_key = _SPELLING[version]
    if turn.role in ("user", "system"):
        return {"role": turn.role, "content": turn.content}
    if turn.role == "tool":
        return {
            "role": "tool",
            "content": turn.content,
            call_id_key: turn.tool_call_id or "",
            tool_name_key: turn.name or "",
        }
    if turn.role != "agent":
        return None
    kind = "internal" if turn.hidden else "external"
    message: dict[str, Any] = {"role": "assistant", "content": turn.content}
    message |= dict.fromkeys(senders, turn.name)
    message |= dict.fromkeys(kind_keys, kind)
    if turn.tool_calls:
        message["content"] = turn.content or None
        message[calls_key] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in turn.tool_calls
        ]
    return message


def read_messages(messages: list[WireMessage]) -> tuple[list[Turn], list[ToolCall]]:
    """A turn's new messages as turns to store, and the tool calls left for us to run."""
    turns: list[Turn] = []
    for m in messages:
        if m.role == "assistant":
            calls = [
                ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or []
            ]
            shown = m.response_type == "external" and bool(m.content)
            turns.append(
                Turn(
                    role="agent",
                    content=m.content or "",
                    name=m.sender,
                    tool_calls=calls,
                    hidden=not shown,
                )
            )
        elif m.role == "tool":
            # The service's own result (a transfer between its agents, a mocked tool).
            turns.append(
                Turn(
                    role="tool",
                    content=m.content or "",
                    name=m.tool_name,
                    tool_call_id=m.tool_call_id,
                    hidden=True,
                )
            )
    last = messages[-1] if messages else None
    if last is None or last.role != "assistant" or not last.tool_calls:
        return turns, []
    answered = {m.tool_call_id for m in messages if m.role == "tool"}
    pending = [c for c in turns[-1].tool_calls if c.id not in answered]
    return turns, pending


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "body"
    return f"{where}: {error['msg']} ({exc.error_count()} problem(s))"


def _from_first_user(turns: list[Turn]) -> list[Turn]:
    """Drop what a memory-bounded history cut in half: anything before its first user turn."""
    for index, turn in enumerate(turns):
        if turn.role in ("user", "system"):
            return turns[index:]
    return turns


class RowboatAgent(HttpAgentService):
    """A RowBoat project's agents, through either generation of the chat API."""

    def __init__(self, name: str, config: RowboatConfig) -> None:
        key = env_secret(config.api_key_env)
        super().__init__(name, config, {"Authorization": f"Bearer {key}"} if key else {})
        self.rowboat = config
        self.stateful = config.api_version == "turn"
        self.path = f"/api/v1/{quote(config.project_id, safe='')}/chat"

    async def open(self, conversation: Conversation) -> str | None:
        # The turn API makes the conversation on its first turn; there is nothing to open first.
        return None

    async def respond(
        self, conversation: Conversation, history: list[Turn], new: list[Turn]
    ) -> AgentResponse:
        """Send the turn's messages; return the new ones, the calls for us, and the state/id."""
        if self.rowboat.api_version == "turn":
            return await self._turn(conversation, new)
        return await self._state(conversation, [*history, *new])

    async def _state(self, conversation: Conversation, turns: list[Turn]) -> AgentResponse:
        state = conversation.state
        if state is None and self.rowboat.start_agent:
            state = {"last_agent_name": self.rowboat.start_agent}
        messages = [wire_message(t, "state") for t in _from_first_user(turns)]
        body: dict[str, Any] = {"messages": [m for m in messages if m], "state": state}
        if self.rowboat.mock_tools is not None:
            body["mockTools"] = self.rowboat.mock_tools
        raw = await self.request("POST", self.path, json=body)
        try:
            reply = _StateReply.model_validate(raw)
        except ValidationError as exc:
            raise AgentRejected(f"rowboat: unreadable reply: {_first_error(exc)}") from None
        turns_out, calls = read_messages(reply.messages)
        return AgentResponse(turns=turns_out, tool_calls=calls, state=reply.state)

    async def _turn(self, conversation: Conversation, new: list[Turn]) -> AgentResponse:
        messages = [wire_message(t, "turn") for t in new]
        body: dict[str, Any] = {"messages": [m for m in messages if m]}
        # Sent only once there is one: the newest server reads a missing id, but not a null.
        if conversation.remote_id:
            body["conversationId"] = conversation.remote_id
        body |= {"mockTools": self.rowboat.mock_tools, "stream": False}
        raw = await self.request("POST", self.path, json=body)
        try:
            reply = _TurnReply.model_validate(raw)
        except ValidationError as exc:
            raise AgentRejected(f"rowboat: unreadable reply: {_first_error(exc)}") from None
        turns_out, calls = read_messages(reply.turn.output)
        made = reply.conversationId if reply.conversationId != conversation.remote_id else None
        return AgentResponse(turns=turns_out, tool_calls=calls, remote_id=made)


def build(name: str, config: RowboatConfig, tools: Sequence[ToolSpec] = ()) -> RowboatAgent:
    """The client; `tools` are defined in the RowBoat project, so none are sent."""
    return RowboatAgent(name, config)
