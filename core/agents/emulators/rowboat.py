"""An in-memory RowBoat emulator: `POST /api/v1/{projectId}/chat`, both generations on one route.

A body with a `state` key (even `null`) is the messages+state API; one without is the
conversationId+turn API. The emulated project is a team of agents (`agents`, the first is the
start agent), answering deterministically to the latest message:

- `!tool NAME {"json": "arguments"}`: the current agent calls tool NAME (an internal message whose
  tool call the service leaves for the caller, unless `mockTools` has NAME); once the tool's
  result comes back it answers `tool NAME said: RESULT`. RowBoat requests carry no tool list (the
  project defines its tools), so every NAME counts as one of the project's tools;
- anything containing `transfer`: the current agent says so in an internal message and hands over
  to the next agent with a `transfer_to_…` tool call that the service answers itself; the new
  agent answers `[AGENT] received: TEXT`, and keeps the conversation from then on;
- anything else: `[AGENT] received: TEXT`, an external message.

Errors are `{"error": "..."}`: 400 for a bad body or a non-Bearer header, 403 for a bad key, 404 for
an unknown project or conversation. Test controls live under `/_emulator/` (see `common`).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from core.agents.emulators.common import EmulatorControls
from core.jsonbody import BodyInvalid, validate_json

TOOL_REQUEST = re.compile(r"!tool\s+([A-Za-z0-9_.-]+)\s*(\{.*\})?", re.DOTALL)
TRANSFER_ARGUMENTS = '{"args":"","kwargs":""}'


# Request bodies. Each generation has its own spelling; the state API's assistant messages come in
# two (the vendor SDK echoes them back with only agenticSender/agenticResponseType).


class FunctionCall(BaseModel):
    name: str
    arguments: str


class WireCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    """One message, whatever its spelling on the wire."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    sender: str | None = None
    response_type: Literal["internal", "external"] | None = None
    tool_calls: list[WireCall] | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None

    @model_validator(mode="after")
    def _fields_of_its_role(self) -> Message:
        if self.role == "tool" and (self.tool_call_id is None or self.tool_name is None):
            raise ValueError("a tool message needs its tool call id and tool name")
        if self.role == "assistant" and self.tool_calls:
            return self
        if self.content is None:
            raise ValueError(f"a {self.role} message without tool calls needs content")
        if self.role == "assistant" and self.response_type is None:
            raise ValueError("an assistant message needs its response type")
        return self


class StateMessage(Message):
    sender: str | None = Field(
        default=None, validation_alias=AliasChoices("sender", "agenticSender")
    )
    response_type: Literal["internal", "external"] | None = Field(
        default=None, validation_alias=AliasChoices("response_type", "agenticResponseType")
    )


class TurnMessage(Message):
    sender: str | None = Field(
        default=None, validation_alias=AliasChoices("agentName", "agenticName")
    )
    response_type: Literal["internal", "external"] | None = Field(
        default=None, validation_alias="responseType"
    )
    tool_calls: list[WireCall] | None = Field(default=None, validation_alias="toolCalls")
    tool_call_id: str | None = Field(default=None, validation_alias="toolCallId")
    tool_name: str | None = Field(default=None, validation_alias="toolName")


class StateRequest(BaseModel):
    messages: list[StateMessage]
    state: Any
    workflowId: str | None = None  # sent (as null) by rowboat 3.1.0
    testProfileId: str | None = None
    mockTools: dict[str, str] | None = None


class TurnRequest(BaseModel):
    messages: list[TurnMessage]
    conversationId: str | None = None
    mockTools: dict[str, str] | None = None
    stream: Literal[False] = False  # streamed turns are not emulated


# What the service answers


def state_wire(m: Message) -> dict[str, Any]:
    """A message in the state API's spelling (both spellings of sender and response type)."""
    if m.role != "assistant":
        if m.role != "tool":
            return {"role": m.role, "content": m.content}
        return {
            "role": "tool",
            "content": m.content,
            "tool_call_id": m.tool_call_id,
            "tool_name": m.tool_name,
        }
    out: dict[str, Any] = {
        "role": "assistant",
        "content": m.content,
        "sender": m.sender,
        "agenticSender": m.sender,
        "response_type": m.response_type,
        "agenticResponseType": m.response_type,
        "current_turn": True,
    }
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    return out


def turn_wire(m: Message) -> dict[str, Any]:
    """A message in the turn API's camelCase (both names of the agent)."""
    if m.role == "tool":
        return {
            "role": "tool",
            "content": m.content,
            "toolCallId": m.tool_call_id,
            "toolName": m.tool_name,
        }
    if m.role != "assistant":
        return {"role": m.role, "content": m.content}
    out: dict[str, Any] = {
        "role": "assistant",
        "content": m.content,
        "agenticName": m.sender,
        "agentName": m.sender,
    }
    if m.tool_calls:
        out["toolCalls"] = [c.model_dump() for c in m.tool_calls]
    else:
        out["responseType"] = m.response_type
    return out


def _say(agent: str, text: str, kind: Literal["internal", "external"] = "external") -> Message:
    return Message(role="assistant", content=text, sender=agent, response_type=kind)


def _call(agent: str, name: str, arguments: str) -> Message:
    call = WireCall(
        id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments)
    )
    return Message(role="assistant", sender=agent, response_type="internal", tool_calls=[call])


def _result(call: Message, content: str) -> Message:
    (wire,) = call.tool_calls or []
    return Message(role="tool", content=content, tool_call_id=wire.id, tool_name=wire.function.name)


def _arguments(text: str | None) -> str:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return "{}"
    return json.dumps(value) if isinstance(value, dict) else "{}"


@dataclass(frozen=True, slots=True)
class Project:
    """The emulated workflow: its agents, the first one starting every conversation."""

    agents: tuple[str, ...]

    def current(self, name: Any) -> str:
        return name if name in self.agents else self.agents[0]

    def run(
        self, history: list[Message], agent: str, mock_tools: dict[str, str] | None
    ) -> tuple[list[Message], str]:
        """The project's answer to `history`: new messages, and the agent left in charge."""
        last = history[-1]
        if last.role == "tool":
            return [_say(agent, f"tool {last.tool_name} said: {last.content}")], agent
        text = next((m.content or "" for m in reversed(history) if m.role == "user"), "")
        asked = TOOL_REQUEST.search(text)
        if asked:
            call = _call(agent, asked.group(1), _arguments(asked.group(2)))
            mocked = (mock_tools or {}).get(asked.group(1))
            if mocked is None:
                return [call], agent
            said = f"tool {asked.group(1)} said: {mocked}"
            return [call, _result(call, mocked), _say(agent, said)], agent
        if "transfer" in text.lower() and len(self.agents) > 1:
            target = self.agents[(self.agents.index(agent) + 1) % len(self.agents)]
            slug = re.sub(r"\W+", "_", target.lower()).strip("_")
            transfer = _call(agent, f"transfer_to_{slug}", TRANSFER_ARGUMENTS)
            return [
                _say(agent, f"{agent} hands over to {target}", "internal"),
                transfer,
                _result(transfer, json.dumps({"assistant": target})),
                _say(target, f"[{target}] received: {text}"),
            ], target
        return [_say(agent, f"[{agent}] received: {text}")], agent

    def state(self, before: Any, new: list[Message], agent: str) -> dict[str, Any]:
        """The state to hand back: each agent's history so far, and who answered last."""
        previous = before.get("agent_data") if isinstance(before, dict) else None
        histories = {
            d.get("name"): list(d.get("history") or [])
            for d in previous or []
            if isinstance(d, dict)
        }
        data = [
            {
                "name": name,
                "instructions": f"You are {name}.",
                "history": [
                    *histories.get(name, []),
                    *(state_wire(m) for m in new if m.sender == name),
                ],
            }
            for name in self.agents
        ]
        return {"agent_data": data, "last_agent_name": agent}


@dataclass(slots=True)
class StoredConversation:
    id: str
    project_id: str
    agent: str
    messages: list[Message] = field(default_factory=list)
    turns: list[dict[str, Any]] = field(default_factory=list)


class RowboatStore:
    """The turn API's conversations, by id."""

    def __init__(self) -> None:
        self.conversations: dict[str, StoredConversation] = {}

    def clear(self) -> None:
        self.conversations.clear()


async def _error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
    return JSONResponse({"error": "Invalid request"}, status_code=400)


def _body(raw: bytes) -> StateRequest | TurnRequest:
    """The request in its generation's model: the `state` key, whatever its value, says which."""
    try:
        decoded = json.loads(raw)
    except ValueError:
        raise HTTPException(400, "Invalid request: the body is not JSON") from None
    model: type[StateRequest | TurnRequest] = (
        StateRequest if isinstance(decoded, dict) and "state" in decoded else TurnRequest
    )
    try:
        body = validate_json(raw, model)
    except BodyInvalid as exc:
        error = exc.errors[0]
        where = ".".join(str(part) for part in error["loc"][1:]) or "body"
        raise HTTPException(400, f"Invalid request: {where}: {error['msg']}") from None
    if not body.messages and not (isinstance(body, TurnRequest) and body.conversationId):
        raise HTTPException(400, "Invalid request: messages must not be empty")
    return body


def create_app(
    *,
    api_keys: set[str] | None = None,
    latency_s: float = 0.0,
    projects: set[str] | None = None,
    agents: tuple[str, ...] = ("Hub", "Specialist"),
) -> FastAPI:
    """The emulator app; `None` for `api_keys`/`projects` accepts any key/project id.

    `latency_s` is added to every chat call, as a stand-in for the agents' thinking.
    """
    if not agents:
        raise ValueError("a project needs at least one agent")
    project = Project(tuple(agents))
    store = RowboatStore()
    controls = EmulatorControls(on_reset=store.clear, error_body=lambda _s, m: {"error": m})
    app = FastAPI(title="RowBoat emulator")
    controls.install(app)
    app.add_exception_handler(HTTPException, _error)
    app.add_exception_handler(RequestValidationError, _error)
    app.state.rowboat_store = store

    def authorize(authorization: str | None, project_id: str) -> None:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme != "Bearer" or not key.strip():
            raise HTTPException(400, "Authorization header must be 'Bearer <API key>'")
        if api_keys is not None and key.strip() not in api_keys:
            raise HTTPException(403, "Invalid API key")
        if projects is not None and project_id not in projects:
            raise HTTPException(404, "Project not found")

    def state_turn(body: StateRequest) -> dict[str, Any]:
        history: list[Message] = list(body.messages)
        before = body.state if isinstance(body.state, dict) else {}
        agent = project.current(before.get("last_agent_name"))
        new, agent = project.run(history, agent, body.mockTools)
        return {
            "messages": [state_wire(m) for m in new],
            "state": project.state(body.state, new, agent),
        }

    def turn(project_id: str, body: TurnRequest) -> dict[str, Any]:
        if body.conversationId is None:
            conv = StoredConversation(str(uuid.uuid4()), project_id, project.agents[0])
            store.conversations[conv.id] = conv
        else:
            found = store.conversations.get(body.conversationId)
            if found is None or found.project_id != project_id:
                raise HTTPException(404, "Conversation not found")
            conv = found
        conv.messages.extend(body.messages)
        new, conv.agent = project.run(conv.messages, conv.agent, body.mockTools)
        conv.messages.extend(new)
        record = {
            "id": str(uuid.uuid4()),
            "reason": {"type": "api"},
            "input": {
                "messages": [turn_wire(m) for m in body.messages],
                "mockTools": body.mockTools,
            },
            "output": [turn_wire(m) for m in new],
            "createdAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        conv.turns.append(record)
        return {"conversationId": conv.id, "turn": record}

    @app.post("/api/v1/{project_id}/chat")
    async def chat(
        project_id: str, request: Request, authorization: str | None = Header(default=None)
    ) -> Any:
        authorize(authorization, project_id)
        body = _body(await request.body())
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        if isinstance(body, StateRequest):
            return state_turn(body)
        return turn(project_id, body)

    return app
