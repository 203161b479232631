"""Slack through the real `threadbridge serve`: signed events (HTTP) and Socket Mode, against
the fake Slack on loopback, reached only through `[slack] api_base_url`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from adapters.slack.convert import post_args
from adapters.slack.marks import placeholder_mark
from core.model import ThreadRef
from core.store import Store
from tests.e2e.serve import ServeProcess, search
from tests.fakes.slack import (
    APP_TOKEN,
    BOT_TOKEN,
    BOT_USER_ID,
    FakeSlack,
    app_mention,
    assistant_thread_started,
    event_callback,
    fake_slack,
    message,
    sign,
    slash_command,
)
from tests.pg import PostgresServer

pytestmark = pytest.mark.e2e

SECRET = "signing-secret-for-tests"
MENTION = f"<@{BOT_USER_ID}>"
BOT_AUTH = {"Authorization": f"Bearer {BOT_TOKEN}"}


def config_text(
    tmp_path: Path, api: str, extra: str = "", store: str = "", working_after_s: float = 0
) -> str:
    return f"""
default_agent = "demo"

[store]
url = "{store or f"sqlite:///{tmp_path}/tb.db"}"

[bridge]
poll_s = 0.1
working_after_s = {working_after_s}  # 0: these tests see the working signal at once

[agents.demo]
service = "local"

[agents.other]
service = "local"

[slack]
api_base_url = "{api}"
admins = ["U0002"]
{extra}
"""


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with fake_slack() as fake:
        yield fake


def start(
    tmp_path: Path,
    slack: FakeSlack,
    *,
    socket: bool = False,
    extra: str = "",
    working_after_s: float = 0,
) -> ServeProcess:
    env = {"SLACK_BOT_TOKEN": BOT_TOKEN}
    env["SLACK_APP_TOKEN" if socket else "SLACK_SIGNING_SECRET"] = APP_TOKEN if socket else SECRET
    text = config_text(tmp_path, slack.base_url, extra, working_after_s=working_after_s)
    process = ServeProcess(tmp_path, text, env=env)
    process.start()
    return process


@pytest.fixture
def serve(tmp_path: Path, slack: FakeSlack) -> Iterator[ServeProcess]:
    process = start(tmp_path, slack)
    try:
        yield process
    finally:
        process.stop()


def deliver(
    serve: ServeProcess,
    event: dict[str, Any],
    *,
    event_id: str | None = None,
    retry: int | None = None,
    secret: str = SECRET,
) -> httpx.Response:
    """POST an event to /slack/events as Slack does: signed, maybe marked as a retry."""
    body = json.dumps(event_callback(event, event_id=event_id)).encode()
    headers = {"Content-Type": "application/json", **sign(body, secret)}
    if retry is not None:
        headers.update({"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"})
    return httpx.post(f"{serve.url}/slack/events", content=body, headers=headers, timeout=10)


def command(serve: ServeProcess, text: str, user: str = "U0001", channel: str = "C0001") -> str:
    body = urlencode(slash_command(text=text, user_id=user, channel_id=channel)).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded", **sign(body, SECRET)}
    response = httpx.post(f"{serve.url}/slack/events", content=body, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.text


def wait_texts(
    slack: FakeSlack, channel: str, thread_ts: str, count: int, timeout: float = 20.0
) -> list[str]:
    """The bot's messages in a thread, once there are `count` that are not the placeholder."""
    deadline = time.monotonic() + timeout
    while True:
        texts = [t for t in slack.texts(channel, thread_ts) if "is thinking" not in t]
        if len(texts) >= count:
            return texts
        if time.monotonic() > deadline:
            raise AssertionError(f"{thread_ts}: {slack.texts(channel)}")
        time.sleep(0.05)


def test_a_mention_is_answered_in_its_thread_and_the_thread_continues(
    serve: ServeProcess, slack: FakeSlack
) -> None:
    root = app_mention(f"{MENTION} what is a pension?")
    assert deliver(serve, root).status_code == 200
    [answer] = wait_texts(slack, "C0001", root["ts"], 1)
    assert "what is a pension?" in answer
    assert BOT_USER_ID not in answer  # the mention is not sent to the agent

    follow = message("and at what age?", thread_ts=root["ts"])
    deliver(serve, follow)
    texts = wait_texts(slack, "C0001", root["ts"], 2)
    assert "and at what age?" in texts[1]

    [found] = search(serve, "--source", "slack")
    assert found["data"]["team_id"] == "T0001"
    assert found["data"]["channel_id"] == "C0001"
    assert found["data"]["channel_name"] == "general"
    assert found["data"]["thread_ts"] == root["ts"]
    assert found["data"]["user_id"] == "U0001"
    assert found["data"]["user_name"]
    assert found["data"]["permalink"].startswith("https://")


def test_messages_in_threads_the_bot_is_not_in_are_ignored(
    serve: ServeProcess, slack: FakeSlack
) -> None:
    deliver(serve, message("just chatting"))
    deliver(serve, message("a reply elsewhere", thread_ts="1700000000.000100"))
    root = app_mention(f"{MENTION} hello")
    deliver(serve, root)
    wait_texts(slack, "C0001", root["ts"], 1)
    assert len(search(serve, "--source", "slack")) == 1
    assert slack.calls_to("chat.postMessage")[0].params["thread_ts"] == root["ts"]


def test_a_mention_inside_an_existing_thread_links_that_thread(
    serve: ServeProcess, slack: FakeSlack
) -> None:
    starter = message("our pension question, anyone?")
    deliver(serve, starter)
    mention = app_mention(f"{MENTION} can you help?", thread_ts=starter["ts"])
    deliver(serve, mention)
    wait_texts(slack, "C0001", starter["ts"], 1)
    deliver(serve, message("thanks, and taxes?", thread_ts=starter["ts"]))
    texts = wait_texts(slack, "C0001", starter["ts"], 2)
    assert "taxes" in texts[1]
    [found] = search(serve, "--source", "slack")
    assert found["data"]["thread_ts"] == starter["ts"]


def test_redeliveries_and_double_events_get_one_answer(
    serve: ServeProcess, slack: FakeSlack
) -> None:
    root = app_mention(f"{MENTION} once please")
    as_message = message(root["text"], ts=root["ts"])
    deliver(serve, root, event_id="Ev1")
    deliver(serve, root, event_id="Ev1", retry=1)
    deliver(serve, root, event_id="Ev1", retry=2)
    deliver(serve, as_message, event_id="Ev2")  # the same mention as message.channels
    wait_texts(slack, "C0001", root["ts"], 1)
    time.sleep(1.0)  # anything doubled would have been posted by now
    assert len(wait_texts(slack, "C0001", root["ts"], 1)) == 1


def test_two_instances_on_one_database_answer_once(
    tmp_path: Path, slack: FakeSlack, postgres: PostgresServer
) -> None:
    store = postgres.database()
    env = {"SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SECRET}
    instances = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        process = ServeProcess(workdir, config_text(workdir, slack.base_url, store=store), env=env)
        instances.append(process)
    try:
        for process in instances:
            process.start()
        a, b = instances
        roots = [app_mention(f"{MENTION} both of you, {i}") for i in range(5)]
        for i, root in enumerate(roots):
            deliver(a, root, event_id=f"Ev{i}")
            deliver(b, root, event_id=f"Ev{i}", retry=1)  # Slack's retry reached the other one
            deliver(b, message(root["text"], ts=root["ts"]), event_id=f"EvM{i}")
        for root in roots:
            wait_texts(slack, "C0001", root["ts"], 1)
        time.sleep(1.0)
        for root in roots:
            assert len(wait_texts(slack, "C0001", root["ts"], 1)) == 1
        assert not [t for t in slack.texts("C0001") if "is thinking" in t]  # none left behind
    finally:
        for process in instances:
            process.stop()


def test_own_and_other_bots_messages_and_edits_are_ignored(
    serve: ServeProcess, slack: FakeSlack
) -> None:
    root = app_mention(f"{MENTION} start")
    deliver(serve, root)
    wait_texts(slack, "C0001", root["ts"], 1)
    ignored = [
        message("from me", user=BOT_USER_ID, thread_ts=root["ts"], bot_id="BBOT"),
        message("another bot", user="U0009", thread_ts=root["ts"], bot_id="B0009"),
        message("edited", thread_ts=root["ts"], subtype="message_changed"),
        message("", thread_ts=root["ts"], subtype="message_deleted"),
        message("joined", subtype="channel_join"),
    ]
    for event in ignored:
        assert deliver(serve, event).status_code == 200
    time.sleep(1.0)
    assert len(wait_texts(slack, "C0001", root["ts"], 1)) == 1


def test_slow_lookups_do_not_hold_up_the_acknowledgement(
    serve: ServeProcess, slack: FakeSlack
) -> None:
    for method in ("users.info", "conversations.info", "chat.getPermalink"):
        slack.slow(method, 5)
    root = app_mention(f"{MENTION} quick ack please")
    started = time.monotonic()
    assert deliver(serve, root).status_code == 200
    assert time.monotonic() - started < 3  # Slack redelivers what is not acked within 3 s
    wait_texts(slack, "C0001", root["ts"], 1)
    [found] = search(serve, "--source", "slack")
    assert found["data"]["channel_id"] == "C0001"  # the facts we had, without the slow ones


def test_bad_or_stale_signatures_are_refused(serve: ServeProcess, slack: FakeSlack) -> None:
    event = app_mention(f"{MENTION} sneaky")
    assert deliver(serve, event, secret="wrong").status_code == 401
    body = json.dumps(event_callback(event)).encode()
    stale = sign(body, SECRET, timestamp=int(time.time()) - 3600)
    response = httpx.post(
        f"{serve.url}/slack/events",
        content=body,
        headers={"Content-Type": "application/json", **stale},
        timeout=10,
    )
    assert response.status_code == 401
    unsigned = httpx.post(f"{serve.url}/slack/events", content=body, timeout=10)
    assert unsigned.status_code == 401
    time.sleep(0.5)
    assert slack.calls_to("chat.postMessage") == []


def test_url_verification_is_answered(serve: ServeProcess) -> None:
    body = json.dumps({"type": "url_verification", "challenge": "abc123", "token": "t"}).encode()
    headers = {"Content-Type": "application/json", **sign(body, SECRET)}
    response = httpx.post(f"{serve.url}/slack/events", content=body, headers=headers, timeout=10)
    assert response.status_code == 200
    assert "abc123" in response.text


def test_a_dm_starts_a_thread_and_replies_continue_it(
    serve: ServeProcess, slack: FakeSlack
) -> None:
    first = message("hi in a DM", channel="D0001", channel_type="im")
    deliver(serve, first)
    [answer] = wait_texts(slack, "D0001", first["ts"], 1)
    assert "hi in a DM" in answer
    deliver(serve, message("more", channel="D0001", channel_type="im", thread_ts=first["ts"]))
    wait_texts(slack, "D0001", first["ts"], 2)
    second = message("a new topic", channel="D0001", channel_type="im")
    deliver(serve, second)
    wait_texts(slack, "D0001", second["ts"], 1)
    assert len(search(serve, "--source", "slack")) == 2


def test_new_in_a_dm_thread_and_agent_new_start_afresh(
    serve: ServeProcess, slack: FakeSlack
) -> None:
    first = message("remember 42", channel="D0001", channel_type="im")
    deliver(serve, first)
    wait_texts(slack, "D0001", first["ts"], 1)
    deliver(serve, message("new", channel="D0001", channel_type="im", thread_ts=first["ts"]))
    texts = wait_texts(slack, "D0001", first["ts"], 2)
    assert "Started afresh" in texts[1]
    deliver(serve, message("again", channel="D0001", channel_type="im", thread_ts=first["ts"]))
    texts = wait_texts(slack, "D0001", first["ts"], 3)
    assert "message 1 of" in texts[2]  # a new conversation: its first message
    assert "DM" in command(serve, "new")  # in a channel it explains
    assert "1 open conversation" in command(serve, "new", channel="D0001")
    statuses = sorted(c["status"] for c in search(serve, "--source", "slack"))
    assert statuses == ["closed", "closed"]


def test_the_assistant_pane_greets_and_shows_status(serve: ServeProcess, slack: FakeSlack) -> None:
    started = assistant_thread_started()
    thread_ts = started["assistant_thread"]["thread_ts"]
    deliver(serve, started)
    [greeting] = wait_texts(slack, "D0001", thread_ts, 1)
    assert "demo" in greeting
    question = message("help me", channel="D0001", channel_type="im", thread_ts=thread_ts)
    question["assistant_thread"] = {"action_token": "x"}
    deliver(serve, question)
    texts = wait_texts(slack, "D0001", thread_ts, 2)
    assert "help me" in texts[1]
    [status, *_] = slack.calls_to("assistant.threads.setStatus")
    assert status.params["thread_ts"] == thread_ts
    assert status.params["status"]


def test_the_placeholder_is_updated_with_the_answer(serve: ServeProcess, slack: FakeSlack) -> None:
    root = app_mention(f"{MENTION} short one")
    deliver(serve, root)
    [answer] = wait_texts(slack, "C0001", root["ts"], 1)
    placeholder = slack.calls_to("chat.postMessage")[0]
    assert "thinking" in placeholder.params["text"]
    [update] = slack.calls_to("chat.update")
    assert update.params["ts"] == placeholder.response["ts"]
    assert "short one" in answer
    assert placeholder.params["metadata"]["event_type"] == "threadbridge_placeholder"
    assert update.params["metadata"]["event_type"] == "threadbridge_reply"
    assert not slack.calls_to("conversations.replies")  # a first attempt reads nothing


def test_a_quick_answer_is_posted_without_a_placeholder(tmp_path: Path, slack: FakeSlack) -> None:
    """With `working_after_s` (0.5 s by default) a quick answer is one message, not a
    placeholder that flashes "thinking" and is edited a moment later."""
    process = start(tmp_path, slack, working_after_s=5)
    try:
        root = app_mention(f"{MENTION} quick one")
        deliver(process, root)
        [answer] = wait_texts(slack, "C0001", root["ts"], 1)
        assert "quick one" in answer
        assert len(slack.calls_to("chat.postMessage")) == 1
        assert not slack.calls_to("chat.update")
    finally:
        process.stop()


def test_a_long_answer_is_split_in_order_without_breaking_code(
    serve: ServeProcess, slack: FakeSlack
) -> None:
    body = long_question()
    assert len(body) > 10_000
    root = app_mention(f"{MENTION} {body}")
    deliver(serve, root)
    deadline = time.monotonic() + 20
    while not slack.calls_to("chat.delete") and time.monotonic() < deadline:
        time.sleep(0.05)
    texts = wait_texts(slack, "C0001", root["ts"], 4)
    time.sleep(0.5)
    texts = wait_texts(slack, "C0001", root["ts"], 4)
    assert all(len(t) <= 3000 for t in texts)
    assert all(t.count("```") % 2 == 0 for t in texts)
    joined = "".join(texts)
    positions = [joined.find(f"Part {i}:") for i in range(20)]
    assert all(p >= 0 for p in positions)
    assert positions == sorted(positions)
    assert [c.params["ts"] for c in slack.calls_to("chat.delete")]  # the placeholder went


def long_question(parts: int = 20) -> str:
    body = "\n\n".join(
        f"Part {i}: " + "words " * 60 + f"\n```python\nprint({i})\n" + "x = 1\n" * 30 + "```"
        for i in range(parts)
    )
    return body + "\n\nThe end."  # the demo agent quotes the message: keep the last fence clean


def test_a_split_answer_that_fails_midway_resumes_without_repeating(
    serve: ServeProcess, slack: FakeSlack
) -> None:
    # The placeholder and two parts go out, the third part fails, the retry posts the rest.
    slack.fail("chat.postMessage", times=1, status=500, after=3)
    root = app_mention(f"{MENTION} {long_question()}")
    deliver(serve, root)
    texts = wait_texts(slack, "C0001", root["ts"], 4, timeout=30)
    time.sleep(1.0)
    texts = wait_texts(slack, "C0001", root["ts"], 4)
    assert sum(c.status == 500 for c in slack.calls_to("chat.postMessage")) == 1
    joined = "".join(texts)
    for i in range(20):
        assert joined.count(f"Part {i}:") == 1, i
    assert texts[0].startswith("You said")


def test_a_part_that_landed_though_slack_answered_an_error_is_not_posted_again(
    serve: ServeProcess, slack: FakeSlack
) -> None:
    # The third part reaches Slack but its answer is a 500 (as when a crash cuts the post off
    # before it is recorded): the retry reads the thread and finds it by its metadata.
    slack.fail("chat.postMessage", times=1, status=500, after=3, landed=True)
    root = app_mention(f"{MENTION} {long_question()}")
    deliver(serve, root)
    texts = wait_texts(slack, "C0001", root["ts"], 4, timeout=30)
    time.sleep(1.0)
    texts = wait_texts(slack, "C0001", root["ts"], 4)
    joined = "".join(texts)
    for i in range(20):
        assert joined.count(f"Part {i}:") == 1, i
    [read] = slack.calls_to("conversations.replies")
    assert read.params["include_all_metadata"] in ("1", "true")
    marks = [m["metadata"]["event_payload"] for m in slack.posted("C0001", root["ts"])]
    assert [m["part"] for m in marks] == list(range(len(texts)))
    assert len({m["item"] for m in marks}) == 1


def test_a_placeholder_a_crash_left_unrecorded_gets_the_answer(
    tmp_path: Path, serve: ServeProcess, slack: FakeSlack
) -> None:
    # As a kill between "posting a placeholder" and "its ts" leaves it: a note without a ts in
    # the store, and in Slack a marked placeholder (with an older one a crash left before).
    root = app_mention(f"{MENTION} after a crash")
    thread = ThreadRef("slack", "T0001", "C0001", root["ts"])
    posted = []
    for _ in range(2):
        args = post_args(thread, "_is thinking…_", placeholder_mark(thread))
        answer = httpx.post(f"{slack.base_url}chat.postMessage", json=args, headers=BOT_AUTH)
        posted.append(answer.json()["ts"])
    asyncio.run(note_draft(f"sqlite+aiosqlite:///{tmp_path}/tb.db", thread.key))
    deliver(serve, root)
    [text] = wait_texts(slack, "C0001", root["ts"], 1, timeout=30)
    time.sleep(0.5)
    assert "after a crash" in text
    assert [m["ts"] for m in slack.posted("C0001", root["ts"])] == [posted[1]]
    assert len(slack.calls_to("chat.postMessage")) == 2  # the test's two: the bot posted none


async def note_draft(store_url: str, thread_key: str) -> None:
    store = Store(store_url)
    try:
        assert await store.keep_draft(thread_key, "")
    finally:
        await store.close()


def test_a_429_storm_delivers_every_reply(serve: ServeProcess, slack: FakeSlack) -> None:
    slack.fail("chat.postMessage", times=12, status=429, retry_after=1)
    roots = [app_mention(f"{MENTION} question {i}") for i in range(5)]
    for root in roots:
        deliver(serve, root)
    for i, root in enumerate(roots):
        texts = wait_texts(slack, "C0001", root["ts"], 1, timeout=60)
        assert f"question {i}" in texts[0]
    assert sum(c.status == 429 for c in slack.calls_to("chat.postMessage")) == 12


def test_the_agent_command_shows_and_sets_the_route(serve: ServeProcess, slack: FakeSlack) -> None:
    assert "demo" in command(serve, "")
    refused = command(serve, "other", user="U0001")
    assert "admin" in refused
    assert "no agent" in command(serve, "nosuch", user="U0002")
    assert "other" in command(serve, "other", user="U0002")
    assert "other" in command(serve, "")
    root = app_mention(f"{MENTION} who answers?")
    deliver(serve, root)
    wait_texts(slack, "C0001", root["ts"], 1)
    [found] = search(serve, "--source", "slack")
    assert found["agent"] == "other"


def test_channels_outside_the_allowlist_are_ignored(tmp_path: Path, slack: FakeSlack) -> None:
    slack.add_channel("C0002", "random")
    process = start(tmp_path, slack, extra='channels = ["C0001"]')
    try:
        outside = app_mention(f"{MENTION} hello?", channel="C0002")
        assert deliver(process, outside).status_code == 200
        inside = app_mention(f"{MENTION} hello!")
        deliver(process, inside)
        wait_texts(slack, "C0001", inside["ts"], 1)
        assert slack.texts("C0002") == []
        assert "not in [slack] channels" in process.log()
    finally:
        process.stop()


def test_a_file_only_message_is_sent_as_metadata_and_the_user_told(
    serve: ServeProcess, slack: FakeSlack
) -> None:
    files = [{"id": "F1", "name": "report.pdf", "url_private": "https://files.slack.com/r.pdf"}]
    root = app_mention(f"{MENTION}")
    root["files"] = files
    deliver(serve, root)
    texts = wait_texts(slack, "C0001", root["ts"], 2)
    assert any("report.pdf" in t for t in texts)
    assert any("reads text only" in t for t in texts)


def test_socket_mode_answers_and_survives_a_reconnect(tmp_path: Path, slack: FakeSlack) -> None:
    import asyncio

    process = start(tmp_path, slack, socket=True)
    try:
        assert "Socket Mode" in process.log()

        async def drive() -> None:
            await slack.wait_connections(1, timeout=10)
            root = app_mention(f"{MENTION} over the socket")
            envelope = await slack.socket_send("events_api", event_callback(root))
            await slack.wait_ack(envelope)
            await asyncio.to_thread(wait_texts, slack, "C0001", root["ts"], 1)
            await slack.socket_disconnect()
            await slack.wait_connections(2, timeout=15)
            again = app_mention(f"{MENTION} after reconnect")
            envelope = await slack.socket_send("events_api", event_callback(again), timeout=15)
            await slack.wait_ack(envelope)
            await asyncio.to_thread(wait_texts, slack, "C0001", again["ts"], 1)
            reply = await slack.socket_send("slash_commands", slash_command(text=""))
            ack = await slack.wait_ack(reply)
            assert "demo" in json.dumps(ack.payload)

        asyncio.run(drive())
    finally:
        process.stop()


def test_slack_without_secrets_stays_off_and_says_why(tmp_path: Path, slack: FakeSlack) -> None:
    process = ServeProcess(tmp_path, config_text(tmp_path, slack.base_url))
    process.env.pop("SLACK_BOT_TOKEN", None)
    try:
        process.start()
        assert "SLACK_BOT_TOKEN is not set" in process.log()
        body = json.dumps({"type": "url_verification", "challenge": "x"}).encode()
        response = httpx.post(f"{process.url}/slack/events", content=body, timeout=10)
        assert response.status_code == 404
    finally:
        process.stop()


def test_a_refused_bot_token_stops_the_start_with_the_fix(tmp_path: Path, slack: FakeSlack) -> None:
    env = {"SLACK_BOT_TOKEN": "xoxb-wrong", "SLACK_SIGNING_SECRET": SECRET}
    process = ServeProcess(tmp_path, config_text(tmp_path, slack.base_url), env=env)
    try:
        with pytest.raises(RuntimeError, match="serve exited 1"):
            process.start()
        log = process.log()
        assert "refused the bot token in SLACK_BOT_TOKEN (invalid_auth)" in log
        assert "fix: " in log
        assert "Traceback" not in log
        assert "xoxb-wrong" not in log
    finally:
        process.stop()
