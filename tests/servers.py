"""Run real ASGI apps on 127.0.0.1, port 0, in a background thread, for tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from uvicorn.config import WSProtocolType


@contextmanager
def run_asgi(app: Any, ws: WSProtocolType = "none") -> Iterator[str]:
    """Serve `app` on a free loopback port; yield its base URL (no trailing slash).

    WebSockets are off unless `ws` names one of uvicorn's implementations ("wsproto", ...).
    """
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", ws=ws
    )
    server = uvicorn.Server(config)
    loop = asyncio.new_event_loop()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve())

    thread = threading.Thread(target=run, name="test-asgi", daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        if not thread.is_alive():
            raise RuntimeError("test server failed to start")
        threading.Event().wait(0.01)
    else:
        raise RuntimeError("test server did not start within 5s")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        loop.close()
