"""Slack's rules, in the pure converters: which messages are the agent's, threads, text."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.slack.convert import (
    BotIdentity,
    agent_text,
    conversation_data,
    hear,
    post_args,
    to_inbound,
    without_mention,
)

ME = BotIdentity(user_id="UBOT", bot_id="BBOT")
BODY = {"team_id": "T1", "type": "event_callback"}


def event(**fields: Any) -> dict[str, Any]:
    base = {"type": "message", "channel": "C1", "user": "U1", "ts": "100.1", "text": "hi"}
    return {**base, **fields}


def test_a_mention_starts_a_thread_on_its_own_message() -> None:
    heard = hear(BODY, event(type="app_mention", text="<@UBOT> what is a pension?"), ME)
    assert heard is not None
    assert heard.kind == "mention"
    assert heard.thread.key == "slack:T1/C1/100.1"
    assert heard.text == "what is a pension?"


def test_a_mention_inside_a_thread_joins_that_thread() -> None:
    heard = hear(BODY, event(type="app_mention", ts="105.5", thread_ts="100.1"), ME)
    assert heard is not None and heard.thread.thread == "100.1"


def test_the_same_message_as_app_mention_and_message_has_one_event_id() -> None:
    mention = hear(BODY, event(type="app_mention", text="<@UBOT> hi"), ME)
    message = hear(BODY, event(type="message", text="<@UBOT> hi", channel_type="channel"), ME)
    assert mention is not None and message is not None
    assert mention.event_id == message.event_id == "slack:T1:C1:100.1"


def test_a_reply_without_mention_is_a_thread_reply_and_top_level_chatter_is_ignored() -> None:
    reply = hear(BODY, event(ts="101.0", thread_ts="100.1", channel_type="channel"), ME)
    assert reply is not None and reply.kind == "thread_reply"
    assert hear(BODY, event(channel_type="channel"), ME) is None


def test_direct_messages_start_a_thread_each_and_replies_continue_it() -> None:
    top = hear(BODY, event(channel="D1", channel_type="im"), ME)
    reply = hear(BODY, event(channel="D1", channel_type="im", ts="102.0", thread_ts="100.1"), ME)
    assert top is not None and reply is not None
    assert top.kind == reply.kind == "dm"
    assert top.thread == reply.thread


@pytest.mark.parametrize(
    "fields",
    [
        {"user": "UBOT"},
        {"bot_id": "B2", "subtype": "bot_message"},
        {"bot_id": "B2"},
        {"subtype": "message_changed"},
        {"subtype": "message_deleted"},
        {"subtype": "channel_join"},
        {"user": None},
        {"type": "reaction_added"},
    ],
)
def test_bots_edits_and_joins_are_ignored(fields: dict[str, Any]) -> None:
    assert hear(BODY, {**event(type="app_mention"), **fields}, ME) is None


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"team_id": "\ud800"}, {}),  # found by the fuzz on PostgreSQL: a 503 there
        (BODY, {"channel": "C\x00"}),
        (BODY, {"ts": "100.\udfff"}),
        (BODY, {"thread_ts": "\ud800", "user": "U1"}),
    ],
)
def test_ids_no_database_can_keep_are_not_slacks(body: dict[str, Any], fields: Any) -> None:
    assert hear(body, {**event(type="app_mention"), **fields}, ME) is None


def test_files_reach_the_agent_as_text() -> None:
    files = [{"name": "report.pdf", "url_private": "https://files.slack.test/report.pdf"}]
    heard = hear(
        BODY, event(type="app_mention", text="<@UBOT>", subtype="file_share", files=files), ME
    )
    assert heard is not None and heard.text == ""
    assert agent_text(heard) == "[file shared: report.pdf https://files.slack.test/report.pdf]"


def test_other_mentions_stay_and_only_the_bots_goes() -> None:
    assert without_mention("<@UBOT|bot>  ask <@U2> about it", "UBOT") == "ask <@U2> about it"


def test_the_inbound_and_its_data() -> None:
    heard = hear(BODY, event(type="app_mention", text="<@UBOT> hello"), ME)
    assert heard is not None
    data = conversation_data(heard, channel_name="general", user_name="Ann", permalink="https://x")
    inbound = to_inbound(heard, "Ann", data)
    assert inbound.author.id == "U1" and inbound.author.name == "Ann"
    assert inbound.data == {
        "team_id": "T1",
        "channel_id": "C1",
        "thread_ts": "100.1",
        "user_id": "U1",
        "channel_name": "general",
        "user_name": "Ann",
        "permalink": "https://x",
    }
    assert post_args(heard.thread, "answer")["thread_ts"] == "100.1"
