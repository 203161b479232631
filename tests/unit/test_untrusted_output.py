"""What an agent writes is untrusted: it never notifies a whole channel, never pings anyone, and
never becomes markup in the web chat or the admin pages.

Slack: the mrkdwn rendering escapes `<`, `>` and `&`, so `<!channel>`, `<!here>`, `<!everyone>`,
`<@U123>`, `<#C1>` and `<!subteam^…>` show as text; the post asks Slack for no `link_names` or
`parse`, so a bare `@channel` stays text too. Discord: every send (and the client's default, used
by edits) allows no mentions. Telegram: HTML parse mode with everything escaped (it has no
channel-wide mention). Web chat and admin pages: checked in Chromium, where a script would run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.discord.app import DiscordAdapter
from adapters.discord.config import DiscordConfig
from adapters.slack.convert import post_args
from adapters.slack.format import to_mrkdwn
from adapters.telegram.format import split_html, to_html
from core.model import ThreadRef
from tests.fakes.discord import BOT_TOKEN as DISCORD_BOT_TOKEN
from tests.fakes.discord import FakeDiscord, fake_discord
from tests.fakes.slack import BOT_TOKEN as SLACK_BOT_TOKEN
from tests.fakes.slack import BOT_USER_ID as SLACK_BOT_USER
from tests.fakes.slack import FakeSlack, app_mention, event_callback, fake_slack, sign
from tests.fakes.telegram import BOT_TOKEN as TELEGRAM_BOT_TOKEN
from tests.fakes.telegram import FakeTelegram, fake_telegram, parse_html
from tests.servers import run_asgi

HOSTILE = [
    "<!channel> read this",
    "<!here|here> and <!everyone>",
    "ping <@U0001> and <@U0002|bob> in <#C0001|general>",
    "<!subteam^S0123|@oncall> wake up",
    "<!date^1392734382^{date}|Feb 18>",
    "@channel @here @everyone (bare words)",
    "&lt;!channel&gt; written pre-escaped",
    "<https://example.com|<!channel>>",
    "[<!here>](https://example.com) and ![<@U1>](https://example.com/a.png)",
    "<mailto:a@b.test|<!everyone>>",
    "`<!channel>` in code and\n```\n<!here>\n```",
    "> <!channel> in a quote",
    "- <!channel> in a list",
    "*<!channel>* _<@U1>_ ~<!here>~",
    "<script>alert(1)</script> <img src=x onerror=alert(1)>",
    '[click](javascript:alert(1)) [x](https://a.test/"onmouseover="alert(1))',
]
# A Slack control sequence: a special mention, a user, a channel, a user group, a date.
SLACK_CONTROL = re.compile(r"<[!@#]")
# Every `<` the rendering writes opens a link it built itself.
OUR_LINK = re.compile(r"<(?:https?://|mailto:)[^<>]*>")


def slack_notifies(text: str) -> list[str]:
    """What Slack would read as a control sequence in `text`: any `<` but our links'."""
    return SLACK_CONTROL.findall(text) + re.findall("<", OUR_LINK.sub("", text))


@pytest.mark.parametrize("answer", HOSTILE)
def test_slack_shows_mentions_in_an_answer_as_text(answer: str) -> None:
    rendered = to_mrkdwn(answer)
    assert not slack_notifies(rendered), rendered
    for word in ("channel", "here", "everyone", "U0001", "subteam"):
        assert (word in answer) <= (word in rendered), (answer, rendered)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    answer=st.lists(
        st.one_of(
            st.sampled_from(HOSTILE),
            st.sampled_from(list("<>&!@#|^*_~`[]()\n ")),
            st.text(max_size=5),
        ),
        max_size=20,
    ).map("".join)
)
def test_slack_never_gets_a_control_sequence_from_any_answer(answer: str) -> None:
    assert not slack_notifies(to_mrkdwn(answer)), answer


def test_a_slack_post_asks_for_no_linking_of_bare_names() -> None:
    thread = ThreadRef("slack", "T0001", "C0001", "1700000000.000100")
    args = post_args(thread, to_mrkdwn("@channel @here"))
    assert "link_names" not in args and "parse" not in args, args
    assert args["text"] == "@channel @here"


async def test_the_discord_client_allows_no_mention_by_default() -> None:
    adapter = DiscordAdapter(DiscordConfig())
    client = adapter._make_client()
    try:
        # Edits of a streamed answer use the client's default; sends pass none() as well
        # (tests/e2e/test_discord.py checks what the fake Discord received).
        assert client.allowed_mentions is not None
        assert client.allowed_mentions.to_dict() == {"parse": []}
    finally:
        await client.close()


TELEGRAM_KINDS = {"bold", "italic", "underline", "strikethrough", "code", "pre", "text_link"}


@pytest.mark.parametrize("answer", HOSTILE)
def test_telegram_gets_escaped_html_that_keeps_the_text(answer: str) -> None:
    html = to_html(answer)
    for part in split_html(html):
        parse_html(part)  # what Telegram would accept; raises on stray markup
    shown, entities = parse_html(html)
    assert {e["type"] for e in entities} <= TELEGRAM_KINDS | {"blockquote", "spoiler"}, entities
    for entity in entities:
        if entity["type"] == "text_link":
            assert entity["url"].startswith(("http://", "https://", "mailto:", "tg://")), entity
    for literal in ("<script>", "<!channel>", "onerror"):
        if literal in answer and "`" not in answer:
            assert literal in shown, (answer, shown)


# -- what each platform receives, and the pages, from the real app on loopback ---------------

CHROMIUM = "/usr/bin/chromium"
PWN = [
    "<script>window.pwned = 'script'</script>",
    "<img src=x onerror=\"window.pwned = 'img'\">",
    "<svg onload=\"window.pwned = 'svg'\"></svg>",
    "[click](javascript:window.pwned='js-link')",
    "[x](https://example.com/\"onmouseover=\"window.pwned='attr')",
    "[<img src=x onerror=\"window.pwned='label'\">](https://example.com)",
    "**<b onmouseover=\"window.pwned='bold'\">b</b>** `<i>code</i>`",
    "```\n<script>window.pwned = 'fence'</script>\n```",
    "<iframe src=\"javascript:window.pwned='frame'\"></iframe>",
]
# What the demo agent answers, whatever it is asked (its greeting).
ANSWER = "\n\n".join(HOSTILE + PWN)
SIGNING_SECRET = "untrusted-signing-secret"
WEBHOOK_SECRET = "untrusted-webhook-secret"


@dataclass
class Site:
    root: str
    slack: FakeSlack
    tg: FakeTelegram
    discord: FakeDiscord


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The real app on loopback, with Slack, Telegram and Discord on their fakes."""
    from bots.app import App
    from bots.http import create_app
    from core.config import parse_config

    tmp = tmp_path_factory.mktemp("untrusted")
    with ExitStack() as stack:
        slack = stack.enter_context(fake_slack())
        tg = stack.enter_context(fake_telegram())
        discord = stack.enter_context(fake_discord())
        raw = {
            "default_agent": "demo",
            "server": {"public_url": "https://bots.example.com"},
            "store": {"url": f"sqlite+aiosqlite:///{tmp}/tb.db"},
            "bridge": {"poll_s": 0.05},
            "admin": {"token_env": "TB_UNTRUSTED_TEST_NO_TOKEN"},  # none: loopback only
            "agents": {"demo": {"service": "local", "greeting": ANSWER}},
            "web": {"enabled": True},
            "slack": {"api_base_url": slack.base_url, "post_rate_per_channel": 0},
            "telegram": {"api_base_url": tg.base_url, "mode": "webhook"},
            "discord": {
                "api_base_url": discord.api_base_url,
                "gateway_url": discord.gateway_url,
                "guild_ready_timeout_s": 0.1,
            },
        }
        env = stack.enter_context(pytest.MonkeyPatch.context())
        for name, value in {
            "SLACK_BOT_TOKEN": SLACK_BOT_TOKEN,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "TELEGRAM_BOT_TOKEN": TELEGRAM_BOT_TOKEN,
            "TELEGRAM_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "DISCORD_BOT_TOKEN": DISCORD_BOT_TOKEN,
        }.items():
            env.setenv(name, value)
        config = parse_config(raw, str(tmp / "threadbridge.toml"))
        root = stack.enter_context(run_asgi(create_app(App(config))))
        yield Site(root, slack, tg, discord)


def eventually(what: str, found: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := found()):
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.05)
    return result


def test_slack_receives_the_answer_with_no_mention_in_it(site: Site) -> None:
    mention = app_mention(f"<@{SLACK_BOT_USER}> tell me")
    body = json.dumps(event_callback(mention)).encode()
    headers = {"Content-Type": "application/json", **sign(body, SIGNING_SECRET)}
    assert httpx.post(f"{site.root}/slack/events", content=body, headers=headers).status_code == 200
    eventually("answer", lambda: any("channel" in t for t in site.slack.texts("C0001")))
    sent = [c.params for c in site.slack.calls if c.method in ("chat.postMessage", "chat.update")]
    for params in sent:
        assert not slack_notifies(params["text"]), params["text"]
        assert not {"link_names", "parse", "blocks"} & params.keys(), params


def test_telegram_receives_the_answer_as_escaped_html(site: Site) -> None:
    update = {"update_id": 1, **site.tg.private_message("tell me")}
    hook = {"X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET}
    response = httpx.post(f"{site.root}/telegram/webhook", json=update, headers=hook)
    assert response.status_code == 200
    eventually(
        "whole answer", lambda: "iframe" in "".join(p["message"]["text"] for p in site.tg.sent())
    )
    parts = site.tg.sent()
    shown = "".join(p["message"]["text"] for p in parts)
    assert "<script>window.pwned" in shown and "<!channel>" in shown
    for part in parts:
        assert part["parse_mode"] == "HTML"
        kinds = {e["type"] for e in part["message"].get("entities", [])}
        assert kinds <= TELEGRAM_KINDS | {"blockquote", "url", "email", "mention"}, kinds


def test_discord_receives_the_answer_with_mentions_disabled(site: Site) -> None:
    message = site.discord.guild_message("tell me")
    asyncio.run(site.discord.dispatch("MESSAGE_CREATE", message))
    eventually(
        "whole answer",
        lambda: "iframe" in "".join(p["content"] for p in site.discord.messages(message["id"])),
    )
    parts = site.discord.messages(message["id"])
    assert "@everyone" in "".join(p["content"] for p in parts)
    assert all(p["allowed_mentions"] == {"parse": []} for p in parts), parts


@pytest.fixture
def page() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("Chromium is not installed here (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            opened = browser.new_page()
            opened.on("dialog", lambda dialog: dialog.dismiss())
            yield opened
        finally:
            browser.close()


def web_answer(root: str, thread: str, text: str) -> None:
    assert httpx.post(f"{root}/api/chat/{thread}", json={"text": text}).status_code == 202

    def answered() -> bool:
        found = httpx.get(f"{root}/api/chat/{thread}/messages", timeout=10).json()
        return any(m["role"] == "agent" for m in found)

    eventually("web answer", answered)


def assert_inert(page: Any, where: str) -> None:
    """Nothing in `where` ran or can run: no script, no handler, no javascript: link."""
    page.wait_for_timeout(300)  # an onerror or onload would have fired by now
    assert page.evaluate("window.pwned") is None
    found = page.evaluate(
        """where => {
            const root = document.querySelector(where);
            const all = [...root.querySelectorAll("*")];
            const names = all.flatMap(e => [...e.attributes].map(a => a.name));
            const linked = [...root.querySelectorAll("[href],[src]")];
            return {
                tags: all.map(e => e.tagName.toLowerCase()),
                handlers: names.filter(n => n.startsWith("on")),
                links: linked.map(e => e.getAttribute("href") || e.getAttribute("src")),
                text: root.textContent,
            };
        }""",
        where,
    )
    assert not {"script", "img", "svg", "iframe", "object", "embed"} & set(found["tags"]), found
    assert not found["handlers"], found
    safe = ("http://", "https://", "/", "#", "?")
    assert all(link.startswith(safe) for link in found["links"]), found
    assert "<script>" in found["text"] and "onerror" in found["text"], found["text"]


def test_the_web_chat_shows_a_hostile_answer_as_text(site: Site, page: Any) -> None:
    web_answer(site.root, "hostile", PWN[0])
    page.goto(f"{site.root}/#thread=hostile")
    page.wait_for_selector("#log .msg.agent")
    assert_inert(page, "#log")


def test_the_admin_transcript_shows_a_hostile_answer_as_text(site: Site, page: Any) -> None:
    web_answer(site.root, "hostile-admin", PWN[1])
    found = httpx.get(f"{site.root}/api/conversations", params={"source": "web"}).json()
    [conversation] = [c for c in found["items"] if c["thread_key"].endswith("/hostile-admin")]
    page.goto(f"{site.root}/admin/conversations/{conversation['id']}")
    page.wait_for_selector("#transcript")
    assert_inert(page, "#transcript")
