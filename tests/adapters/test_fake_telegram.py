"""The fake Telegram, proven against the real python-telegram-bot: `Bot` and `Application`."""

from __future__ import annotations

import asyncio
import datetime as dtm
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from telegram import Bot, ReplyParameters, Update
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
)
from telegram.ext import ApplicationBuilder, ContextTypes, MessageHandler, filters

from tests.fakes.telegram import (
    BOT_TOKEN,
    FORUM_CHAT,
    GROUP_CHAT,
    PAYLOADS,
    PRIVATE_CHAT,
    SUPERGROUP_CHAT,
    FakeTelegram,
    Limits,
    fake_telegram,
    load_payload,
    parse_html,
)
from tests.servers import run_asgi


@pytest.fixture
def fake() -> Iterator[FakeTelegram]:
    with fake_telegram() as started:
        yield started


@pytest.fixture
async def bot(fake: FakeTelegram) -> AsyncIterator[Bot]:
    async with Bot(BOT_TOKEN, base_url=fake.base_url, base_file_url=fake.base_file_url) as bot:
        yield bot


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def shape(value: Any) -> Any:
    """The keys of a payload, all the way down (lists by their first item), without values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


# -- Bot: identity, sending, errors -----------------------------------------------------------


async def test_initialize_calls_get_me_and_a_wrong_token_is_refused(
    fake: FakeTelegram, bot: Bot
) -> None:
    assert (bot.id, bot.username, bot.bot.can_read_all_group_messages) == (
        7000000001,
        "tb_test_bot",
        False,
    )
    assert [c.method for c in fake.calls] == ["getMe"]
    assert fake.calls[0].params == {} and fake.calls[0].status == 200

    with pytest.raises(InvalidToken):  # raised by initialize(), which then closes the client
        async with Bot("1:wrong", base_url=fake.base_url):
            pass
    assert fake.calls[-1].response == {
        "ok": False,
        "error_code": 401,
        "description": "Unauthorized",
    }


async def test_send_message_with_html_threads_and_replies(fake: FakeTelegram, bot: Bot) -> None:
    sent = await bot.send_message(PRIVATE_CHAT, "<b>hi</b> &amp; <i>bye</i>", parse_mode="HTML")
    assert (sent.text, sent.from_user.id, sent.chat.type) == ("hi & bye", bot.id, "private")
    assert [(e.type, e.offset, e.length) for e in sent.entities] == [
        ("bold", 0, 2),
        ("italic", 5, 3),
    ]
    second = await bot.send_message(PRIVATE_CHAT, "again")
    assert second.message_id == sent.message_id + 1

    # PTB posts a form: ints as digits, structured values as JSON strings; the fake decodes them.
    call = fake.calls_to("sendMessage")[0]
    assert call.params == {
        "chat_id": PRIVATE_CHAT,
        "text": "<b>hi</b> &amp; <i>bye</i>",
        "parse_mode": "HTML",
    }
    assert [(m["text"], m["parse_mode"]) for m in fake.sent(PRIVATE_CHAT)] == [
        ("<b>hi</b> &amp; <i>bye</i>", "HTML"),
        ("again", None),
    ]

    asked = fake.group_message("@tb_test_bot hello", SUPERGROUP_CHAT)["message"]
    reply = await bot.send_message(
        SUPERGROUP_CHAT, "hello", reply_parameters=ReplyParameters(asked["message_id"])
    )
    assert reply.reply_to_message is not None
    assert reply.reply_to_message.text == "@tb_test_bot hello"
    assert fake.calls_to("sendMessage")[-1].params["reply_parameters"] == {
        "message_id": asked["message_id"]
    }

    in_topic = await bot.send_message(FORUM_CHAT, "Here is a summary.", message_thread_id=2)
    assert (in_topic.message_thread_id, in_topic.is_topic_message) == (2, True)
    answered = fake.calls_to("sendMessage")[-1].response["result"]
    assert shape(answered) == shape(load_payload("send_message_topic_result"))
    assert [m["message_id"] for m in fake.sent(FORUM_CHAT, thread_id=2)] == [1]
    assert fake.sent(GROUP_CHAT) == []


@pytest.mark.parametrize(
    "text",
    [
        *("a < b", "a > b", "fish & chips", "<b>open", "<b><i>x</b></i>", "</b>"),
        *("<div>x</div>", '<span class="x">s</span>', "<code class='language-py'>x</code>"),
    ],
)
async def test_bad_html_is_refused_like_telegram(fake: FakeTelegram, bot: Bot, text: str) -> None:
    # PTB drops "Bad Request: " and str.capitalize()s the rest: "Can't parse entities: unclosed…"
    with pytest.raises(BadRequest, match=r"^Can't parse entities: [a-z]"):
        await bot.send_message(PRIVATE_CHAT, text, parse_mode="HTML")
    assert fake.calls_to("sendMessage")[0].status == 400
    assert fake.sent() == []


def test_good_html_parses_to_telegram_entities() -> None:
    text = (
        '<a href="https://x.test/?a=1&amp;b=2">link</a> 😀<s>x</s>'
        '<pre><code class="language-py">x = 1</code></pre>'
        '<blockquote expandable>q</blockquote><span class="tg-spoiler">s</span>'
    )
    plain, entities = parse_html(text)
    assert plain == "link 😀xx = 1qs"
    assert entities == [
        {"offset": 0, "length": 4, "type": "text_link", "url": "https://x.test/?a=1&b=2"},
        {"offset": 7, "length": 1, "type": "strikethrough"},  # 😀 is two UTF-16 units
        {"offset": 8, "length": 5, "type": "pre", "language": "py"},
        {"offset": 13, "length": 1, "type": "expandable_blockquote"},
        {"offset": 14, "length": 1, "type": "spoiler"},
    ]


async def test_length_limit_counts_text_after_html_and_empty_text(
    fake: FakeTelegram, bot: Bot
) -> None:
    await bot.send_message(PRIVATE_CHAT, "<b>" + "x" * 4096 + "</b>", parse_mode="HTML")
    await bot.send_message(PRIVATE_CHAT, "&lt;" * 4096, parse_mode="HTML")
    with pytest.raises(BadRequest, match=r"(?i)message is too long"):
        await bot.send_message(PRIVATE_CHAT, "x" * 4097)
    with pytest.raises(BadRequest, match=r"(?i)message text is empty"):
        await bot.send_message(PRIVATE_CHAT, "<b> </b>", parse_mode="HTML")
    assert len(fake.sent()) == 2


async def test_edit_and_delete(fake: FakeTelegram, bot: Bot) -> None:
    sent = await bot.send_message(GROUP_CHAT, "thinking…")
    edited = await bot.edit_message_text(
        "<b>done</b>", GROUP_CHAT, sent.message_id, parse_mode="HTML"
    )
    assert isinstance(edited, type(sent)) and edited.text == "done"
    assert edited.edit_date is not None
    with pytest.raises(BadRequest, match=r"(?i)message is not modified"):
        await bot.edit_message_text("<b>done</b>", GROUP_CHAT, sent.message_id, parse_mode="HTML")
    [record] = fake.sent(GROUP_CHAT)
    assert (record["text"], record["edited"], record["message"]["text"]) == (
        "<b>done</b>",
        True,
        "done",
    )
    with pytest.raises(BadRequest, match=r"(?i)message to edit not found"):
        await bot.edit_message_text("x", GROUP_CHAT, 999)

    assert await bot.delete_message(GROUP_CHAT, sent.message_id) is True
    assert fake.sent(GROUP_CHAT) == []
    with pytest.raises(BadRequest, match=r"(?i)message to delete not found"):
        await bot.delete_message(GROUP_CHAT, sent.message_id)


async def test_limits_answer_429_over_a_chats_or_the_overall_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PTB_TIMEDELTA", "true")
    slow = 0.001  # a token a quarter hour: nothing refills during the test
    limits = Limits(per_chat=slow, per_chat_burst=2, overall=slow, overall_burst=3)
    with fake_telegram(limits=limits) as fake:
        async with Bot(BOT_TOKEN, base_url=fake.base_url) as bot:
            await bot.send_message(PRIVATE_CHAT, "1")
            await bot.send_message(PRIVATE_CHAT, "2")
            with pytest.raises(RetryAfter) as per_chat:
                await bot.send_message(PRIVATE_CHAT, "3: the chat's burst is spent")
            await bot.send_chat_action(PRIVATE_CHAT, "typing")  # not a message: not limited
            await bot.send_message(GROUP_CHAT, "4: another chat, the last overall token")
            with pytest.raises(RetryAfter):
                await bot.send_message(SUPERGROUP_CHAT, "5: the overall burst is spent")
    assert per_chat.value.retry_after.total_seconds() >= 1
    statuses = [c.status for c in fake.calls_to("sendMessage")]
    assert statuses == [200, 200, 429, 200, 429]
    assert [m["text"][0] for m in fake.sent()] == ["1", "2", "4"]


async def test_injected_faults_raise_ptb_errors(
    fake: FakeTelegram, bot: Bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without PTB_TIMEDELTA, reading RetryAfter.retry_after warns (an error under our pytest).
    monkeypatch.setenv("PTB_TIMEDELTA", "true")
    fake.fail("sendMessage", 429, retry_after=7)
    with pytest.raises(RetryAfter) as rate:
        await bot.send_message(PRIVATE_CHAT, "hi")
    assert rate.value.retry_after == dtm.timedelta(seconds=7)
    assert fake.calls_to("sendMessage")[0].response == {
        "ok": False,
        "error_code": 429,
        "description": "Too Many Requests: retry after 7",
        "parameters": {"retry_after": 7},
    }

    fake.fail("sendMessage", 400, migrate_to_chat_id=SUPERGROUP_CHAT, chat_id=GROUP_CHAT)
    await bot.send_message(PRIVATE_CHAT, "not that chat: no fault")
    with pytest.raises(ChatMigrated) as migrated:
        await bot.send_message(GROUP_CHAT, "hi")
    assert migrated.value.new_chat_id == SUPERGROUP_CHAT

    fake.fail("sendMessage", 403, times=2)
    for _ in range(2):
        with pytest.raises(Forbidden, match="bot was blocked by the user"):
            await bot.send_message(PRIVATE_CHAT, "hi")
    fake.fail("editMessageText", 400)
    with pytest.raises(BadRequest, match=r"(?i)can't parse entities"):
        await bot.edit_message_text("x", PRIVATE_CHAT, 1)
    fake.fail("sendChatAction", 500)
    with pytest.raises(NetworkError, match="Internal Server Error"):
        await bot.send_chat_action(PRIVATE_CHAT, "typing")
    await bot.send_message(PRIVATE_CHAT, "faults used up")
    statuses = [c.status for c in fake.calls if c.method != "getMe"]
    assert statuses == [429, 200, 400, 403, 403, 400, 500, 200]


async def test_chat_action_commands_and_get_chat(fake: FakeTelegram, bot: Bot) -> None:
    assert await bot.send_chat_action(FORUM_CHAT, "typing", message_thread_id=2) is True
    with pytest.raises(BadRequest, match=r"(?i)chat not found"):
        await bot.send_chat_action(-42, "typing")
    assert await bot.set_my_commands([("new", "start a new conversation")]) is True
    assert [(c.command, c.description) for c in await bot.get_my_commands()] == [
        ("new", "start a new conversation")
    ]
    assert fake.calls_to("setMyCommands")[0].params["commands"] == [
        {"command": "new", "description": "start a new conversation"}
    ]
    forum = await bot.get_chat(FORUM_CHAT)
    assert (forum.type, forum.is_forum, forum.title) == ("supergroup", True, "Test forum")
    group = await bot.get_chat(GROUP_CHAT)
    assert group.type == "group"


async def test_json_bodies_and_method_names_as_telegram_takes_them(fake: FakeTelegram) -> None:
    url = f"{fake.base_url}{BOT_TOKEN}"
    async with httpx.AsyncClient(trust_env=False) as client:
        answer = await client.post(
            f"{url}/sendmessage",
            json={"chat_id": GROUP_CHAT, "text": "hi", "reply_to_message_id": 5},
        )
        assert answer.json()["result"]["reply_to_message"]["message_id"] == 5
        missing = await client.post(f"{url}/sendSticker", data={"chat_id": "1"})
        assert (missing.status_code, missing.json()["description"]) == (404, "Not Found")
    assert fake.calls_to("sendMessage")[0].params["reply_to_message_id"] == 5


# -- getUpdates and the Application ---------------------------------------------------------


async def test_get_updates_honours_offset_limit_and_timeout(fake: FakeTelegram, bot: Bot) -> None:
    first, second, third = (fake.queue_update(fake.private_message(t)) for t in "abc")
    assert [first["update_id"] + 1, first["update_id"] + 2] == [
        second["update_id"],
        third["update_id"],
    ]
    updates = await bot.get_updates(limit=2)
    assert [u.message.text for u in updates if u.message] == ["a", "b"]
    updates = await bot.get_updates(offset=updates[-1].update_id + 1)
    assert [u.message.text for u in updates if u.message] == ["c"]
    assert [u["update_id"] for u in fake.pending_updates] == [third["update_id"]]

    start = time.monotonic()
    assert await bot.get_updates(offset=third["update_id"] + 1, timeout=0.3) == ()
    assert 0.25 < time.monotonic() - start < 2
    assert fake.pending_updates == []
    assert fake.calls_to("getUpdates")[-1].params == {
        "offset": third["update_id"] + 1,
        "timeout": 0.3,
    }

    # A held request returns as soon as an update arrives.
    held = asyncio.create_task(bot.get_updates(timeout=10))
    await asyncio.sleep(0.1)
    fake.queue_update(fake.private_message("late"))
    [late] = await asyncio.wait_for(held, 2)
    assert late.message and late.message.text == "late"


async def test_calls_name_their_client_and_unconfirmed_updates_come_again(
    fake: FakeTelegram,
) -> None:
    via_a = Bot(BOT_TOKEN, base_url=fake.base_url_for("a"), base_file_url=fake.base_file_url)
    via_b = Bot(BOT_TOKEN, base_url=fake.base_url_for("b"), base_file_url=fake.base_file_url)
    async with via_a, via_b:
        fake.confirming = False  # as if a's confirmations never reached Telegram
        first = fake.queue_update(fake.private_message("one"))
        [got] = await via_a.get_updates()
        assert await via_a.get_updates(offset=got.update_id + 1, timeout=0.1) == ()
        fake.confirming = True
        [again] = await via_b.get_updates()  # a poller starting afresh gets it again
        assert again.update_id == first["update_id"]
        assert await via_b.get_updates(offset=again.update_id + 1) == ()
    polls = fake.calls_to("getUpdates")
    assert [c.via for c in polls] == ["a", "a", "b", "b"]
    assert all(c.at <= c.answered for c in polls)
    assert fake.pending_updates == []


async def test_polling_application_gets_each_update_once(fake: FakeTelegram) -> None:
    texts: list[str] = []

    async def on_message(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.effective_message is not None
        texts.append(update.effective_message.text or "")

    app = (
        ApplicationBuilder()
        .token(BOT_TOKEN)
        .base_url(fake.base_url)
        .base_file_url(fake.base_file_url)
        .build()
    )
    app.add_handler(MessageHandler(filters.TEXT, on_message))
    async with app:
        await app.start()
        assert app.updater is not None
        await app.updater.start_polling(timeout=5)
        await fake.wait_for("deleteWebhook")
        await asyncio.sleep(0.1)  # let the first long poll be held
        queued_at = time.time()
        fake.queue_update(fake.private_message("one"))
        fake.queue_update(fake.command("/new"))
        await until(lambda: len(texts) == 2)
        fake.queue_update(fake.topic_message("three"))
        await until(lambda: len(texts) == 3)
        await app.updater.stop()
        await app.stop()
    assert texts == ["one", "/new", "three"]
    assert fake.pending_updates == []  # stopping confirms what was fetched
    methods = [c.method for c in fake.calls]
    assert methods[:2] == ["getMe", "deleteWebhook"]
    polls = fake.calls_to("getUpdates")
    assert polls[0].params["timeout"] == 5  # a timedelta in PTB, whole seconds on the wire
    held = [c for c in polls if c.response["result"] and c.at < queued_at]
    assert held, "the first update was not delivered to a held long poll"
    offsets = [c.params.get("offset", 0) for c in polls]
    assert offsets == sorted(offsets)


# -- webhooks ----------------------------------------------------------------------------------


async def test_set_get_and_delete_webhook(fake: FakeTelegram, bot: Bot) -> None:
    fake.queue_update(fake.private_message("queued"))
    assert await bot.set_webhook(
        "https://bot.example.test/telegram", secret_token="s3cret", allowed_updates=["message"]
    )
    assert fake.webhook == {
        "url": "https://bot.example.test/telegram",
        "secret_token": "s3cret",
        "allowed_updates": ["message"],
    }
    info = await bot.get_webhook_info()
    assert (info.url, info.pending_update_count, info.allowed_updates) == (
        "https://bot.example.test/telegram",
        1,
        ("message",),
    )
    with pytest.raises(Conflict, match="webhook is active"):
        await bot.get_updates()
    with pytest.raises(BadRequest, match=r"(?i)HTTPS URL"):
        await bot.set_webhook("http://plain.example.test/")

    assert await bot.delete_webhook(drop_pending_updates=True)
    info = await bot.get_webhook_info()
    assert (info.url, info.pending_update_count) == ("", 0)


async def test_webhook_post_sends_what_telegram_sends(fake: FakeTelegram, bot: Bot) -> None:
    received: list[tuple[str | None, str, Update]] = []

    async def endpoint(request: Request) -> Response:
        body = await request.json()
        secret = request.headers.get("x-telegram-bot-api-secret-token")
        received.append((secret, request.headers["content-type"], Update.de_json(body, bot)))
        return Response(status_code=200 if secret == "s3cret" else 403)

    await bot.set_webhook("https://bot.example.test/tg", secret_token="s3cret")
    with run_asgi(Starlette(routes=[Route("/tg", endpoint, methods=["POST"])])) as root:
        ok = await fake.webhook_post(f"{root}/tg", fake.group_message("@tb_test_bot hi"))
        refused = await fake.webhook_post(f"{root}/tg", fake.private_message("x"), secret="")
    assert (ok.status_code, refused.status_code) == (200, 403)
    secret, content_type, update = received[0]
    assert (secret, content_type) == ("s3cret", "application/json")
    assert update.message and update.message.parse_entities() == {
        update.message.entities[0]: "@tb_test_bot"
    }
    assert received[1][0] is None and received[1][2].update_id == update.update_id + 1


# -- payloads ----------------------------------------------------------------------------------


def test_every_payload_file_is_used() -> None:
    names = {p.stem for p in PAYLOADS.glob("*.json")}
    assert names == set(BUILDERS) | {
        "group_reply_to_bot",
        "send_message_topic_result",
        "get_me_result",
        "get_chat_result",
    }


BUILDERS = {
    "private_message": lambda f: f.private_message("hello there"),
    "group_mention": lambda f: f.group_message("@tb_test_bot what is a monad?"),
    "topic_message": lambda f: f.topic_message("@tb_test_bot summarise this topic"),
    "command_new": lambda f: f.command("/new"),
    "photo_message": lambda f: f.photo_message(caption="what is in this picture?"),
    "sticker_message": lambda f: f.sticker_message(),
    "edited_message": lambda f: f.edited_message(f.private_message("hello there"), "edited"),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builders_make_what_telegram_sends(name: str) -> None:
    fake = FakeTelegram()  # builders need no server
    built, recorded = BUILDERS[name](fake), load_payload(name)
    recorded.pop("update_id")
    assert shape(built) == shape(recorded)
    update = Update.de_json({"update_id": 1, **built}, None)
    message = update.effective_message
    assert message is not None and message.api_kwargs == {}


async def test_reply_to_the_bot_in_a_group_is_built_like_telegram(
    fake: FakeTelegram, bot: Bot
) -> None:
    answer = await bot.send_message(SUPERGROUP_CHAT, "A monoid in the category of endofunctors.")
    [record] = fake.sent(SUPERGROUP_CHAT)
    reply = fake.group_message("go on", SUPERGROUP_CHAT, user=None, reply_to=record)
    recorded = load_payload("group_reply_to_bot")
    recorded.pop("update_id")
    assert shape(reply) == shape(recorded)
    nested = reply["message"]["reply_to_message"]
    assert (nested["message_id"], nested["from"]["is_bot"]) == (answer.message_id, True)
    assert fake.topic_message("x")["message"]["reply_to_message"]["forum_topic_created"]
