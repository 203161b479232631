"""The admin API: search conversations and read their transcripts."""

from __future__ import annotations

import hmac
import ipaddress
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from core.model import Conversation
from core.store import SearchFilters, Store, aware

STATUSES = Literal["open", "closed", "failed"]


def conversation_json(c: Conversation) -> dict[str, Any]:
    return {
        "id": c.id,
        "source": c.source,
        "thread_key": c.thread_key,
        "agent": c.agent,
        "remote_id": c.remote_id,
        "status": c.status,
        "data": c.data,
        "state": c.state,
        "created": c.created.isoformat() if c.created else None,
        "updated": c.updated.isoformat() if c.updated else None,
    }


def message_json(row: Any) -> dict[str, Any]:
    created = aware(row.created)
    return {
        "id": row.id,
        "role": row.role,
        "kind": row.kind,
        "content": row.content,
        "name": row.name,
        "author_id": row.author_id,
        "author_name": row.author_name,
        "tool_calls": row.tool_calls,
        "tool_call_id": row.tool_call_id,
        "created": created.isoformat() if created else None,
    }


async def transcript_json(store: Store, conversation: Conversation) -> dict[str, Any]:
    """A conversation with its messages and failed turns."""
    body = conversation_json(conversation)
    body["messages"] = [message_json(r) for r in await store.history(conversation.id)]
    body["failures"] = [
        {"event_id": r.event_id, "error": r.error, "when": _iso(r.updated)}
        for r in await store.turns_failed(conversation.id)
    ]
    return body


def _iso(value: datetime | None) -> str | None:
    stamp = aware(value)
    return stamp.isoformat() if stamp else None


def admin_guard(token: str) -> Any:
    """Bearer token when one is set; with none, loopback callers only."""

    async def guard(request: Request) -> None:
        if token:
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), token):
                raise HTTPException(
                    401,
                    "admin token required: send Authorization: Bearer <token>",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return
        host = request.client.host if request.client else ""
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host in ("localhost", "testclient")
        if not loopback:
            raise HTTPException(
                403,
                "no admin token is set, so the admin API answers on loopback only; "
                "set THREADBRIDGE_ADMIN_TOKEN (or [admin] token_env) to allow remote admins",
            )

    return guard


def admin_routes(store: Store, token: str) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["admin"], dependencies=[Depends(admin_guard(token))])

    @router.get("/conversations")
    async def search(
        source: str | None = None,
        workspace: str | None = None,
        channel: str | None = None,
        user: str | None = None,
        agent: str | None = None,
        status: STATUSES | None = None,
        text: Annotated[str | None, Query(min_length=1, max_length=500)] = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 20,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        reversed: bool = True,
    ) -> dict[str, Any]:
        filters = SearchFilters(
            source=source,
            workspace=workspace,
            channel=channel,
            user=user,
            agent=agent,
            status=status,
            text=text,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
            reversed=reversed,
        )
        found, total = await store.search(filters)
        return {
            "total": total,
            "limit": limit,
            "offset": offset,
            "items": [conversation_json(c) for c in found],
        }

    @router.get("/conversations/{conversation_id}")
    async def show(conversation_id: str) -> dict[str, Any]:
        conversation = await store.get_conversation(conversation_id)
        if conversation is None:
            raise HTTPException(404, f"no conversation {conversation_id!r}")
        return await transcript_json(store, conversation)

    return router
