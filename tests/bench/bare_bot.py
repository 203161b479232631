"""A bare slack-bolt bot, the baseline of the Slack benchmark: no store, nothing durable.

`python -m tests.bench.bare_bot --slack-api URL --agent URL` serves `/slack/events` with
uvicorn and prints `serving on http://127.0.0.1:PORT`. Each `app_mention` is acknowledged by
Bolt, then answered: the conversation of its thread (a dict in memory) goes to an
OpenAI-compatible `/chat/completions`, and the answer is posted in the thread with
`chat.postMessage`. Secrets come from SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import uvicorn
from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def build(slack_api: str, agent_url: str, model: str) -> Starlette:
    token = os.environ["SLACK_BOT_TOKEN"]
    # One aiohttp session each for Slack and the agent, made on the server's loop at start-up
    # (slack_sdk without a session opens a new one, and a new connection, per call).
    client = AsyncWebClient(token=token, base_url=slack_api)
    bolt = AsyncApp(client=client, signing_secret=os.environ["SLACK_SIGNING_SECRET"])
    sessions: dict[str, aiohttp.ClientSession] = {}
    conversations: dict[str, list[dict[str, Any]]] = {}

    @bolt.event("app_mention")
    async def mention(event: dict[str, Any], client: AsyncWebClient) -> None:
        thread = event.get("thread_ts") or event["ts"]
        history = conversations.setdefault(thread, [])
        history.append({"role": "user", "content": event.get("text", "")})
        async with sessions["agent"].post(
            f"{agent_url}/chat/completions",
            json={"model": model, "messages": history},
            headers={"Authorization": "Bearer bench"},
        ) as answer:
            answer.raise_for_status()
            text = (await answer.json())["choices"][0]["message"]["content"] or "…"
        history.append({"role": "assistant", "content": text})
        await client.chat_postMessage(channel=event["channel"], thread_ts=thread, text=text)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        unlimited = {"limit": 0, "limit_per_host": 0}
        sessions["agent"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(**unlimited))
        sessions["slack"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(**unlimited))
        client.session = sessions["slack"]
        yield
        for session in sessions.values():
            await session.close()

    handler = AsyncSlackRequestHandler(bolt)

    async def events(request: Request) -> Response:
        return await handler.handle(request)

    async def healthz(request: Request) -> Response:
        return Response("ok")

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/slack/events", events, methods=["POST"]),
            Route("/healthz", healthz),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slack-api", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    print(f"serving on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    app = build(args.slack_api, args.agent, args.model)
    # uvicorn's defaults (access log on), as `threadbridge serve` runs at its default INFO.
    config = uvicorn.Config(app, log_level="info", backlog=4096)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
