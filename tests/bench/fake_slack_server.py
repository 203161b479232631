"""The fake Slack (`tests/fakes/slack.py`) in its own process, for the Slack benchmarks.

`python -m tests.bench.fake_slack_server` prints `serving on http://127.0.0.1:PORT` and serves
the fake's Web API, plus two routes for the load generator:

- `GET /_bench/answers`: `{"answers": {token: unix_time}}`, when the fake received each answer:
  a `chat.postMessage` or `chat.update` whose text carries `bench-RUN-N` and is not a placeholder.
- `POST /_bench/reset`: forget the answers and everything the fake recorded (memory stays flat
  over many runs).
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import time
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.slack import FakeSlack

TOKEN = re.compile(r"bench-\d+-\d+")


class BenchSlack(FakeSlack):
    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, float] = {}
        self.app.router.routes.insert(0, Route("/_bench/answers", self._answers_route))
        self.app.router.routes.insert(0, Route("/_bench/reset", self._reset, methods=["POST"]))

    def _note(self, params: dict[str, Any]) -> None:
        text = str(params.get("text") or "")
        if "received:" in text:  # the agent's answer, not the placeholder
            found = TOKEN.search(text)
            if found:
                self.answers.setdefault(found.group(0), time.time())

    def _post_message(self, params: dict[str, Any]) -> dict[str, Any]:
        out = super()._post_message(params)
        self._note(params)
        return out

    def _update(self, params: dict[str, Any]) -> dict[str, Any]:
        out = super()._update(params)
        self._note(params)
        return out

    async def _answers_route(self, request: Request) -> JSONResponse:
        return JSONResponse({"answers": dict(self.answers)})

    async def _reset(self, request: Request) -> JSONResponse:
        with self._lock:
            self.answers.clear()
            self._calls.clear()
            self._messages.clear()
        return JSONResponse({"ok": True})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    fake = BenchSlack()
    fake.root = f"http://127.0.0.1:{sock.getsockname()[1]}"
    print(f"serving on {fake.root}", flush=True)
    sys.stdout.flush()
    config = uvicorn.Config(
        fake.app, log_level="warning", access_log=False, lifespan="on", backlog=4096
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
