"""Access rules and per-user limits through the real `threadbridge serve`, against the fake
Telegram Bot API: a denied person is told once and never reaches the agent, a person over the
rate limit gets the limit reply, and a chat outside allow_channels is ignored."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.serve import ServeProcess, command, search
from tests.e2e.test_telegram import BOT, start, text_of, wait_sent
from tests.fakes.telegram import BOB, GROUP_CHAT, SUPERGROUP_CHAT, FakeTelegram, fake_telegram

pytestmark = pytest.mark.e2e

BOB_CHAT = BOB["id"]  # a private chat's id is its person's


LIMITS_AND_RULES = f"""
[limits]
per_user_per_minute = 2

[[routes]]
source = "telegram"
agent = "demo"
deny_users = [{BOB["id"]}]
allow_channels = [{GROUP_CHAT}]
refused_notice = "Sorry Bob, not here."
"""


@pytest.fixture
def tg() -> Iterator[FakeTelegram]:
    with fake_telegram() as fake:
        yield fake


@pytest.fixture
def serve(tmp_path: Path, tg: FakeTelegram) -> Iterator[ServeProcess]:
    # Bob is one of [telegram] admins: not limited, but a route can still deny him.
    process = start(tmp_path, tg, routes=LIMITS_AND_RULES)
    try:
        yield process
    finally:
        process.stop()


def test_a_denied_person_is_told_once_and_the_agent_never_sees_them(
    serve: ServeProcess, tg: FakeTelegram
) -> None:
    tg.queue_update(tg.private_message("let me in", chat_id=BOB_CHAT, user=BOB))
    [notice] = wait_sent(tg, 1, BOB_CHAT)
    assert text_of(notice) == "Sorry Bob, not here."
    tg.queue_update(tg.private_message("please?", chat_id=BOB_CHAT, user=BOB))
    [found] = search(serve, "--source", "telegram")
    deadline = time.monotonic() + 20
    while True:  # kept for the admins, as refused; the conversation has no agent message
        body = serve.api(f"/api/conversations/{found['id']}")
        kinds = [(m["role"], m["kind"]) for m in body["messages"]]
        if len(kinds) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert kinds == [("user", "refused"), ("system", "notice"), ("user", "refused")]
    time.sleep(0.5)
    assert len(tg.sent(BOB_CHAT)) == 1  # told once in the thread, not for every message


def test_over_the_rate_limit_gets_the_limit_reply(serve: ServeProcess, tg: FakeTelegram) -> None:
    for n in range(3):
        tg.queue_update(tg.group_message(f"{BOT} question {n}"))
    sent = wait_sent(tg, 3, GROUP_CHAT)
    answers = [text_of(m) for m in sent]
    assert sum("message 1 of" in a for a in answers) == 2
    [limit] = [a for a in answers if "messages in a minute" in a]
    assert "more than 2 messages in a minute" in limit and "Please wait" in limit


def test_a_chat_outside_allow_channels_is_ignored(serve: ServeProcess, tg: FakeTelegram) -> None:
    tg.queue_update(tg.group_message(f"{BOT} anyone here?", chat_id=SUPERGROUP_CHAT))
    tg.queue_update(tg.group_message(f"{BOT} and here?"))
    wait_sent(tg, 1, GROUP_CHAT)
    time.sleep(0.5)
    assert tg.sent(SUPERGROUP_CHAT) == []
    assert f"ignoring channel -/{SUPERGROUP_CHAT}" in serve.log()
    explained = command(serve, "routes", "explain", f"telegram:-/{SUPERGROUP_CHAT}/1")
    assert "this channel is ignored" in explained
    explained = command(serve, "routes", "explain", f"telegram:-/{GROUP_CHAT}/1")
    assert f"access: deny {BOB['id']}; in {GROUP_CHAT}; limits: 2 a minute" in explained
    listed = command(serve, "routes", "list")
    assert f"deny {BOB['id']}; in {GROUP_CHAT}" in listed
    page = httpx.get(f"{serve.url}/admin/routes", timeout=10, follow_redirects=True)
    assert f"deny {BOB['id']}. only in {GROUP_CHAT}." in page.text
