"""The fake Slack, proven against the real SDKs: slack_sdk's Web API client and bolt."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlencode

import pytest
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from tests.fakes import slack as payloads
from tests.fakes.slack import PAYLOADS, WS_IMPL, FakeSlack, fake_slack, load_payload, sign

SECRET = "signing-secret"
SocketApp = tuple[AsyncApp, AsyncSocketModeHandler]


@pytest.fixture
def fake() -> Iterator[FakeSlack]:
    with fake_slack() as started:
        yield started


@pytest.fixture
def client(fake: FakeSlack) -> AsyncWebClient:
    return AsyncWebClient(token="xoxb-test", base_url=fake.base_url)


# -- Web API ----------------------------------------------------------------------------------


async def test_web_api_calls_are_answered_and_recorded(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    auth = await client.auth_test()
    assert (auth["team_id"], auth["user_id"], auth["bot_id"]) == ("T0001", "UBOT", "BBOT")

    root = await client.chat_postMessage(channel="C0001", text="root")
    reply = await client.chat_postMessage(
        channel="C0001", text="*hi*", thread_ts=root["ts"], mrkdwn=True, unfurl_links=False
    )
    assert float(reply["ts"]) > float(root["ts"])
    assert reply["message"]["thread_ts"] == root["ts"]
    assert reply["message"]["bot_id"] == "BBOT"

    updated = await client.chat_update(channel="C0001", ts=reply["ts"], text="*bye*")
    assert updated["text"] == "*bye*"
    assert fake.texts("C0001") == ["root", "*bye*"]
    assert [m["ts"] for m in fake.posted(thread_ts=root["ts"])] == [reply["ts"]]
    assert fake.posted(thread_ts=root["ts"])[0]["unfurl_links"] is False

    user = (await client.users_info(user="U0001"))["user"]
    assert (user["name"], user["real_name"], user["profile"]["display_name"]) == (
        "alice",
        "Alice Example",
        "alice",
    )
    im = (await client.conversations_info(channel="D0001"))["channel"]
    assert im["is_im"] is True
    link = await client.chat_getPermalink(channel="C0001", message_ts=root["ts"])
    assert link["permalink"].startswith("https://fake.slack.test/archives/C0001/p")
    await client.chat_delete(channel="C0001", ts=root["ts"])
    assert fake.texts("C0001") == ["*bye*"]

    # What the SDK sends: chat.* as JSON, users.info as a GET query, auth.test as an empty POST.
    post = fake.calls_to("chat.postMessage")[1]
    assert post.headers["content-type"].startswith("application/json")
    assert post.params["thread_ts"] == root["ts"]
    assert post.token == "xoxb-test"
    assert "authorization" not in post.headers
    info = fake.calls_to("users.info")[0]
    assert (info.http_verb, info.params) == ("GET", {"user": "U0001"})
    assert fake.calls_to("auth.test")[0].http_verb == "POST"
    assert [c.status for c in fake.calls] == [200] * len(fake.calls)


async def test_form_bodies_are_parsed(fake: FakeSlack, client: AsyncWebClient) -> None:
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*x*"}}]
    await client.api_call(
        "chat.postMessage", data={"channel": "C0001", "text": "x", "blocks": json.dumps(blocks)}
    )
    call = fake.calls_to("chat.postMessage")[0]
    assert call.headers["content-type"] == "application/x-www-form-urlencoded"
    assert fake.posted()[0]["blocks"] == blocks


async def test_rate_limit_is_retried_after_retry_after(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    client.retry_handlers.append(AsyncRateLimitErrorRetryHandler(max_retry_count=2))
    fake.fail("chat.postMessage", 1, status=429, retry_after=1)
    started = time.monotonic()
    response = await client.chat_postMessage(channel="C0001", text="hello")
    assert time.monotonic() - started >= 1.0
    assert response["ok"] is True
    calls = fake.calls_to("chat.postMessage")
    assert [c.status for c in calls] == [429, 200]
    assert calls[0].response == {"ok": False, "error": "ratelimited"}
    assert fake.texts() == ["hello"]


async def test_rate_limit_without_retry_handler_raises(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    fake.fail("chat.postMessage", 1, status=429, retry_after=7)
    with pytest.raises(SlackApiError) as caught:
        await client.chat_postMessage(channel="C0001", text="hello")
    assert caught.value.response.status_code == 429
    assert caught.value.response.headers["Retry-After"] == "7"


async def test_server_error_and_error_injection(fake: FakeSlack, client: AsyncWebClient) -> None:
    fake.fail("chat.postMessage", 1, status=500)
    fake.fail("chat.update", 2, error="channel_not_found")
    with pytest.raises(SlackApiError) as caught:
        await client.chat_postMessage(channel="C0001", text="hello")
    assert caught.value.response.status_code == 500
    ok = await client.chat_postMessage(channel="C0001", text="hello")
    for _ in range(2):
        with pytest.raises(SlackApiError) as caught:
            await client.chat_update(channel="C0001", ts=ok["ts"], text="x")
        assert caught.value.response["error"] == "channel_not_found"
    await client.chat_update(channel="C0001", ts=ok["ts"], text="x")
    assert fake.texts() == ["x"]


async def test_a_landed_failure_posts_and_still_fails(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    fake.fail("chat.postMessage", 1, status=500, landed=True)
    with pytest.raises(SlackApiError):
        await client.chat_postMessage(channel="C0001", text="lost answer")
    assert fake.texts() == ["lost answer"]


async def test_replies_page_through_a_thread_with_metadata_on_request(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    root = await client.chat_postMessage(channel="C0001", text="root")
    mark = {"event_type": "threadbridge_reply", "event_payload": {"item": "7", "part": 0}}
    replies = [
        await client.chat_postMessage(
            channel="C0001", text=f"r{i}", thread_ts=root["ts"], metadata=mark
        )
        for i in range(5)
    ]
    await client.chat_delete(channel="C0001", ts=replies[1]["ts"])
    await client.chat_postMessage(channel="C0001", text="elsewhere", thread_ts="1.000001")

    seen, cursor, pages = [], None, 0
    while True:
        page = await client.conversations_replies(
            channel="C0001", ts=root["ts"], limit=2, cursor=cursor, include_all_metadata=True
        )
        pages += 1
        seen += page["messages"]
        cursor = page["response_metadata"]["next_cursor"]
        assert page["has_more"] is bool(cursor)
        if not cursor:
            break
    assert pages == 3
    assert [m["text"] for m in seen] == ["root", "r0", "r2", "r3", "r4"]
    assert [m.get("metadata") for m in seen[1:]] == [mark] * 4
    assert all(m["bot_id"] == "BBOT" for m in seen)

    plain = await client.conversations_replies(channel="C0001", ts=root["ts"])
    assert len(plain["messages"]) == 5
    assert not any("metadata" in m for m in plain["messages"])
    with pytest.raises(SlackApiError) as caught:
        await client.conversations_replies(channel="C0001", ts=root["ts"], cursor="not base64!")
    assert caught.value.response["error"] == "invalid_cursor"


async def test_bad_missing_and_wrong_kind_of_token(fake: FakeSlack) -> None:
    with pytest.raises(SlackApiError) as caught:
        await AsyncWebClient(token="xoxb-wrong", base_url=fake.base_url).auth_test()
    assert caught.value.response["error"] == "invalid_auth"
    with pytest.raises(SlackApiError) as caught:
        await AsyncWebClient(base_url=fake.base_url).auth_test()
    assert caught.value.response["error"] == "not_authed"
    with pytest.raises(SlackApiError) as caught:
        await AsyncWebClient(token="xapp-test", base_url=fake.base_url).auth_test()
    assert caught.value.response["error"] == "not_allowed_token_type"
    bot = AsyncWebClient(token="xoxb-test", base_url=fake.base_url)
    with pytest.raises(SlackApiError) as caught:
        await bot.apps_connections_open(app_token="xoxb-test")
    assert caught.value.response["error"] == "not_allowed_token_type"
    with pytest.raises(SlackApiError) as caught:
        await bot.api_call("nonexistent.method")
    assert caught.value.response["error"] == "unknown_method"
    opened = await bot.apps_connections_open(app_token="xapp-test")
    assert opened["url"].startswith(fake.root.replace("http", "ws") + "/socket?ticket=")


# -- Socket Mode through bolt -----------------------------------------------------------------


@pytest.fixture
async def socket_app(fake: FakeSlack) -> AsyncIterator[SocketApp]:
    if WS_IMPL == "auto":
        pytest.fail("Socket Mode tests need a WebSocket library for uvicorn: install wsproto")
    app = AsyncApp(client=AsyncWebClient(token="xoxb-test", base_url=fake.base_url))
    # With no web_client= the handler opens the socket through app.client, i.e. the fake.
    handler = AsyncSocketModeHandler(app, "xapp-test")
    try:
        yield app, handler
    finally:
        await handler.close_async()
        await asyncio.sleep(0)  # let the cancelled receive/monitor tasks finish


async def test_socket_mode_delivers_events_and_survives_a_refresh(
    fake: FakeSlack, socket_app: SocketApp
) -> None:
    app, handler = socket_app
    heard: list[str] = []

    @app.event("app_mention")
    async def on_mention(event: dict[str, Any], say: Any) -> None:
        heard.append(event["text"])
        await say(text=f"re: {event['text']}", thread_ts=event.get("thread_ts") or event["ts"])

    await handler.connect_async()
    assert fake.calls_to("apps.connections.open")[0].token == "xapp-test"
    await fake.wait_connections(1)  # the client may return before the server counts it
    assert fake.socket_connections == 1

    mention = payloads.app_mention("<@UBOT> first")
    envelope_id = await fake.socket_send("events_api", payloads.event_callback(mention))
    ack = await fake.wait_ack(envelope_id)
    assert ack.payload is None
    (post,) = await fake.wait_for("chat.postMessage", 1)
    assert post.params["thread_ts"] == mention["ts"]
    assert post.params["channel"] == "C0001"
    assert len(fake.calls_to("auth.test")) == 1

    await fake.socket_disconnect()
    await fake.wait_connections(2)
    assert len(fake.calls_to("apps.connections.open")) == 2

    reply = payloads.app_mention("<@UBOT> second", thread_ts=mention["ts"])
    await fake.wait_ack(await fake.socket_send("events_api", payloads.event_callback(reply)))
    posts = await fake.wait_for("chat.postMessage", 2)
    assert posts[1].params["thread_ts"] == mention["ts"]
    assert heard == ["<@UBOT> first", "<@UBOT> second"]
    assert fake.texts(thread_ts=mention["ts"]) == ["re: <@UBOT> first", "re: <@UBOT> second"]


async def test_socket_mode_slash_command_ack_payload_and_response_url(
    fake: FakeSlack, socket_app: SocketApp
) -> None:
    app, handler = socket_app

    @app.command("/agent")
    async def on_agent(ack: Any, respond: Any) -> None:
        await ack("Starting a new conversation")
        await respond("Done: the next message starts fresh.")

    await handler.connect_async()
    command = fake.slash_command("/agent", "new")
    ack = await fake.wait_ack(await fake.socket_send("slash_commands", command))
    assert ack.payload == {"text": "Starting a new conversation"}
    for _ in range(200):
        if fake.responses:
            break
        await asyncio.sleep(0.01)
    ((response_id, body),) = fake.responses
    assert command["response_url"].endswith(response_id)
    assert body["text"] == "Done: the next message starts fresh."


# -- HTTP mode: signatures and recorded payloads ------------------------------------------------


def test_sign_verifies_with_the_sdk() -> None:
    body = json.dumps(payloads.event_callback(payloads.app_mention("<@UBOT> hi"))).encode()
    headers = sign(body, SECRET)
    verifier = SignatureVerifier(SECRET)
    assert verifier.is_valid_request(body, headers)
    assert not verifier.is_valid_request(body + b" ", headers)
    assert not SignatureVerifier("other").is_valid_request(body, headers)
    stale = sign(body, SECRET, timestamp=int(time.time()) - 600)
    assert not verifier.is_valid_request(body, stale)


EXPECTED = {
    "app_mention": "app_mention",
    "message_in_thread": "message",
    "message_im": "message",
    "message_changed": "message",
    "bot_message": "message",
    "message_with_files": "message",
    "assistant_thread_started": "assistant_thread_started",
    "slash_command_agent": "command",
}


def test_every_payload_file_is_listed() -> None:
    assert sorted(p.stem for p in PAYLOADS.glob("*.json")) == sorted(EXPECTED)


def _built(name: str) -> dict[str, Any]:
    """The builders' version of each recorded payload."""
    thread = payloads.new_ts()
    builders: dict[str, Callable[[], dict[str, Any]]] = {
        "app_mention": lambda: payloads.event_callback(payloads.app_mention("<@UBOT> hi")),
        "message_in_thread": lambda: payloads.event_callback(
            payloads.message("more", thread_ts=thread)
        ),
        "message_im": lambda: payloads.event_callback(
            payloads.message("hi", channel="D0001", channel_type="im")
        ),
        "message_changed": lambda: payloads.event_callback(
            payloads.message("x", subtype="message_changed")
        ),
        "bot_message": lambda: payloads.event_callback(
            payloads.message("beep", bot_id="B0OTHER", subtype="bot_message")
        ),
        "message_with_files": lambda: payloads.event_callback(
            payloads.message("see", files=[{"id": "F1", "name": "a.txt"}])
        ),
        "assistant_thread_started": lambda: payloads.event_callback(
            payloads.assistant_thread_started()
        ),
        "slash_command_agent": lambda: payloads.slash_command("/agent", "new"),
    }
    return builders[name]()


@pytest.mark.parametrize("source", ["file", "builder"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_payloads_route_through_bolt(fake: FakeSlack, name: str, source: str) -> None:
    """Signed as Slack signs them, each payload reaches the bolt listener it is meant for."""
    app = AsyncApp(
        client=AsyncWebClient(token="xoxb-test", base_url=fake.base_url),
        signing_secret=SECRET,
        process_before_response=True,
    )
    heard: list[tuple[str, dict[str, Any]]] = []

    def recorder(kind: str) -> Any:
        async def listener(ack: Any, body: dict[str, Any]) -> None:
            await ack()
            heard.append((kind, body))

        return listener

    for event in ("app_mention", "message", "assistant_thread_started"):
        app.event(event)(recorder(event))
    app.command("/agent")(recorder("command"))

    payload = load_payload(name) if source == "file" else _built(name)
    if name.startswith("slash_command"):
        raw = urlencode(payload).encode()
        content_type = "application/x-www-form-urlencoded"
    else:
        raw = json.dumps(payload).encode()
        content_type = "application/json"
    headers: dict[str, str | Sequence[str]] = {"content-type": content_type, **sign(raw, SECRET)}
    response = await app.async_dispatch(AsyncBoltRequest(body=raw.decode(), headers=headers))

    assert response.status == 200, response.body
    assert [kind for kind, _ in heard] == [EXPECTED[name]]
    assert heard[0][1] == payload
