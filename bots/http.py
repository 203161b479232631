"""The one ASGI app: web chat, admin API, health, readiness and metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy.exc import DBAPIError
from starlette.types import ASGIApp, Receive, Scope, Send

from bots.admin.api import admin_guard, admin_routes
from bots.admin.pages import admin_pages
from bots.app import App
from bots.bodylimit import BodyLimit
from core.errors import ThreadbridgeError
from core.metrics import CONTENT_TYPE

log = logging.getLogger("threadbridge")


def create_app(app: App) -> ASGIApp:
    """The ASGI app for `app`: the platforms' webhooks, then FastAPI for the rest. Its
    lifespan starts and stops everything."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            await app.start()
        except ThreadbridgeError as exc:  # said in one line by `serve`, without a traceback
            app.start_error = str(exc)
            await app.stop()
            raise
        try:
            yield
        finally:
            await app.stop()

    api = FastAPI(title="threadbridge", version="0.1.0", lifespan=lifespan)
    hooks: dict[str, Callable[[Request], Awaitable[Response]]] = {}

    @api.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        return app.health()

    @api.get("/readyz", tags=["health"], responses={503: {"description": "not ready, and why"}})
    async def readyz() -> JSONResponse:
        """200 when the store answers and every channel is connected; 503 naming what is not."""
        checks = await app.ready()
        unready = [name for name, why in checks.items() if why != "ok"]
        status = "not ready" if unready else "ready"
        body = {"status": status, "checks": checks, "not_ready": unready}
        return JSONResponse(body, status_code=503 if unready else 200)

    # Prometheus sends the admin token as a bearer token (scrape config `authorization`);
    # without a token the server listens on loopback only, and so does this.
    guard = Depends(admin_guard(app.config.admin_token()))

    @api.get("/metrics", tags=["health"], dependencies=[guard], response_class=PlainTextResponse)
    async def metrics() -> Response:
        bridge = app.bridge
        if bridge is None:
            return PlainTextResponse("not started\n", status_code=503)
        breakers = getattr(bridge, "breakers", None)
        body = await bridge.metrics.render(app.store, list(bridge.adapters), breakers)
        return Response(body, media_type=CONTENT_TYPE)

    def store_unavailable(request: Request, exc: Exception) -> Response:
        # The store is down (a dropped connection, a refused one): nothing was written, and
        # a client, platform or person can send it again.
        log.warning("%s %s: the store is unavailable (%r)", request.method, request.url.path, exc)
        return JSONResponse(
            {"detail": "the store is unavailable; send it again shortly"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    async def store_unavailable_handler(request: Request, exc: Exception) -> Response:
        return store_unavailable(request, exc)

    api.add_exception_handler(DBAPIError, store_unavailable_handler)
    api.add_exception_handler(OSError, store_unavailable_handler)

    async def invalid_request(request: Request, exc: Exception) -> Response:
        # FastAPI's own handler echoes the input as UTF-8 and fails (a 500) on a lone
        # surrogate, which JSON can carry as "\udfff"; ASCII JSON escapes it instead.
        assert isinstance(exc, RequestValidationError)
        detail = json.dumps({"detail": jsonable_encoder(exc.errors())}, ensure_ascii=True)
        return Response(detail, status_code=422, media_type="application/json")

    api.add_exception_handler(RequestValidationError, invalid_request)

    api.include_router(admin_routes(app.store, app.config.admin_token(), app))
    api.include_router(admin_pages(app))
    if app.web is not None:
        api.include_router(app.web.routes())
    if app.slack is not None and app.slack.config.mode() == "http":
        from slack_bolt.adapter.starlette.async_handler import (
            to_async_bolt_request,
            to_starlette_response,
        )

        bolt = app.slack.app

        async def slack_events(request: Request) -> Response:
            # Bolt reads the body before it checks the signature and raises on one that is not
            # UTF-8 or not a JSON object (and, signed, on some fields of the wrong type): a 400.
            try:
                slack_request = to_async_bolt_request(request, await request.body())
                return to_starlette_response(await bolt.async_dispatch(slack_request))
            except (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError):
                return Response("malformed request", status_code=400, media_type="text/plain")
            except (DBAPIError, OSError) as exc:
                return store_unavailable(request, exc)

        hooks["/slack/events"] = slack_events

    if app.telegram is not None and app.telegram.config.mode == "webhook":
        telegram = app.telegram

        async def telegram_webhook(request: Request) -> Response:
            try:
                status, reason = await telegram.webhook(dict(request.headers), await request.body())
            except (DBAPIError, OSError) as exc:
                return store_unavailable(request, exc)
            return Response(reason, status_code=status, media_type="text/plain")

        hooks["/telegram/webhook"] = telegram_webhook

    return BodyLimit(Webhooks(api, hooks), max_bytes=app.config.server.max_body_bytes)


class Webhooks:
    """The platforms' webhooks (POST only), answered ahead of FastAPI; anything else goes to
    `api`. An event is the one request every message makes, and FastAPI's middleware and
    routing cost more CPU than a bare handler does (a Slack event: see README, Performance)."""

    def __init__(self, api: ASGIApp, hooks: dict[str, Callable[[Request], Awaitable[Response]]]):
        self.api = api
        self.hooks = hooks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hook = self.hooks.get(scope["path"]) if scope["type"] == "http" else None
        if hook is None:
            await self.api(scope, receive, send)
            return
        if scope["method"] != "POST":
            response: Response = JSONResponse(
                {"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": "POST"}
            )
        else:
            response = await hook(Request(scope, receive))
        await response(scope, receive, send)
