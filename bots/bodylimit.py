"""An ASGI middleware that refuses a request body over `[server] max_body_bytes` with a 413.

A declared Content-Length over the limit is refused before anything is read. Any other body
(chunked, or one whose Content-Length the server's framing ignores) is read here first, counted
as it arrives, and refused as soon as the count passes the limit; a body within the limit is
then handed to the app as it came. So no endpoint, whether it reads its body or not, ever gets
more than the limit, and nothing is written for a refused request. uvicorn reads and drops the
rest of a refused body, which keeps the connection usable.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """Answer 413 to any HTTP request whose body is longer than `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send)
            return
        read = await _read_body(receive, self.max_bytes)
        if read is None:
            await self._refuse(send)
            return
        await self.app(scope, _replay(read, receive), send)

    async def _refuse(self, send: Send) -> None:
        detail = f"the request body is larger than the limit of {self.max_bytes:,} bytes"
        body = json.dumps({"detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive, limit: int) -> list[Message] | None:
    """The request's messages up to the end of its body; None once it passes `limit` bytes."""
    messages: list[Message] = []
    seen = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages  # the client went away: the app sees that as it would have
        seen += len(message.get("body", b""))
        if seen > limit:
            return None
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives `messages` first, then whatever the server has next."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed one itself
    return None
