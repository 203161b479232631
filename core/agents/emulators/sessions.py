"""An in-memory emulator of Julep's sessions API (0.2/0.3 generation), at the root and under /api.

Sessions belong to the API key that made them (Julep's developer). The agent answers
deterministically: `received: TEXT` quoting the latest user message; when the request offers a
tool NAME and that message contains `!tool NAME {"json": "arguments"}`, it calls the tool instead
(a `function_call` message, finish_reason `tool_calls`), and once a `function` message brings the
result it answers `tool NAME said: RESULT`. Test controls live under `/_emulator/` (see `common`).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from core.agents.emulators.common import EmulatorControls, parse_body

TOOL_REQUEST = re.compile(r"!tool\s+([A-Za-z0-9_-]+)\s*(\{.*\})?", re.DOTALL)


# Request bodies, as the real API validates them (unknown keys are ignored).


class SessionCreate(BaseModel):
    agent_id: uuid.UUID
    user_id: uuid.UUID | None = None
    situation: str | None = None
    metadata: dict[str, Any] | None = None
    render_templates: bool | None = None


class SessionPatch(BaseModel):
    situation: str | None = None  # None: unchanged
    metadata: dict[str, Any] | None = None  # merged into the session's


class SessionPut(BaseModel):
    situation: str
    metadata: dict[str, Any] | None = None  # replaces the session's; None: unchanged


class InputMessage(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    role: Literal["system", "assistant", "user", "function_call", "function", "auto"]
    content: str
    name: str | None = None
    continue_: bool | None = Field(default=None, alias="continue")


class FunctionDef(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any]


class ToolDef(BaseModel):
    type: Literal["function", "webhook"]
    function: FunctionDef
    id: str


class ChatRequest(BaseModel):
    messages: list[InputMessage]
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    length_penalty: float | None = Field(default=None, ge=0, le=2)
    logit_bias: dict[str, int | None] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, ge=0, le=2)
    response_format: dict[str, Any] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    preset: str | None = None
    recall: bool | None = None
    record: bool | None = None
    remember: bool | None = None


# State


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(slots=True)
class StoredSession:
    id: str
    developer: str
    agent_id: str
    user_id: str | None
    situation: str | None
    metadata: dict[str, Any]
    render_templates: bool
    created_at: str
    updated_at: str
    summary: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def read(self) -> dict[str, Any]:
        """A Session."""
        return {
            "id": self.id,
            "user_id": self.user_id,
            "agent_id": self.agent_id,
            "situation": self.situation,
            "summary": self.summary,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "metadata": self.metadata,
            "render_templates": self.render_templates,
        }

    def updated(self) -> dict[str, Any]:
        """A ResourceUpdatedResponse."""
        self.updated_at = _now()
        return {"id": self.id, "updated_at": self.updated_at, "jobs": []}


class SessionStore:
    """Sessions by id, in creation order."""

    def __init__(self) -> None:
        self.sessions: dict[str, StoredSession] = {}

    def clear(self) -> None:
        self.sessions.clear()

    def create(self, developer: str, body: SessionCreate) -> StoredSession:
        now = _now()
        session = StoredSession(
            id=str(uuid.uuid4()),
            developer=developer,
            agent_id=str(body.agent_id),
            user_id=str(body.user_id) if body.user_id else None,
            situation=body.situation,
            metadata=body.metadata or {},
            render_templates=bool(body.render_templates),
            created_at=now,
            updated_at=now,
        )
        self.sessions[session.id] = session
        return session

    def get(self, developer: str, session_id: uuid.UUID) -> StoredSession:
        session = self.sessions.get(str(session_id))
        if session is None or session.developer != developer:
            raise HTTPException(404, detail="Session not found")
        return session

    def mine(self, developer: str) -> list[StoredSession]:
        return [s for s in self.sessions.values() if s.developer == developer]


def _entry(role: str, content: str, name: str | None = None) -> dict[str, Any]:
    """A ChatMLMessage as history keeps it."""
    return {
        "role": role,
        "content": content,
        "name": name,
        "created_at": _now(),
        "id": str(uuid.uuid4()),
    }


def _answer(
    session: StoredSession, inputs: list[InputMessage], offered: set[str]
) -> dict[str, Any]:
    """The agent's one message for this chat: an answer, or a call of an offered tool."""
    if inputs and inputs[-1].role == "function":
        result = inputs[-1]
        return _entry(
            "assistant", f"tool {result.name or _last_call(session)} said: {result.content}"
        )
    said = next((m.content for m in reversed(inputs) if m.role == "user"), None)
    match = TOOL_REQUEST.search(said) if said is not None else None
    if match and match.group(1) in offered:
        arguments = match.group(2) or "{}"
        try:
            json.loads(arguments)
        except ValueError:
            arguments = "{}"
        # As Julep 0.2/0.3 reports OpenAI's tool call: the function, dumped as JSON.
        return _entry("function_call", json.dumps({"arguments": arguments, "name": match.group(1)}))
    if said is None:
        said = next((m["content"] for m in reversed(session.history) if m["role"] == "user"), "")
    return _entry("assistant", f"received: {said}")


def _last_call(session: StoredSession) -> str:
    """The name of the tool the agent called last ('function' when it called none)."""
    for entry in reversed(session.history):
        if entry["role"] == "function_call":
            name: str = json.loads(entry["content"])["name"]
            return name
    return "function"


def _tokens(text: str) -> int:
    return len(text.split())


def _metadata_filter(raw: str) -> dict[str, Any]:
    try:
        wanted = json.loads(raw)
    except ValueError:
        raise HTTPException(400, detail="metadata_filter must be a JSON object") from None
    if not isinstance(wanted, dict):
        raise HTTPException(400, detail="metadata_filter must be a JSON object")
    return wanted


def create_app(*, api_keys: set[str] | None = None, latency_s: float = 0.0) -> FastAPI:
    """The emulator app; `api_keys=None` accepts any non-empty key.

    `latency_s` is added to every chat, as a stand-in for the agent's thinking.
    """
    store = SessionStore()
    controls = EmulatorControls(on_reset=store.clear)
    app = FastAPI(title="Julep sessions emulator")
    controls.install(app)
    app.state.sessions_store = store

    def developer(authorization: str | None = Header(default=None)) -> str:
        key = (authorization or "").strip()
        if key[:7].lower() == "bearer ":
            key = key[7:].strip()
        if not key:
            raise HTTPException(401, detail="Missing API key (Authorization header)")
        if api_keys is not None and key not in api_keys:
            raise HTTPException(401, detail="Invalid API key")
        return key

    router = APIRouter()

    @router.post("/sessions", status_code=201)
    async def create_session(request: Request, dev: str = Depends(developer)) -> Any:
        session = store.create(dev, await parse_body(request, SessionCreate))
        return {"id": session.id, "created_at": session.created_at, "jobs": []}

    @router.get("/sessions")
    async def list_sessions(
        dev: str = Depends(developer),
        limit: int = Query(default=100, ge=1, le=1000),
        offset: int = Query(default=0, ge=0),
        metadata_filter: str = "{}",
        sort_by: Literal["created_at", "updated_at"] = "created_at",
        order: Literal["asc", "desc"] = "desc",
    ) -> Any:
        wanted = _metadata_filter(metadata_filter)
        # Julep matches each top-level key of the filter for equality. Creation order breaks
        # ties between sessions made in the same instant.
        found = [
            (getattr(s, sort_by), made, s)
            for made, s in enumerate(store.mine(dev))
            if all(k in s.metadata and s.metadata[k] == v for k, v in wanted.items())
        ]
        found.sort(key=lambda row: row[:2], reverse=order == "desc")
        page = found[offset : offset + limit]
        return {"items": [s.read() for _, _, s in page]}

    @router.get("/sessions/{session_id}")
    async def get_session(session_id: uuid.UUID, dev: str = Depends(developer)) -> Any:
        return store.get(dev, session_id).read()

    @router.patch("/sessions/{session_id}")
    async def patch_session(
        session_id: uuid.UUID, request: Request, dev: str = Depends(developer)
    ) -> Any:
        body = await parse_body(request, SessionPatch)
        session = store.get(dev, session_id)
        if body.situation is not None:
            session.situation = body.situation
        if body.metadata is not None:
            session.metadata = {**session.metadata, **body.metadata}
        return session.updated()

    @router.put("/sessions/{session_id}")
    async def update_session(
        session_id: uuid.UUID, request: Request, dev: str = Depends(developer)
    ) -> Any:
        body = await parse_body(request, SessionPut)
        session = store.get(dev, session_id)
        session.situation = body.situation
        if body.metadata is not None:
            session.metadata = body.metadata
        return session.updated()

    @router.delete("/sessions/{session_id}", status_code=202)
    async def delete_session(session_id: uuid.UUID, dev: str = Depends(developer)) -> Any:
        session = store.get(dev, session_id)
        del store.sessions[session.id]
        return {"id": session.id, "deleted_at": _now()}

    @router.get("/sessions/{session_id}/history")
    async def history(
        session_id: uuid.UUID,
        dev: str = Depends(developer),
        limit: int = Query(default=100, ge=1, le=1000),
        offset: int = Query(default=0, ge=0),
    ) -> Any:
        entries = store.get(dev, session_id).history
        return {"items": entries[offset : offset + limit]}

    @router.delete("/sessions/{session_id}/history", status_code=202)
    async def delete_history(session_id: uuid.UUID, dev: str = Depends(developer)) -> Any:
        session = store.get(dev, session_id)
        session.history.clear()
        return {"id": session.id, "deleted_at": _now()}

    @router.get("/sessions/{session_id}/suggestions")
    async def suggestions(session_id: uuid.UUID, dev: str = Depends(developer)) -> Any:
        store.get(dev, session_id)
        return {"items": []}  # the emulated agent never suggests anything

    @router.post("/sessions/{session_id}/chat")
    async def chat(session_id: uuid.UUID, request: Request, dev: str = Depends(developer)) -> Any:
        body = await parse_body(request, ChatRequest)
        session = store.get(dev, session_id)
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        offered = {t.function.name for t in body.tools or []}
        inputs = [_entry(m.role, m.content, m.name) for m in body.messages]
        reply = _answer(session, body.messages, offered)
        if body.remember is not False:  # as Julep: only what is remembered is kept
            session.history.extend([*inputs, reply])
        prompt = sum(_tokens(m.content) for m in body.messages)
        completion = _tokens(reply["content"])
        return {
            "id": str(uuid.uuid4()),
            "finish_reason": "tool_calls" if reply["role"] == "function_call" else "stop",
            "response": [[reply]],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
            "jobs": [],
            "doc_ids": {"agent_doc_ids": [], "user_doc_ids": []},
        }

    app.include_router(router)
    app.include_router(router, prefix="/api")  # the real base URL ends in /api
    return app
