"""The admin web pages under /admin: overview, search, transcripts, routes; server-rendered.

No script runs on them: plain links and forms, a stylesheet served from here, and the chart
drawn as inline SVG on the server. See bots/admin/session.py for who gets in.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from bots.admin import forms
from bots.admin.actions import Admin, AdminError
from bots.admin.api import transcript_json
from bots.admin.overview import COLOURS, OTHER, chart_svg, overview
from bots.admin.session import COOKIE, COOKIE_PATH, SESSION_S, AdminAuth, Session, safe_next
from bots.app import App
from core.config import SOURCES
from core.model import ThreadRef
from core.routing import parse_thread
from core.search import STATUSES

SET_BY = "admin-page"
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def when(value: datetime | str | None) -> str:
    """A stored time as people read it (UTC)."""
    if value is None or value == "":
        return ""
    stamp = datetime.fromisoformat(value) if isinstance(value, str) else value
    return stamp.strftime("%Y-%m-%d %H:%M:%S UTC")


def pretty(arguments: Any) -> str:
    """Tool-call arguments (JSON text) indented, or as they came when they are not JSON."""
    if not isinstance(arguments, str):
        return json.dumps(arguments, indent=2, ensure_ascii=False)
    try:
        return json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
    except ValueError:
        return arguments


def platform_link(source: str, data: dict[str, Any]) -> tuple[str, str] | None:
    """Where to open the thread on its platform: (label, URL), or (label, "") with no link."""
    for key, label in (("permalink", "Open in Slack"), ("jump_url", "Open in Discord")):
        url = data.get(key)
        if isinstance(url, str) and url.startswith(("https://", "http://")):
            return label, url
    if source == "telegram" and data.get("chat_id") is not None:
        return f"Telegram chat {data.get('chat_title') or ''} ({data['chat_id']})".strip(), ""
    return None


if TYPE_CHECKING:
    from jinja2 import Environment


@functools.cache
def _environment() -> Environment:
    """The pages' templates; Jinja is imported with the first page shown, not at start-up."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("bots.admin", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["pretty"] = pretty
    env.globals.update(platform_link=platform_link, colours=COLOURS, other_colour=OTHER)
    return env


def admin_pages(app: App) -> APIRouter:
    """The /admin pages of `app`, to mount in its ASGI app."""
    router = APIRouter(prefix="/admin", include_in_schema=False)
    auth = AdminAuth(app.config.admin_token(), app.config.admin.token_env)
    css = resources.files("bots.admin").joinpath("templates/admin.css").read_text("utf-8")

    def render(
        request: Request, session: Session | None, name: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        html = (
            _environment()
            .get_template(name)
            .render(session=session, path=request.url.path, token_env=auth.token_env, **context)
        )
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    @router.get("/admin.css")
    async def stylesheet() -> Response:
        headers = {"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"}
        return Response(css, media_type="text/css", headers=headers)

    @router.get("/login")
    async def login_form(request: Request, next: str | None = None) -> Response:
        if not auth.token:
            auth.session(request)  # 403 off loopback
            return RedirectResponse("/admin", status_code=303)
        return render(request, None, "login.html", next=safe_next(next), error="")

    @router.post("/login")
    async def login(request: Request) -> Response:
        if not auth.token:
            auth.session(request)
            return RedirectResponse("/admin", status_code=303)
        form = await forms.posted_form(request)
        target = safe_next(form.get("next"))
        if not auth.check_token(form.get("token", "")):
            error = "That is not the admin token."
            return render(request, None, "login.html", 401, next=target, error=error)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            auth.new_cookie(),
            max_age=SESSION_S,
            path=COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        session = auth.session(request)
        auth.check_csrf(session, (await forms.posted_form(request)).get("csrf", ""))
        response = RedirectResponse("/admin/login", status_code=303)
        response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
        return response

    @router.get("")
    async def home(request: Request) -> Response:
        session = auth.session(request)
        view = await overview(app.store)
        return render(request, session, "overview.html", view=view, chart=chart_svg(view))

    @router.get("/conversations")
    async def search(request: Request) -> Response:
        session = auth.session(request)
        form = forms.search_form(request.query_params)
        found: list[Any] = []
        total = 0
        if form.filters is not None and not form.errors:
            found, total = await app.store.search(form.filters)
        return render(
            request,
            session,
            "search.html",
            422 if form.errors else 200,
            form=form,
            found=[(c, ThreadRef.parse(c.thread_key)) for c in found],
            total=total,
            sources=SOURCES,
            statuses=STATUSES,
            page_sizes=forms.PAGE_SIZES,
            agents=sorted(app.config.agent_configs),
        )

    @router.get("/conversations/{conversation_id}")
    async def conversation(request: Request, conversation_id: str) -> Response:
        session = auth.session(request)
        found = await app.store.get_conversation(conversation_id[:100])
        if found is None:
            return render(
                request, session, "missing.html", 404, what=f"no conversation {conversation_id!r}"
            )
        body = await transcript_json(app.store, found)
        return render(request, session, "conversation.html", c=body)

    @router.get("/routes")
    async def routes_page(request: Request, explain: str | None = None) -> Response:
        session = auth.session(request)
        return await _routes(request, session, explain=explain)

    @router.post("/routes")
    async def set_route(request: Request) -> Response:
        session = auth.session(request)
        form = await forms.posted_form(request)
        auth.check_csrf(session, form.get("csrf", ""))
        try:
            outcome = await _admin().set_route(
                *_scope(form),
                form.get("agent", "").strip(),
                situation=form.get("situation", "").strip() or None,
                move_open=form.get("move_open") == "on",
                by=SET_BY,
            )
        except AdminError as exc:
            return await _routes(request, session, status=exc.status, error=str(exc), form=form)
        done = urlencode({"done": "set", "moved": outcome.change.moved})
        return RedirectResponse(f"/admin/routes?{done}", status_code=303)

    @router.post("/routes/unset")
    async def unset_route(request: Request) -> Response:
        session = auth.session(request)
        form = await forms.posted_form(request)
        auth.check_csrf(session, form.get("csrf", ""))
        try:
            await _admin().unset_route(*_scope(form), by=SET_BY)
        except AdminError as exc:
            return await _routes(request, session, status=exc.status, error=str(exc), form=form)
        return RedirectResponse("/admin/routes?done=unset", status_code=303)

    def _admin() -> Admin:
        return Admin(app.config, app.store, app.router, app.services)

    async def _routes(
        request: Request,
        session: Session,
        *,
        status: int = 200,
        error: str = "",
        form: dict[str, str] | None = None,
        explain: str | None = None,
    ) -> Response:
        steps, explain_error = None, ""
        if explain:
            try:
                steps = await app.router.explain(parse_thread(explain[:1000]))
            except ValueError as exc:
                explain_error = str(exc)
        return render(
            request,
            session,
            "routes.html",
            status,
            routes=await app.router.routes(),
            overridden=await app.router.overridden(),
            default_agent=app.config.default_agent,
            changes=await app.store.route_changes(limit=100),
            sources=SOURCES,
            agents=sorted(app.config.agent_configs),
            error=error,
            form=form or {},
            done=request.query_params.get("done", ""),
            moved=request.query_params.get("moved", "0"),
            explain=explain or "",
            steps=steps,
            explain_error=explain_error,
        )

    return router


def _scope(form: dict[str, str]) -> tuple[str, str | None, str | None]:
    """(source, workspace, channel) of a route form; an empty field means any (None)."""
    source, workspace, channel = (form.get(k, "") for k in ("source", "workspace", "channel"))
    return source.strip(), workspace.strip() or None, channel.strip() or None
