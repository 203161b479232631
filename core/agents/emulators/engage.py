"""An in-memory Engage Smarter emulator: the conversations and runs APIs, at the root, under /v1.

The agent answers deterministically, quoting the latest user message (`[NAME] received: ...`), so
tests can pair replies with messages. Request bodies are read raw because the vendor SDK sends
JSON without a Content-Type header. Test controls live under `/_emulator/` (see `common`).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from core.agents.emulators.common import EmulatorControls, parse_body

_USERS = uuid.UUID("6f1c1f5e-0d7a-4c1e-9a55-3e0a0d4b6c21")  # namespace for user ids from keys


# Request bodies, as the real API validates them (unknown keys are ignored, as FastAPI does).


class ConversationCreate(BaseModel):
    data: dict[str, Any] = {}
    source: str = ""


class ConversationUpdate(BaseModel):
    data: dict[str, Any] | None = None  # None: unchanged
    source: str | None = None


class UserMessage(BaseModel):
    role: Literal["user"]
    content: str
    name: str | None = None


class HistoryMessage(BaseModel):
    role: Literal["user", "agent"]
    content: str
    name: str | None = None


class ChatRequest(BaseModel):
    messages: list[UserMessage]


class RunRequest(BaseModel):
    messages: list[HistoryMessage]
    data: dict[str, Any] = {}


# State


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the org from X-Org-Id and a user id derived from the API key."""

    org_id: str
    user_id: str


@dataclass(slots=True)
class StoredConversation:
    id: str
    org_id: str
    user_id: str
    data: dict[str, Any]
    source: str
    created: str
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def summary(self) -> str:
        first = next((m["content"] for m in self.messages if m["role"] == "user"), "")
        return str(first)[:80]

    def read(self) -> dict[str, Any]:
        """ConversationRead."""
        return {
            "id": self.id,
            "org_id": self.org_id,
            "data": self.data,
            "source": self.source,
            "cloned_from_message_id": None,
            "summary": self.summary,
            "created": self.created,
        }

    def read_full(self) -> dict[str, Any]:
        """ConversationReadFull."""
        return {**self.read(), "user_id": self.user_id, "tags": [], "is_saved": False}


def _now() -> str:
    return datetime.now(UTC).isoformat()


class EngageStore:
    """Conversations by id, in creation order."""

    def __init__(self) -> None:
        self.conversations: dict[str, StoredConversation] = {}

    def clear(self) -> None:
        self.conversations.clear()

    def create(self, caller: Caller, data: dict[str, Any], source: str) -> StoredConversation:
        conv = StoredConversation(
            id=str(uuid.uuid4()),
            org_id=caller.org_id,
            user_id=caller.user_id,
            data=data,
            source=source,
            created=_now(),
        )
        self.conversations[conv.id] = conv
        return conv

    def get(self, caller: Caller, conversation_id: str) -> StoredConversation:
        conv = self.conversations.get(conversation_id)
        if conv is None or conv.org_id != caller.org_id:
            raise HTTPException(404, detail="Conversation not found")
        return conv

    def mine(self, caller: Caller) -> list[StoredConversation]:
        return [
            c
            for c in self.conversations.values()
            if c.org_id == caller.org_id and c.user_id == caller.user_id
        ]


def _message(
    conv: StoredConversation,
    run_id: str,
    role: str,
    content: str,
    name: str | None,
    user: str | None,
) -> dict[str, Any]:
    """A MessageRead, stored on the conversation."""
    message = {
        "id": str(uuid.uuid4()),
        "org_id": conv.org_id,
        "conversation_id": conv.id,
        "run_id": run_id,
        "role": role,
        "content": content,
        "name": name,
        "user_id": user,
        "created": _now(),
    }
    conv.messages.append(message)
    return message


def _agent_turn(
    conv: StoredConversation, caller: Caller, agent: str, inputs: list[UserMessage | HistoryMessage]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Store `inputs` and the agent's answer as one run; return both as MessageReads.

    The agent answers only when the latest message in the conversation is the user's.
    """
    run_id = str(uuid.uuid4())
    stored = [
        _message(
            conv, run_id, m.role, m.content, m.name, caller.user_id if m.role == "user" else None
        )
        for m in inputs
    ]
    last = conv.messages[-1] if conv.messages else None
    if last is None or last["role"] != "user":
        return stored, []
    reply = _message(conv, run_id, "agent", f"[{agent}] received: {last['content']}", agent, None)
    return stored, [reply]


def _answer(
    inputs: list[dict[str, Any]],
    replies: list[dict[str, Any]],
    agent: str,
    *,
    stream: bool,
    return_inputs: bool,
) -> Any:
    echoed = inputs if return_inputs else []
    if not stream:
        return [*echoed, *replies]
    # Streams open with a status message, as the real agents' do (it is not stored).
    status = [
        {**r, "id": str(uuid.uuid4()), "role": "status", "content": f"{agent} is thinking"}
        for r in replies[:1]
    ]
    shown = [*echoed, *status, *replies]
    return StreamingResponse(_sse(shown), media_type="text/event-stream")


async def _sse(messages: list[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-Sent Events: one MessageRead per event, then [DONE]."""
    for message in messages:
        yield f"data: {json.dumps(message)}\n\n"
    yield "data: [DONE]\n\n"


def create_app(*, api_keys: set[str] | None = None, latency_s: float = 0.0) -> FastAPI:
    """The emulator app; `api_keys=None` accepts any non-empty key.

    `latency_s` is added to every chat and run call, as a stand-in for the agent's thinking.
    """
    store = EngageStore()
    controls = EmulatorControls(on_reset=store.clear)
    app = FastAPI(title="Engage Smarter emulator")
    controls.install(app)
    app.state.engage_store = store

    def caller(
        x_api_key: str | None = Header(default=None),
        x_org_id: str | None = Header(default=None),
    ) -> Caller:
        if not x_api_key:
            raise HTTPException(401, detail="Missing API key (X-Api-Key header)")
        if api_keys is not None and x_api_key not in api_keys:
            raise HTTPException(401, detail="Invalid API key")
        if not x_org_id:
            raise HTTPException(401, detail="Missing organisation id (X-Org-Id header)")
        return Caller(org_id=x_org_id, user_id=str(uuid.uuid5(_USERS, x_api_key)))

    async def think() -> None:
        if latency_s > 0:
            await asyncio.sleep(latency_s)

    @app.post("/v1/conversations")
    async def create_conversation(request: Request, who: Caller = Depends(caller)) -> Any:
        body = await parse_body(request, ConversationCreate)
        return store.create(who, body.data, body.source).read_full()

    @app.get("/v1/conversations/me")
    async def my_conversations(
        who: Caller = Depends(caller),
        reversed: bool = True,
        limit: int = Query(default=20, ge=0),
        offset: int = Query(default=0, ge=0),
        tag_id: str | None = None,
    ) -> Any:
        found = store.mine(who)
        if tag_id is not None:
            found = []  # the emulator never tags a conversation
        if reversed:
            found.reverse()
        return [c.read() for c in found[offset : offset + limit]]

    @app.get("/v1/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str, who: Caller = Depends(caller)) -> Any:
        return store.get(who, conversation_id).read_full()

    @app.patch("/v1/conversations/{conversation_id}")
    async def update_conversation(
        conversation_id: str, request: Request, who: Caller = Depends(caller)
    ) -> Any:
        body = await parse_body(request, ConversationUpdate)
        conv = store.get(who, conversation_id)
        if body.data is not None:
            conv.data = body.data
        if body.source is not None:
            conv.source = body.source
        return conv.read_full()

    @app.get("/v1/conversations/{conversation_id}/messages")
    async def conversation_messages(conversation_id: str, who: Caller = Depends(caller)) -> Any:
        return store.get(who, conversation_id).messages

    @app.post("/v1/conversations/{conversation_id}/chat")
    async def chat(
        conversation_id: str,
        request: Request,
        agent: str = Query(min_length=1),
        stream: bool = False,
        return_inputs: bool = False,
        who: Caller = Depends(caller),
    ) -> Any:
        body = await parse_body(request, ChatRequest)
        conv = store.get(who, conversation_id)
        await think()
        inputs, replies = _agent_turn(conv, who, agent, list(body.messages))
        return _answer(inputs, replies, agent, stream=stream, return_inputs=return_inputs)

    @app.post("/v1/runs/chat")
    async def run(
        request: Request,
        agent: str = Query(min_length=1),
        stream: bool = False,
        return_inputs: bool = False,
        who: Caller = Depends(caller),
    ) -> Any:
        body = await parse_body(request, RunRequest)
        conv = store.create(who, body.data, "")
        await think()
        inputs, replies = _agent_turn(conv, who, agent, list(body.messages))
        return _answer(inputs, replies, agent, stream=stream, return_inputs=return_inputs)

    return app
