"""Telegram through the real `threadbridge serve`, by long polling and by webhook, against the
fake Bot API on loopback, reached only through `[telegram] api_base_url`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.dbview import DatabaseView
from tests.e2e.serve import ServeProcess, search
from tests.fakes.telegram import (
    BOB,
    BOT_TOKEN,
    BOT_USERNAME,
    FORUM_CHAT,
    GROUP_CHAT,
    PRIVATE_CHAT,
    SUPERGROUP_CHAT,
    FakeTelegram,
    fake_telegram,
)

pytestmark = pytest.mark.e2e

SECRET = "webhook-secret-for-tests"
BOT = f"@{BOT_USERNAME}"


def config_text(tmp_path: Path, api: str, extra: str = "", routes: str = "") -> str:
    return f"""
default_agent = "demo"

[store]
url = "sqlite:///{tmp_path}/tb.db"

[bridge]
poll_s = 0.1
working_after_s = 0  # these tests check the working signal; a quick answer skips it

[agents.demo]
service = "local"

[agents.other]
service = "local"
{routes}
[telegram]
api_base_url = "{api}"
admins = [{BOB["id"]}]
poll_timeout_s = 2
{extra}
"""


@pytest.fixture
def tg() -> Iterator[FakeTelegram]:
    with fake_telegram() as fake:
        yield fake


def start(
    tmp_path: Path, tg: FakeTelegram, *, webhook: bool = False, routes: str = ""
) -> ServeProcess:
    env = {"TELEGRAM_BOT_TOKEN": BOT_TOKEN}
    extra = ""
    if webhook:
        env["TELEGRAM_WEBHOOK_SECRET"] = SECRET
        extra = 'mode = "webhook"\npublic_url = "https://bots.example.com"'
    process = ServeProcess(tmp_path, config_text(tmp_path, tg.base_url, extra, routes), env=env)
    process.start()
    return process


@pytest.fixture
def serve(tmp_path: Path, tg: FakeTelegram) -> Iterator[ServeProcess]:
    process = start(tmp_path, tg)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def hooked(tmp_path: Path, tg: FakeTelegram) -> Iterator[ServeProcess]:
    process = start(tmp_path, tg, webhook=True)
    try:
        yield process
    finally:
        process.stop()


def wait_sent(
    tg: FakeTelegram,
    count: int,
    chat_id: int,
    thread_id: int | None = None,
    timeout: float = 20.0,
    where: Callable[[dict[str, Any]], bool] = lambda m: True,
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in tg.sent(chat_id, thread_id) if where(m)]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"chat {chat_id}: {tg.sent()}")
        time.sleep(0.05)


def text_of(sent: dict[str, Any]) -> str:
    return str(sent["message"]["text"])


def hook(
    serve: ServeProcess, tg: FakeTelegram, update: dict[str, Any], **kw: Any
) -> httpx.Response:
    return asyncio.run(tg.webhook_post(f"{serve.url}/telegram/webhook", update, **kw))


# -- polling ---------------------------------------------------------------------------------


def test_a_private_chat_is_one_conversation_until_new(
    serve: ServeProcess, tg: FakeTelegram
) -> None:
    assert tg.calls_to("deleteWebhook")
    tg.queue_update(tg.private_message("what is a pension?"))
    [answer] = wait_sent(tg, 1, PRIVATE_CHAT)
    assert "what is a pension?" in text_of(answer)
    assert answer["parse_mode"] == "HTML"
    assert answer["reply_to"] is None  # private chats are not quoted
    tg.queue_update(tg.private_message("and at what age?"))
    second = wait_sent(tg, 2, PRIVATE_CHAT)[1]
    assert "message 2 of" in text_of(second)
    assert tg.calls_to("sendChatAction")[0].params["action"] == "typing"

    tg.queue_update(tg.command("/new"))
    assert "Started afresh" in text_of(wait_sent(tg, 3, PRIVATE_CHAT)[2])
    tg.queue_update(tg.private_message("hello again"))
    assert "message 1 of" in text_of(wait_sent(tg, 4, PRIVATE_CHAT)[3])

    found = search(serve, "--source", "telegram")
    assert len(found) == 2
    data = found[0]["data"]
    assert data["chat_id"] == PRIVATE_CHAT
    assert data["chat_type"] == "private"
    assert data["user_id"] == 1001
    assert data["username"] == "alice"
    assert data["first_name"] == "Alice"
    assert data["language_code"] == "en"


def test_start_and_agent_commands(serve: ServeProcess, tg: FakeTelegram) -> None:
    tg.queue_update(tg.command("/start"))
    assert "demo" in text_of(wait_sent(tg, 1, PRIVATE_CHAT)[0])
    tg.queue_update(tg.command("/agent other"))
    assert "admin" in text_of(wait_sent(tg, 2, PRIVATE_CHAT)[1])
    tg.queue_update(tg.command("/agent other", chat_id=GROUP_CHAT, user=BOB))
    assert "other" in text_of(wait_sent(tg, 1, GROUP_CHAT)[0])
    tg.queue_update(tg.command(f"/agent@{BOT_USERNAME}", chat_id=GROUP_CHAT))
    assert "other" in text_of(wait_sent(tg, 2, GROUP_CHAT)[1])
    tg.queue_update(tg.group_message(f"{BOT} who answers?"))
    wait_sent(tg, 3, GROUP_CHAT)
    [found] = search(serve, "--source", "telegram")
    assert found["agent"] == "other"


def seen_by_people(serve: ServeProcess, answer: dict[str, Any], timeout: float = 10.0) -> None:
    """Wait until the bot has its answer back from Telegram (and noted it): a person can reply
    to a message only once Telegram has shown it, long after that. The fake records a send
    when it arrives, so without this a test could reply within the same millisecond."""
    view = DatabaseView(f"sqlite:///{serve.workdir}/tb.db")
    key = f"telegram:{answer['chat_id']}:{answer['message_id']}"
    deadline = time.monotonic() + timeout
    try:
        while not view.query(f"SELECT 1 FROM posts WHERE key = '{key}'"):
            assert time.monotonic() < deadline, f"the bot never noted its post {key}"
            time.sleep(0.02)
    finally:
        view.close()


def test_a_group_answers_mentions_and_replies_to_its_messages(
    serve: ServeProcess, tg: FakeTelegram
) -> None:
    tg.queue_update(tg.group_message("just people talking"))
    mention = tg.queue_update(tg.group_message(f"{BOT} explain pensions"))
    [answer] = wait_sent(tg, 1, GROUP_CHAT)
    assert "explain pensions" in text_of(answer)
    assert BOT not in text_of(answer)  # the mention is not sent to the agent
    assert answer["reply_to"] == mention["message"]["message_id"]
    seen_by_people(serve, answer)
    follow = tg.queue_update(tg.group_message("and taxes?", user=BOB, reply_to=answer))
    second = wait_sent(tg, 2, GROUP_CHAT)[1]
    assert "message 2 of" in text_of(second)  # the same conversation: the reply chain
    assert second["reply_to"] == follow["message"]["message_id"]
    tg.queue_update(tg.group_message(f"{BOT} a new question"))
    assert "message 1 of" in text_of(wait_sent(tg, 3, GROUP_CHAT)[2])
    found = search(serve, "--source", "telegram")
    assert len(found) == 2
    assert found[0]["data"]["chat_title"]


def test_a_forum_topic_is_one_conversation(serve: ServeProcess, tg: FakeTelegram) -> None:
    tg.queue_update(tg.topic_message("chatter before the bot", thread_id=7))
    tg.queue_update(tg.topic_message(f"{BOT} first", thread_id=7))
    [answer] = wait_sent(tg, 1, FORUM_CHAT, thread_id=7)
    assert "first" in text_of(answer)
    tg.queue_update(tg.topic_message("second, no mention", thread_id=7))
    assert "message 2 of" in text_of(wait_sent(tg, 2, FORUM_CHAT, thread_id=7)[1])
    tg.queue_update(tg.topic_message("another topic, no mention", thread_id=9))
    time.sleep(1.0)
    assert tg.sent(FORUM_CHAT, 9) == []
    assert all(c.params.get("message_thread_id") == 7 for c in tg.calls_to("sendMessage"))
    [found] = search(serve, "--source", "telegram")
    assert found["data"]["topic_id"] == 7


def test_respond_all_answers_every_group_message(tmp_path: Path, tg: FakeTelegram) -> None:
    routes = f"""
[[routes]]
source = "telegram"
channel = "{SUPERGROUP_CHAT}"
agent = "demo"
respond = "all"
"""
    process = start(tmp_path, tg, routes=routes)
    try:
        tg.queue_update(tg.group_message("no mention needed", chat_id=SUPERGROUP_CHAT))
        assert "no mention needed" in text_of(wait_sent(tg, 1, SUPERGROUP_CHAT)[0])
        tg.queue_update(tg.group_message("ignored elsewhere"))
        time.sleep(1.0)
        assert tg.sent(GROUP_CHAT) == []
    finally:
        process.stop()


def test_photos_stickers_and_edits(serve: ServeProcess, tg: FakeTelegram) -> None:
    tg.queue_update(tg.photo_message(caption="what is in my payslip?"))
    assert "payslip" in text_of(wait_sent(tg, 1, PRIVATE_CHAT)[0])
    original = tg.queue_update(tg.sticker_message())
    assert "text only" in text_of(wait_sent(tg, 2, PRIVATE_CHAT)[1])
    tg.queue_update(tg.edited_message(original, "edited"))
    time.sleep(1.0)
    assert len(tg.sent(PRIVATE_CHAT)) == 2


def test_a_long_answer_is_split_without_breaking_code(
    serve: ServeProcess, tg: FakeTelegram
) -> None:
    body = "\n\n".join(
        f"Part {i}: " + "words " * 60 + f"\n```python\nprint({i})\n" + "x = 1 < 2\n" * 30 + "```"
        for i in range(15)
    )
    body += "\n\nThe end."
    assert 10_000 < len(body) < 16_000
    tg.queue_update(tg.private_message(body))
    sent = wait_sent(tg, 3, PRIVATE_CHAT, timeout=30)
    time.sleep(1.5)
    sent = tg.sent(PRIVATE_CHAT)
    assert all(m["parse_mode"] == "HTML" for m in sent)  # the fake refuses bad HTML
    joined = "".join(text_of(m) for m in sent)
    positions = [joined.find(f"Part {i}:") for i in range(15)]
    assert all(p >= 0 for p in positions)
    assert positions == sorted(positions)
    assert all(len(text_of(m)) <= 4096 for m in sent)
    assert "x = 1 < 2" in joined  # escaped on the way, shown as written


def test_entities_refused_are_sent_as_plain_text(serve: ServeProcess, tg: FakeTelegram) -> None:
    tg.fail("sendMessage", 400, description="Bad Request: can't parse entities: unsupported tag")
    tg.queue_update(tg.private_message("**bold** please"))
    [answer] = wait_sent(tg, 1, PRIVATE_CHAT)
    assert answer["parse_mode"] is None
    assert "bold please" in text_of(answer)


def test_a_429_storm_delivers_every_reply(serve: ServeProcess, tg: FakeTelegram) -> None:
    tg.fail("sendMessage", 429, times=6, retry_after=1)
    for i in range(3):
        tg.queue_update(tg.private_message(f"question {i}"))
    sent = wait_sent(tg, 3, PRIVATE_CHAT, timeout=40)
    for i in range(3):
        assert f"question {i}" in text_of(sent[i])
    assert sum(c.status == 429 for c in tg.calls_to("sendMessage")) == 6


def test_a_migrated_group_continues_under_its_new_id(serve: ServeProcess, tg: FakeTelegram) -> None:
    tg.add_chat(SUPERGROUP_CHAT, "supergroup", title="upgraded")
    tg.fail("sendMessage", 400, migrate_to_chat_id=SUPERGROUP_CHAT, chat_id=GROUP_CHAT)
    tg.queue_update(tg.group_message(f"{BOT} before the upgrade"))
    [answer] = wait_sent(tg, 1, SUPERGROUP_CHAT)
    assert "before the upgrade" in text_of(answer)
    [found] = search(serve, "--source", "telegram", "--channel", str(SUPERGROUP_CHAT))
    assert found["thread_key"].startswith(f"telegram:-/{SUPERGROUP_CHAT}/")
    seen_by_people(serve, answer)
    follow = tg.queue_update(
        tg.group_message("and after?", chat_id=SUPERGROUP_CHAT, reply_to=answer)
    )
    second = wait_sent(tg, 2, SUPERGROUP_CHAT)[1]
    assert "message 2 of" in text_of(second)  # the chain continues in the supergroup
    assert second["reply_to"] == follow["message"]["message_id"]


def test_a_blocked_bot_closes_the_thread(serve: ServeProcess, tg: FakeTelegram) -> None:
    tg.fail("sendMessage", 403)
    tg.queue_update(tg.private_message("are you there?"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = search(serve, "--source", "telegram")
        if found and found[0]["status"] == "closed":
            break
        time.sleep(0.2)
    assert found[0]["status"] == "closed"
    assert len(tg.calls_to("sendMessage")) == 1  # not retried: Telegram said never


# -- webhook ---------------------------------------------------------------------------------


def test_the_webhook_is_registered_and_answers_once(hooked: ServeProcess, tg: FakeTelegram) -> None:
    [registered] = tg.calls_to("setWebhook")
    assert registered.params["url"] == "https://bots.example.com/telegram/webhook"
    assert registered.params["secret_token"] == SECRET
    update = tg.private_message("over the webhook")
    update["update_id"] = 555
    for _ in range(3):  # Telegram redelivers when it does not hear 200 in time
        assert hook(hooked, tg, update).status_code == 200
    [answer] = wait_sent(tg, 1, PRIVATE_CHAT)
    assert "over the webhook" in text_of(answer)
    time.sleep(1.0)
    assert len(tg.sent(PRIVATE_CHAT)) == 1
    tg.queue_update(tg.topic_message(f"{BOT} in a topic", thread_id=3))
    assert not tg.calls_to("getUpdates")  # no polling in webhook mode


def test_the_webhook_refuses_bad_requests(hooked: ServeProcess, tg: FakeTelegram) -> None:
    update = tg.private_message("sneaky")
    assert hook(hooked, tg, update, secret="wrong").status_code == 403
    assert hook(hooked, tg, update, secret="").status_code == 403
    url = f"{hooked.url}/telegram/webhook"
    secret = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
    assert httpx.post(url, content=b"not json", headers=secret).status_code == 400
    bad = httpx.post(url, content=b"{nope", headers={**secret, "Content-Type": "application/json"})
    assert bad.status_code == 400
    malformed = httpx.post(url, json={"message": {"text": 1}}, headers=secret)
    assert malformed.status_code == 400
    odd = httpx.post(url, json={"update_id": 9, "message": {"date": "x"}}, headers=secret)
    assert odd.status_code == 400
    time.sleep(0.5)
    assert tg.sent() == []
    assert "Traceback" not in hooked.log()


def test_polling_deletes_the_webhook_and_telegram_stays_off_without_a_token(
    tmp_path: Path, tg: FakeTelegram
) -> None:
    process = ServeProcess(tmp_path, config_text(tmp_path, tg.base_url))
    process.env.pop("TELEGRAM_BOT_TOKEN", None)
    try:
        process.start()
        assert "TELEGRAM_BOT_TOKEN is not set" in process.log()
        assert tg.calls == []
    finally:
        process.stop()


def test_a_refused_token_stops_the_start_with_the_fix(tmp_path: Path, tg: FakeTelegram) -> None:
    env = {"TELEGRAM_BOT_TOKEN": "1:wrong"}
    process = ServeProcess(tmp_path, config_text(tmp_path, tg.base_url), env=env)
    try:
        with pytest.raises(RuntimeError, match="serve exited 1"):
            process.start()
        log = process.log()
        assert "refused the bot token in TELEGRAM_BOT_TOKEN" in log
        assert "Traceback" not in log
        assert "1:wrong" not in log
    finally:
        process.stop()
