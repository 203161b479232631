"""The admin API: search conversations, read and label them, route channels to agents."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from bots.admin.actions import Admin, AdminError
from core.access import policy_for
from core.model import Conversation, ThreadRef
from core.routing import ExplainStep, Route, parse_thread
from core.search import FilterError, search_filters, storable
from core.store import RouteChange, Store, aware

if TYPE_CHECKING:
    from bots.app import App

STATUSES = Literal["open", "closed", "failed"]


def platform_link(c: Conversation) -> str | None:
    """The thread on its platform: Slack's permalink, Discord's jump URL, a Telegram
    supergroup's t.me/c/ link (private chats and basic groups have none)."""
    for key in ("permalink", "jump_url"):
        url = c.data.get(key)
        if isinstance(url, str) and url.startswith(("https://", "http://")):
            return url
    chat = str(c.data.get("chat_id", ""))
    if c.source == "telegram" and chat.startswith("-100") and chat[4:].isdigit():
        try:
            thread = ThreadRef.parse(c.thread_key).thread
        except ValueError:
            thread = ""
        place = thread.removeprefix("topic-")
        return f"https://t.me/c/{chat[4:]}" + (f"/{place}" if place.isdigit() else "")
    return None


def conversation_json(c: Conversation) -> dict[str, Any]:
    workspace: str | None = None
    channel: str | None = None
    try:
        thread = ThreadRef.parse(c.thread_key)
        workspace, channel = thread.workspace, thread.channel
    except ValueError:
        pass
    return {
        "id": c.id,
        "source": c.source,
        "thread_key": c.thread_key,
        "workspace": workspace,
        "channel": channel,
        "link": platform_link(c),
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
    """A conversation with its messages, failed turns, and the conversations of the same
    thread before and after a move to another agent."""
    body = conversation_json(conversation)
    body["messages"] = [message_json(r) for r in await store.history(conversation.id)]
    body["failures"] = [
        {"event_id": r.event_id, "error": r.error, "when": _iso(r.updated)}
        for r in await store.turns_failed(conversation.id)
    ]
    body["previous_conversation_id"] = conversation.data.get("previous_conversation_id")
    body["next_conversation_id"] = None
    if conversation.data.get("moved_to_agent") is not None:
        thread = await store.thread_conversations(conversation.thread_key)
        after = [c.id for c in thread if c.data.get("previous_conversation_id") == conversation.id]
        body["next_conversation_id"] = after[0] if after else None
    return body


def route_json(route: Route, overridden: bool = False) -> dict[str, Any]:
    return {
        "tier": route.tier,
        "source": route.source,
        "workspace": route.workspace,
        "channel": route.channel,
        "agent": route.agent,
        "situation": route.situation,
        "respond": route.respond,
        "allow_users": _ids(route.allow_users),
        "deny_users": _ids(route.deny_users),
        "allow_channels": _ids(route.allow_channels),
        "refused_notice": route.refused_notice,
        "origin": route.origin,
        "set_by": route.set_by,
        "set_at": _iso(route.set_at),
        "overridden": overridden,  # a config route an admin's route replaces
    }


def change_json(change: RouteChange) -> dict[str, Any]:
    return {
        "id": change.id,
        "at": _iso(change.at),
        "who": change.who,
        "source": change.source,
        "workspace": change.workspace,
        "channel": change.channel,
        "action": change.action,
        "old_agent": change.old_agent,
        "new_agent": change.new_agent,
        "old_situation": change.old_situation,
        "new_situation": change.new_situation,
        "moved": change.moved,
    }


def step_json(step: ExplainStep) -> dict[str, Any]:
    return {
        "tier": step.tier,
        "route": route_json(step.route) if step.route else None,
        "agent": step.agent,
        "chosen": step.chosen,
        "note": step.note,
    }


async def routes_json(admin: Admin) -> dict[str, Any]:
    """Every route, most specific first, each with its origin; and the default agent."""
    overridden = await admin.router.overridden()
    return {
        "default_agent": admin.config.default_agent,
        "routes": [route_json(r, r in overridden) for r in await admin.router.routes()],
    }


async def explain_json(admin: Admin, thread: ThreadRef) -> dict[str, Any]:
    """How a thread is routed; and the conversation it continues, whose agent it keeps."""
    steps = await admin.router.explain(thread)
    chosen = next(s for s in steps if s.chosen)
    current = await admin.store.conversation_for_thread(thread.key)
    return {
        "thread": thread.key,
        "agent": chosen.agent,
        "steps": [step_json(s) for s in steps],
        "conversation": conversation_json(current) if current else None,
        "access": access_json(admin, thread),
    }


def access_json(admin: Admin, thread: ThreadRef) -> dict[str, Any]:
    """Who is answered in a thread's channel, from the file's routes, and the limits."""
    policy = policy_for(admin.router.file_routes(), thread)
    limits = admin.config.limits
    return {
        "channel_open": policy.channel_open(thread),
        "allow_users": _ids(policy.allow_users),
        "deny_users": _ids(policy.deny_users),
        "allow_channels": _ids(policy.allow_channels),
        "refused_notice": policy.refused_notice,
        "per_user_per_minute": limits.per_user_per_minute,
        "per_user_per_day": limits.per_user_per_day,
    }


def _ids(values: Iterable[str] | None) -> list[str] | None:
    return sorted(values) if values is not None else None


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


class RouteIn(BaseModel):
    """PUT /api/routes: route a scope to an agent."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=32)
    workspace: str | None = Field(default=None, max_length=200)
    channel: str | None = Field(default=None, max_length=200)
    agent: str = Field(min_length=1, max_length=200)
    situation: str | None = Field(default=None, max_length=20_000)
    move_open: bool = False
    set_by: str = Field(default="admin-api", min_length=1, max_length=200)


class ConversationPatch(BaseModel):
    """PATCH /api/conversations/{id}: data merged key by key (null removes), a new source."""

    model_config = ConfigDict(extra="forbid")

    data: dict[str, Any] | None = None
    source: str | None = None


def outcome_json(outcome: Any) -> dict[str, Any]:
    return {
        "change": change_json(outcome.change),
        "situations_updated": outcome.situations_updated,
        "situation_failures": outcome.situation_failures,
    }


def _refused(exc: AdminError) -> HTTPException:
    return HTTPException(exc.status, str(exc))


def admin_routes(store: Store, token: str, app: App | None = None) -> APIRouter:
    """The /api routes; the route and update calls need the running `app` (its config,
    router and agent clients)."""
    router = APIRouter(prefix="/api", tags=["admin"], dependencies=[Depends(admin_guard(token))])

    def admin() -> Admin:
        if app is None:
            raise HTTPException(503, "this server runs without routes")
        services: Mapping[str, Any] = app.services
        return Admin(app.config, app.store, app.router, services)

    @router.get("/conversations")
    async def search(
        source: str | None = None,
        workspace: str | None = None,
        channel: str | None = None,
        user: str | None = None,
        agent: str | None = None,
        status: STATUSES | None = None,
        text: Annotated[str | None, Query(min_length=1, max_length=500)] = None,
        data: Annotated[
            list[str] | None,
            Query(description="KEY=VALUE: data[KEY] equals VALUE (repeat for more)"),
        ] = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 20,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        reversed: bool = True,
    ) -> dict[str, Any]:
        try:
            filters = search_filters(
                source=source,
                workspace=workspace,
                channel=channel,
                user=user,
                agent=agent,
                status=status,
                text=text,
                data=data or [],
                since=since,
                until=until,
                limit=limit,
                offset=offset,
                reversed=reversed,
            )
        except FilterError as exc:
            raise HTTPException(422, str(exc)) from None
        found, total = await store.search(filters)
        return {
            "total": total,
            "limit": limit,
            "offset": offset,
            "items": [conversation_json(c) for c in found],
        }

    @router.get("/conversations/{conversation_id}")
    async def show(conversation_id: str) -> dict[str, Any]:
        conversation = None
        if storable(conversation_id):
            conversation = await store.get_conversation(conversation_id)
        if conversation is None:
            raise HTTPException(404, f"no conversation {conversation_id!r}")
        return await transcript_json(store, conversation)

    @router.patch("/conversations/{conversation_id}")
    async def update(conversation_id: str, body: ConversationPatch) -> dict[str, Any]:
        try:
            updated, mirrored = await admin().update_conversation(
                conversation_id, data=body.data, source=body.source
            )
        except AdminError as exc:
            raise _refused(exc) from None
        return {**conversation_json(updated), "mirrored": mirrored}

    @router.get("/routes")
    async def list_routes() -> dict[str, Any]:
        return await routes_json(admin())

    @router.put("/routes")
    async def set_route(body: RouteIn) -> dict[str, Any]:
        try:
            outcome = await admin().set_route(
                body.source,
                body.workspace,
                body.channel,
                body.agent,
                situation=body.situation,
                move_open=body.move_open,
                by=body.set_by,
            )
        except AdminError as exc:
            raise _refused(exc) from None
        return outcome_json(outcome)

    @router.delete("/routes")
    async def unset_route(
        source: Annotated[str, Query(min_length=1, max_length=32)],
        workspace: Annotated[str | None, Query(max_length=200)] = None,
        channel: Annotated[str | None, Query(max_length=200)] = None,
        set_by: Annotated[str, Query(min_length=1, max_length=200)] = "admin-api",
    ) -> dict[str, Any]:
        try:
            outcome = await admin().unset_route(source, workspace, channel, by=set_by)
        except AdminError as exc:
            raise _refused(exc) from None
        return outcome_json(outcome)

    @router.get("/routes/history")
    async def route_history(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> dict[str, Any]:
        changes = await store.route_changes(limit, offset)
        total = await store.count_route_changes()
        return {
            "total": total,
            "limit": limit,
            "offset": offset,
            "items": [change_json(c) for c in changes],
        }

    @router.get("/routes/explain")
    async def explain(
        thread: Annotated[str, Query(min_length=1, max_length=1000)],
    ) -> dict[str, Any]:
        try:
            parsed = parse_thread(thread)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return await explain_json(admin(), parsed)

    return router
