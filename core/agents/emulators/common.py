"""What every emulator shares: raw-body parsing, injected faults and a log of requests received.

`EmulatorControls.install(app)` adds an ASGI middleware that records each request to the emulated
service and applies the next matching fault, plus the test-only routes under `/_emulator/`:

    POST /_emulator/faults    {"status", "times", "retry_after", "delay_s", "path_contains"}
    GET  /_emulator/requests  [{"method", "path", "query", "json"}, ...]  (never header values)
    POST /_emulator/reset     clears faults, the log, and the emulator's data (`on_reset`)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.jsonbody import BodyInvalid, validate_json

CONTROL_PREFIX = "/_emulator"

ModelT = TypeVar("ModelT", bound=BaseModel)
ErrorBody = Callable[[int, str], Any]


def detail_body(status: int, message: str) -> Any:
    """The FastAPI-style error body most services answer: `{"detail": message}`."""
    return {"detail": message}


async def parse_body(request: Request, model: type[ModelT]) -> ModelT:
    """Validate a JSON body whatever its Content-Type (some SDKs send none); 422 when invalid.

    FastAPI's own body parsing rejects JSON without `Content-Type: application/json`, so the
    emulators read the raw bytes and raise the same `RequestValidationError` FastAPI would.
    """
    try:
        return validate_json(await request.body(), model)
    except BodyInvalid as exc:
        raise RequestValidationError(exc.errors) from None


class Fault(BaseModel):
    """Answer the next `times` matching requests with `status`, or delay them by `delay_s`."""

    model_config = ConfigDict(extra="forbid")

    status: int = Field(default=0, ge=0, le=599, description="0: answer normally (after delay_s)")
    times: int = Field(default=1, ge=1)
    retry_after: float | None = Field(default=None, ge=0)
    delay_s: float | None = Field(default=None, ge=0)
    path_contains: str | None = None

    @model_validator(mode="after")
    def _does_something(self) -> Fault:
        if self.status == 0 and self.delay_s is None:
            raise ValueError("give a status (400-599) or a delay_s")
        if 0 < self.status < 400:
            raise ValueError("status must be an error status (400-599), or 0 with delay_s")
        return self

    def matches(self, path: str) -> bool:
        return self.path_contains is None or self.path_contains in path


class EmulatorControls:
    """Faults to inject and the requests seen so far, for one emulator app."""

    def __init__(
        self,
        *,
        on_reset: Callable[[], None] | None = None,
        error_body: ErrorBody = detail_body,
    ) -> None:
        self.faults: list[Fault] = []
        self.requests: list[dict[str, Any]] = []
        self._on_reset = on_reset
        self._error_body = error_body

    def install(self, app: FastAPI) -> None:
        """Add the recording/fault middleware and the `/_emulator/` routes to `app`."""
        app.include_router(self._router())
        app.add_middleware(_ControlsMiddleware, controls=self)
        app.state.emulator_controls = self

    def reset(self) -> None:
        self.faults.clear()
        self.requests.clear()
        if self._on_reset is not None:
            self._on_reset()

    def record(self, scope: Scope, body: bytes) -> None:
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            decoded: Any = json.loads(body) if body.strip() else None
        except ValueError:
            decoded = None
        self.requests.append(
            {
                "method": scope["method"],
                "path": scope["path"],
                "query": dict(parse_qsl(query, keep_blank_values=True)),
                "json": decoded,
            }
        )

    def take_fault(self, path: str) -> Fault | None:
        """The first fault that matches `path`, with one use spent."""
        for fault in self.faults:
            if fault.matches(path):
                fault.times -= 1
                if fault.times == 0:
                    self.faults.remove(fault)
                return fault
        return None

    def error_response(self, fault: Fault) -> JSONResponse:
        headers = {}
        if fault.retry_after is not None:
            # Fractions are not RFC 9110, but keep tests fast; integers print as integers.
            headers["Retry-After"] = f"{fault.retry_after:g}"
        body = self._error_body(fault.status, f"emulated fault: HTTP {fault.status}")
        return JSONResponse(body, status_code=fault.status, headers=headers)

    def _router(self) -> APIRouter:
        router = APIRouter(prefix=CONTROL_PREFIX, include_in_schema=False)

        @router.post("/faults")
        async def add_fault(request: Request) -> dict[str, Any]:
            fault = await parse_body(request, Fault)
            self.faults.append(fault)
            return fault.model_dump()

        @router.get("/requests")
        async def list_requests() -> list[dict[str, Any]]:
            return self.requests

        @router.post("/reset")
        async def reset() -> dict[str, bool]:
            self.reset()
            return {"ok": True}

        return router


class _ControlsMiddleware:
    """Records each request to the emulated service, then applies the next matching fault."""

    def __init__(self, app: ASGIApp, controls: EmulatorControls) -> None:
        self.app = app
        self.controls = controls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(CONTROL_PREFIX):
            await self.app(scope, receive, send)
            return
        body, disconnected = await _read_body(receive)
        if disconnected:
            return
        self.controls.record(scope, body)
        fault = self.controls.take_fault(scope["path"])
        if fault is not None:
            if fault.status:
                await self.controls.error_response(fault)(scope, receive, send)
                return
            # Sleep, but stop as soon as the client gives up, so servers shut down promptly.
            if fault.delay_s and await _disconnects_within(receive, fault.delay_s):
                return
        await self.app(scope, _replay(body, receive), send)


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


async def _disconnects_within(receive: Receive, seconds: float) -> bool:
    async def wait_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(wait_disconnect(), seconds)
    except TimeoutError:
        return False
    return True


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
