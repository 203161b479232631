"""The one ASGI app: web chat, admin API, health."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

from bots.admin.api import admin_routes
from bots.app import App
from core.errors import ThreadbridgeError


def create_app(app: App) -> FastAPI:
    """The FastAPI app for `app`; its lifespan starts and stops everything."""

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

    @api.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        return app.health()

    api.include_router(admin_routes(app.store, app.config.admin_token()))
    if app.web is not None:
        api.include_router(app.web.routes())
    if app.slack is not None and app.slack.config.mode() == "http":
        from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler

        slack = AsyncSlackRequestHandler(app.slack.app)

        @api.post("/slack/events", include_in_schema=False)
        async def slack_events(request: Request) -> Response:
            return await slack.handle(request)

    if app.telegram is not None and app.telegram.config.mode == "webhook":
        telegram = app.telegram

        @api.post("/telegram/webhook", include_in_schema=False)
        async def telegram_webhook(request: Request) -> Response:
            status, reason = await telegram.webhook(dict(request.headers), await request.body())
            return Response(reason, status_code=status, media_type="text/plain")

    return api
