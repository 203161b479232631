"""The built-in web chat: a page at `/` and its small JSON API, source `web`.

    POST /api/chat/{thread}           {"text", "user", "id"?} -> 202 {"event_id"}
    GET  /api/chat/{thread}/messages  the thread's messages, oldest first
    GET  /api/chat/{thread}/events    Server-Sent Events: "changed" whenever to fetch again

Each browser tab keeps its own thread id, so each tab is its own conversation.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from core.bridge import Bridge
from core.errors import MessageRejected
from core.jsonbody import BodyInvalid, validate_json
from core.model import Author, Inbound, Reply, ThreadRef
from core.store import aware

SOURCE = "web"
ThreadId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="client-chosen id")]


class WebConfig(BaseModel):
    """`[web]`: the built-in chat page."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    title: str = "threadbridge"


class ChatIn(BaseModel):
    """A message typed into the web chat."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=1_000_000)
    user: str = Field(default="web user", min_length=1, max_length=100)
    id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="client message id; a repeated id is accepted once",
    )


_CHAT_IN_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ChatIn.model_json_schema()}},
    }
}


async def _chat_body(request: Request) -> ChatIn:
    """The posted ChatIn; 422 with the reason for any bad body.

    Read by hand: FastAPI answers a body that is not UTF-8 with a reasonless 400, and its
    json.loads lets a lone surrogate escape through, which the store then fails on with a 500.
    """
    try:
        return validate_json(await request.body(), ChatIn)
    except BodyInvalid as exc:
        raise RequestValidationError(exc.errors) from None


def thread_ref(thread: str) -> ThreadRef:
    return ThreadRef(SOURCE, "-", "-", thread)


def to_inbound(thread: str, body: ChatIn, user_agent: str | None) -> Inbound:
    """A web chat post as the bridge's Inbound."""
    event = body.id or uuid.uuid4().hex
    data: dict[str, Any] = {"thread_id": thread, "user_name": body.user}
    if user_agent:
        data["user_agent"] = user_agent[:300]
    return Inbound(
        event_id=f"web:{thread}:{event}",
        thread=thread_ref(thread),
        author=Author(id=body.user, name=body.user),
        text=body.text,
        data=data,
    )


class WebAdapter:
    """Serves the chat page; "posting" a reply wakes the page's event stream."""

    source = SOURCE
    working_every_s: float | None = None

    def __init__(self, config: WebConfig | None = None) -> None:
        self.config = config or WebConfig()
        self.bridge: Bridge | None = None
        # thread -> the open event streams' queues of (event, JSON data)
        self._streams: dict[str, set[asyncio.Queue[tuple[str, str]]]] = defaultdict(set)

    async def start(self, bridge: Bridge) -> None:
        self.bridge = bridge
        bridge.listeners.append(self._on_bridge)

    async def stop(self) -> None:
        self.close_streams()

    def close_streams(self) -> None:
        """End every open event stream (the page reconnects to the next server)."""
        for queues in self._streams.values():
            for queue in queues:
                queue.put_nowait(("bye", "{}"))

    async def post(self, reply: Reply) -> list[str]:
        self._publish(reply.thread.thread, "changed")
        return [f"web:{uuid.uuid4().hex}"]

    async def show_working(self, thread: ThreadRef) -> None:
        self._publish(thread.thread, "working")

    async def draft(self, thread: ThreadRef, text: str) -> None:
        """The answer so far, while a streaming agent writes it (the page shows it live)."""
        self._publish(thread.thread, "draft", json.dumps({"text": text}))

    async def _on_bridge(self, thread_key: str, what: str) -> None:
        if thread_key.startswith(f"{SOURCE}:"):
            self._publish(ThreadRef.parse(thread_key).thread, "changed")

    def _publish(self, thread: str, event: str, data: str = "{}") -> None:
        for queue in self._streams.get(thread, ()):
            queue.put_nowait((event, data))

    def routes(self) -> APIRouter:
        """The page and the chat API, to mount in the app."""
        router = APIRouter(tags=["web chat"])
        page = resources.files("adapters").joinpath("web_page.html").read_text(encoding="utf-8")
        page = page.replace("{{title}}", _html_escape(self.config.title))

        @router.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def index() -> HTMLResponse:
            return HTMLResponse(page)

        @router.post("/api/chat/{thread}", status_code=202, openapi_extra=_CHAT_IN_SCHEMA)
        async def send(thread: ThreadId, request: Request) -> dict[str, Any]:
            body = await _chat_body(request)
            bridge = self._bridge()
            inbound = to_inbound(thread, body, request.headers.get("user-agent"))
            try:
                submitted = await bridge.submit(inbound)
            except MessageRejected as exc:
                raise HTTPException(status_code=422, detail=exc.reason) from None
            return {"event_id": submitted.event_id, "duplicate": submitted.duplicate}

        @router.get("/api/chat/{thread}/messages")
        async def messages(thread: ThreadId) -> list[dict[str, Any]]:
            return await self.transcript(thread)

        @router.get("/api/chat/{thread}/events")
        async def events(thread: ThreadId, request: Request) -> StreamingResponse:
            return StreamingResponse(
                self._stream(thread, request),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )

        return router

    async def transcript(self, thread: str) -> list[dict[str, Any]]:
        """What the person sees: their messages, the agent's answers and notices, in order."""
        stored, pending = await self._bridge().store.thread_view(thread_ref(thread).key)
        out: list[dict[str, Any]] = []
        for row in stored:
            if row.role in ("user", "agent", "system") and row.kind != "hidden":
                out.append(_message(row.role, row.content, row.created, "done", row.kind))
        for row in pending:
            out.append(_message("user", row.payload.get("text", ""), row.created, row.status))
        return out

    async def _stream(self, thread: str, request: Request) -> AsyncIterator[str]:
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._streams[thread].add(queue)
        try:
            yield "retry: 2000\n\n"
            while not await request.is_disconnected():
                try:
                    event, data = await asyncio.wait_for(queue.get(), timeout=15)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if event == "bye":
                    return
                yield f"event: {event}\ndata: {data}\n\n"
        finally:
            self._streams[thread].discard(queue)
            if not self._streams[thread]:
                self._streams.pop(thread, None)

    def _bridge(self) -> Bridge:
        if self.bridge is None:
            raise HTTPException(status_code=503, detail="the bridge is starting; try again")
        return self.bridge


def _message(
    role: str, text: str, created: Any, status: str, kind: str = "message"
) -> dict[str, Any]:
    stamp = aware(created)
    return {
        "role": role,
        "text": text,
        "created": stamp.isoformat() if stamp else None,
        "status": status,
        "kind": kind,
    }


def _html_escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )
