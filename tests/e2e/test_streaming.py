"""A streaming agent's answer grows in the thread: the web chat live; Slack, Telegram and
Discord by editing one message, at most once a second, finished with the whole answer."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.agents.emulators.openai import create_app
from tests.e2e.serve import ServeProcess
from tests.e2e.test_slack import MENTION, SECRET, deliver, wait_texts
from tests.fakes.discord import BOT_TOKEN as DISCORD_TOKEN
from tests.fakes.discord import FakeDiscord, fake_discord
from tests.fakes.slack import BOT_TOKEN as SLACK_TOKEN
from tests.fakes.slack import FakeSlack, app_mention, fake_slack
from tests.fakes.telegram import BOT_TOKEN as TELEGRAM_TOKEN
from tests.fakes.telegram import PRIVATE_CHAT, FakeTelegram, fake_telegram
from tests.servers import run_asgi

pytestmark = pytest.mark.e2e

LONG = " ".join(f"word{i}" for i in range(40))  # the emulator streams word by word


Everything = tuple[ServeProcess, FakeSlack, FakeTelegram, FakeDiscord]


@pytest.fixture(scope="module")
def model() -> Iterator[str]:
    with run_asgi(create_app(api_keys={"k"}, latency_s=3.0)) as url:
        yield url


@pytest.fixture
def everything(tmp_path: Path, model: str) -> Iterator[Everything]:
    with fake_slack() as slack, fake_telegram() as tg, fake_discord() as dc:
        config = f"""
default_agent = "gpt"

[store]
url = "sqlite:///{tmp_path}/tb.db"

[bridge]
poll_s = 0.1

[agents.gpt]
service = "openai"
base_url = "{model}"
api_key_env = "OPENAI_TEST_KEY"
model = "gpt-4o-mini"
stream = true

[web]
enabled = true

[slack]
api_base_url = "{slack.base_url}"

[telegram]
api_base_url = "{tg.base_url}"
poll_timeout_s = 2

[discord]
api_base_url = "{dc.api_base_url}"
gateway_url = "{dc.gateway_url}"
guild_ready_timeout_s = 0.1
"""
        env = {
            "OPENAI_TEST_KEY": "k",
            "SLACK_BOT_TOKEN": SLACK_TOKEN,
            "SLACK_SIGNING_SECRET": SECRET,
            "TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
            "DISCORD_BOT_TOKEN": DISCORD_TOKEN,
        }
        process = ServeProcess(tmp_path, config, env=env)
        process.start()
        try:
            yield process, slack, tg, dc
        finally:
            process.stop()


def test_the_web_chat_shows_the_answer_as_it_grows(
    everything: Everything,
) -> None:
    serve, _, _, _ = everything
    drafts: list[str] = []

    def listen() -> None:
        url = f"{serve.url}/api/chat/tab1/events"
        with httpx.stream("GET", url, timeout=30) as response:
            event = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "draft":
                    drafts.append(json.loads(line.removeprefix("data: "))["text"])
                elif line.startswith("data: ") and event == "changed" and len(drafts) > 1:
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(0.3)
    assert serve.post("tab1", LONG).status_code == 202
    messages = serve.wait_messages("tab1", 2)
    listener.join(timeout=10)
    assert len(drafts) >= 2  # at least two looks at the answer before it was done
    assert all(len(a) <= len(b) for a, b in itertools.pairwise(drafts))
    final = messages[-1]["text"]
    assert final.endswith("word39")
    assert all(final.startswith(d) for d in drafts)


def test_slack_edits_the_placeholder_as_the_answer_grows(
    everything: Everything,
) -> None:
    serve, slack, _, _ = everything
    root = app_mention(f"{MENTION} {LONG}")
    deliver(serve, root)
    [answer] = wait_texts(slack, "C0001", root["ts"], 1, timeout=30)
    deadline = time.monotonic() + 10
    while "word39" not in answer and time.monotonic() < deadline:
        time.sleep(0.1)
        [answer] = wait_texts(slack, "C0001", root["ts"], 1)
    assert answer.endswith("word39")
    updates = slack.calls_to("chat.update")
    assert len(updates) >= 2  # drafts, then the whole answer, in the one message
    stamps = [c.at for c in updates]
    assert all(b - a >= 0.8 for a, b in itertools.pairwise(stamps[:-1]))
    assert len(slack.posted("C0001", root["ts"])) == 1


def test_telegram_edits_one_message_as_the_answer_grows(
    everything: Everything,
) -> None:
    _, _, tg, _ = everything
    tg.queue_update(tg.private_message(LONG))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sent = tg.sent(PRIVATE_CHAT)
        if sent and str(sent[0]["message"]["text"]).endswith("word39"):
            break
        time.sleep(0.1)
    [answer] = tg.sent(PRIVATE_CHAT)
    assert str(answer["message"]["text"]).endswith("word39")
    assert len(tg.calls_to("editMessageText")) >= 1
    assert len(tg.calls_to("sendMessage")) == 1


def test_discord_edits_one_message_as_the_answer_grows(everything: Everything) -> None:
    _, _, _, dc = everything
    message = dc.guild_message(LONG)
    asyncio.run(dc.dispatch("MESSAGE_CREATE", message))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = dc.messages(message["id"])
        if found and found[0]["content"].endswith("word39"):
            break
        time.sleep(0.1)
    [answer] = dc.messages(message["id"])
    assert answer["content"].endswith("word39")
    assert dc.calls_to("PATCH", r".*/channels/\d+/messages/\d+")
    assert len(dc.calls_to("POST", r".*/channels/\d+/messages")) == 1
