"""Recorded Telegram updates through the converters: what is for the bot, and which thread."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from telegram import Update

from adapters.telegram.convert import (
    BotInfo,
    conversation_data,
    hear,
    message_id_of,
    thread_of,
    to_inbound,
    without_mention,
)
from tests.fakes.telegram import BOT_ID, BOT_USERNAME, load_payload

ME = BotInfo(BOT_ID, BOT_USERNAME)


def update(name: str, **changes: Any) -> Update:
    raw = copy.deepcopy(load_payload(name))
    raw["message"].update(changes)
    parsed = Update.de_json(raw, None)
    assert parsed is not None
    return parsed


def test_a_private_message_is_its_chats_thread() -> None:
    heard = hear(update("private_message"), ME)
    assert heard is not None
    assert heard.place == "private"
    assert heard.for_the_bot
    assert thread_of(heard).key == f"telegram:-/{heard.chat_id}/{heard.chat_id}"
    inbound = to_inbound(heard, thread_of(heard))
    assert inbound.author.name == "Alice"
    assert (
        inbound.event_id
        == f"telegram:{BOT_ID}:{heard.update_id}:{heard.chat_id}:{heard.message_id}"
    )
    assert message_id_of(inbound.event_id) == heard.message_id
    data = conversation_data(heard)
    assert data["chat_type"] == "private"
    assert data["username"] == "alice"
    assert data["language_code"] == "en"
    assert "topic_id" not in data


def test_a_group_mention_starts_a_chain_at_the_message() -> None:
    heard = hear(update("group_mention"), ME)
    assert heard is not None
    assert heard.place == "group"
    assert heard.mentioned
    assert heard.text == "what is a monad?"
    assert thread_of(heard).thread == str(heard.message_id)
    assert conversation_data(heard)["chat_title"] == "Test group"


def test_a_reply_to_the_bot_continues_its_chain() -> None:
    heard = hear(update("group_reply_to_bot"), ME)
    assert heard is not None
    assert heard.replied_to_bot == 22
    assert not heard.mentioned
    assert heard.for_the_bot
    assert thread_of(heard, "telegram:-/-1001000000001/20").thread == "20"
    assert thread_of(heard).thread == "22"  # an unknown chain is named by the bot's message


def test_a_topic_message_is_the_topics_thread_not_a_reply() -> None:
    heard = hear(update("topic_message"), ME)
    assert heard is not None
    assert heard.place == "topic"
    assert heard.topic_id == 2
    assert heard.replied_to_bot is None  # the topic's first message is not a reply to the bot
    assert thread_of(heard).thread == "topic-2"
    assert conversation_data(heard)["topic_id"] == 2


def test_photo_captions_are_text_and_stickers_are_not() -> None:
    photo = hear(update("photo_message"), ME)
    assert photo is not None
    assert photo.text
    assert photo.non_text is None
    sticker = hear(update("sticker_message"), ME)
    assert sticker is not None
    assert sticker.text == ""
    assert sticker.non_text == "sticker"


def test_commands_and_whom_they_are_for() -> None:
    new = hear(update("command_new"), ME)
    assert new is not None
    assert (new.command, new.args) == ("new", "")
    entity = [{"offset": 0, "length": 12, "type": "bot_command"}]
    other = hear(update("command_new", text="/new@otherbot", entities=entity), ME)
    assert other is not None
    assert other.command is None  # meant for another bot
    entity = [{"offset": 0, "length": 18, "type": "bot_command"}]
    mine = hear(update("command_new", text="/agent@tb_test_bot helpdesk", entities=entity), ME)
    assert mine is not None
    assert (mine.command, mine.args) == ("agent", "helpdesk")


@pytest.mark.parametrize("name", ["edited_message"])
def test_edits_are_ignored(name: str) -> None:
    parsed = Update.de_json(load_payload(name), None)
    assert parsed is not None
    assert hear(parsed, ME) is None


def test_bots_and_service_messages_are_ignored() -> None:
    bot_author = {"id": 5, "is_bot": True, "first_name": "Other"}
    assert hear(update("group_mention", **{"from": bot_author}), ME) is None
    service = update("group_mention", text=None, entities=None, new_chat_members=[bot_author])
    assert hear(service, ME) is None


def test_without_mention() -> None:
    assert without_mention("@tb_test_bot  what   now", "tb_test_bot") == "what now"
    assert without_mention("hey @TB_test_bot, help", "tb_test_bot") == "hey , help"
    assert without_mention("line one\n@tb_test_bot line two", "tb_test_bot") == (
        "line one\n line two"
    )
