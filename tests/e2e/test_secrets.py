"""No configured secret ever shows: not in logs (INFO, DEBUG, JSON lines), not in an HTTP answer
(body or header), not in what the `threadbridge` command prints.

One `threadbridge serve` with every secret set (Slack bot token and signing secret, Telegram
token and webhook secret, Discord token, admin token, agent API keys) carries normal traffic on
every channel and the failures that tend to print what they hold: an agent that is down, one
that refuses its key, a platform that refuses a post, wrong signatures and tokens. Then
everything it wrote and answered is searched for every secret, as is and URL-encoded.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from core.agents.emulators.engage import create_app as engage_app
from core.agents.emulators.openai import create_app as openai_app
from tests.e2e.serve import LISTENING, THREADBRIDGE, ServeProcess
from tests.fakes.discord import FakeDiscord, fake_discord
from tests.fakes.slack import BOT_USER_ID, FakeSlack, app_mention, event_callback, fake_slack, sign
from tests.fakes.telegram import BOT_ID, FakeTelegram, fake_telegram
from tests.servers import run_asgi

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SECRETS = {
    "SLACK_BOT_TOKEN": "xoxb-1111-2222-secretSlackBotToken7q",
    "SLACK_SIGNING_SECRET": "secretSlackSigning3b9Kd2x",
    "TELEGRAM_BOT_TOKEN": f"{BOT_ID}:AAsecretTelegramBotToken-x9Qm2LpA",
    "TELEGRAM_WEBHOOK_SECRET": "secretTelegramWebhook-R4nd0m",
    "DISCORD_BOT_TOKEN": "MTIwMDAwMDAwMDAwMDAwMDAwMQ.GsEcRt.secretDiscordBotToken-abcdefghijk",
    "THREADBRIDGE_ADMIN_TOKEN": "secretAdminToken-Hq93mZ",
    "TB_OPENAI_KEY": "sk-secretOpenaiKey-0000aaaa1111",
    "TB_ENGAGE_KEY": "secretEngageKey-k2J9w",
    "TB_DOWN_KEY": "secretDownAgentKey-P0o9",
    "TB_WRONG_KEY": "sk-secretWrongOpenaiKey-Zz11",
}
ADMIN = SECRETS["THREADBRIDGE_ADMIN_TOKEN"]
MENTION = f"<@{BOT_USER_ID}>"


def leaks(text: str) -> list[str]:
    """The names of the secrets found in `text`, as written or URL-encoded."""
    found = []
    for name, value in SECRETS.items():
        if any(form in text for form in {value, quote(value, safe=""), quote(value)}):
            found.append(name)
    return found


def free_port() -> int:
    """A port nothing listens on: an agent service that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LoggingServe(ServeProcess):
    """`threadbridge serve` with extra options (the log level and format)."""

    def __init__(self, workdir: Path, config: str, env: dict[str, str], args: list[str]) -> None:
        super().__init__(workdir, config, env)
        self.args = args

    def start(self, timeout: float = 60.0) -> str:
        self.starts += 1
        command = [THREADBRIDGE, "serve", "--config", str(self.config), "--port", "0", *self.args]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                command, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = LISTENING.search(self.log_path.read_text(encoding="utf-8", errors="replace"))
            if found:
                self.url = found.group(1)
                return self.url
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"serve did not start in {timeout}s:\n{self.log()}")


def config_text(
    tmp_path: Path,
    *,
    slack: FakeSlack,
    tg: FakeTelegram,
    discord: FakeDiscord,
    openai: str,
    engage: str,
) -> str:
    fast = "timeout_s = 3\nretries = 1\nbackoff_s = 0.05\n"
    return f"""
default_agent = "gpt"

[server]
public_url = "https://bots.example.com"

[store]
url = "sqlite:///{tmp_path}/tb.db"

[bridge]
poll_s = 0.1

[agents.gpt]
service = "openai"
base_url = "{openai}/v1"
api_key_env = "TB_OPENAI_KEY"
model = "gpt-4o-mini"
{fast}
[agents.pensions]
service = "engage-conversations"
base_url = "{engage}"
api_key_env = "TB_ENGAGE_KEY"
org_id_env = "TB_ENGAGE_ORG"
agent = "pensions-questions-latest"
{fast}
[agents.down]
service = "openai"
base_url = "http://127.0.0.1:{free_port()}/v1"
api_key_env = "TB_DOWN_KEY"
model = "gpt-4o-mini"
{fast}
[agents.wrongkey]
service = "openai"
base_url = "{openai}/v1"
api_key_env = "TB_WRONG_KEY"
model = "gpt-4o-mini"
{fast}
[[routes]]
source = "telegram"
agent = "pensions"

[[routes]]
source = "discord"
agent = "down"

[[routes]]
source = "slack"
workspace = "T0001"
channel = "C0002"
agent = "wrongkey"

[web]
enabled = true

[slack]
api_base_url = "{slack.base_url}"
post_rate_per_channel = 0

[telegram]
api_base_url = "{tg.base_url}"
mode = "webhook"

[discord]
api_base_url = "{discord.api_base_url}"
gateway_url = "{discord.gateway_url}"
guild_ready_timeout_s = 0.1
"""


class Seen:
    """Everything the server answered: status, headers and body of each response."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def record(self, response: httpx.Response) -> None:
        response.read()
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
        where = f"{response.request.method} {response.request.url}"
        self.texts.append((where, f"{response.status_code}\n{headers}\n\n{response.text}"))

    def client(self, base_url: str) -> httpx.Client:
        return httpx.Client(
            base_url=base_url,
            timeout=30,
            trust_env=False,
            event_hooks={"response": [self.record]},
        )


def wait_until(
    what: str, done: Callable[[], bool], log: Callable[[], str], timeout: float = 40
) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s\n{log()[-5000:]}")
        time.sleep(0.1)


@pytest.fixture
def world() -> Iterator[dict[str, Any]]:
    tokens = SECRETS
    with ExitStack() as stack:
        yield {
            "slack": stack.enter_context(fake_slack(bot_tokens=(tokens["SLACK_BOT_TOKEN"],))),
            "tg": stack.enter_context(fake_telegram(token=tokens["TELEGRAM_BOT_TOKEN"])),
            "discord": stack.enter_context(fake_discord(token=tokens["DISCORD_BOT_TOKEN"])),
            "openai": stack.enter_context(run_asgi(openai_app(api_keys={tokens["TB_OPENAI_KEY"]}))),
            "engage": stack.enter_context(run_asgi(engage_app(api_keys={tokens["TB_ENGAGE_KEY"]}))),
        }


@pytest.mark.parametrize(
    "log_args",
    [[], ["--log-level", "DEBUG", "--log-format", "json"]],
    ids=["info", "debug-json"],
)
def test_no_secret_in_logs_answers_or_command_output(
    tmp_path: Path, world: dict[str, Any], log_args: list[str]
) -> None:
    slack: FakeSlack = world["slack"]
    tg: FakeTelegram = world["tg"]
    discord: FakeDiscord = world["discord"]
    slack.add_channel("C0002", "random")
    env = {**SECRETS, "TB_ENGAGE_ORG": "org-secrets-test", "PYTHONIOENCODING": "utf-8"}
    serve = LoggingServe(tmp_path, config_text(tmp_path, **world), env, log_args)
    seen = Seen()
    outputs: list[tuple[str, str]] = []
    try:
        serve.start()
        with seen.client(serve.url) as client:
            traffic(client, serve, slack, tg, discord)
            admin(client)
            if not log_args:  # what the commands print does not depend on the server's logs
                outputs = commands(serve, client)
    finally:
        serve.stop()
    log = serve.log()
    for evidence in ("invalid_api_key", "channel_not_found", "cannot reach"):
        assert evidence in log, f"the failure with {evidence!r} did not happen\n{log[-5000:]}"
    if log_args:
        assert '"DEBUG"' in log  # the level and the format really were on
    found = {f"log ({' '.join(log_args) or 'INFO'})": leaks(log)}
    found.update({where: leaks(text) for where, text in seen.texts + outputs})
    assert not {where: names for where, names in found.items() if names}, found
    assert len(seen.texts) > 30 and (log_args or len(outputs) >= 5)


def traffic(
    client: httpx.Client,
    serve: ServeProcess,
    slack: FakeSlack,
    tg: FakeTelegram,
    discord: FakeDiscord,
) -> None:
    """Normal messages on every channel, and the failures."""
    # The web chat, answered by the OpenAI-compatible agent (its key in a header).
    assert client.post("/api/chat/w1", json={"text": "hello from the web"}).status_code == 202
    wait_until("web answer", lambda: len(serve.messages("w1")) >= 2, serve.log)
    client.get("/api/chat/w1/messages")

    # Slack: a signed mention answered; one routed to the agent that refuses its key; bad
    # signatures; and a post Slack refuses.
    secret = SECRETS["SLACK_SIGNING_SECRET"]
    for channel in ("C0001", "C0002"):
        body = json.dumps(event_callback(app_mention(f"{MENTION} hi", channel=channel))).encode()
        headers = {"Content-Type": "application/json", **sign(body, secret)}
        assert client.post("/slack/events", content=body, headers=headers).status_code == 200

    def answered(channel: str) -> list[str]:
        return [t for t in slack.texts(channel) if "is thinking" not in t]

    wait_until("Slack answer", lambda: bool(answered("C0001")), serve.log)
    wait_until("Slack failure notice", lambda: bool(answered("C0002")), serve.log)
    body = json.dumps(event_callback(app_mention(f"{MENTION} forged"))).encode()
    for headers in ({}, sign(body, "not-the-secret"), sign(body, secret, timestamp=1)):
        response = client.post("/slack/events", content=body, headers=headers)
        assert response.status_code == 401
    slack.fail("chat.postMessage", times=20, error="channel_not_found")
    refused = json.dumps(event_callback(app_mention(f"{MENTION} refused"))).encode()
    client.post("/slack/events", content=refused, headers=sign(refused, secret))

    def refused_posts() -> int:
        return sum(not c.response.get("ok") for c in slack.calls_to("chat.postMessage"))

    # The answer comes at once, so there is no placeholder: one post, refused for good.
    wait_until("refused Slack post", lambda: refused_posts() >= 1, serve.log)

    # Telegram by webhook: answered by the Engage agent; a wrong secret refused.
    update = tg.private_message("hello from telegram")
    update["update_id"] = 900_000_001
    hook = {"X-Telegram-Bot-Api-Secret-Token": SECRETS["TELEGRAM_WEBHOOK_SECRET"]}
    assert client.post("/telegram/webhook", json=update, headers=hook).status_code == 200
    wait_until("Telegram answer", lambda: bool(tg.sent()), serve.log)
    wrong = {"X-Telegram-Bot-Api-Secret-Token": "not-the-secret"}
    assert client.post("/telegram/webhook", json=update, headers=wrong).status_code == 403

    # Discord: routed to the agent that is down; the person is told.
    message = discord.guild_message("hello from discord")
    asyncio.run(discord.dispatch("MESSAGE_CREATE", message))
    wait_until("Discord notice", lambda: bool(discord.messages(message["id"])), serve.log)
    time.sleep(1)  # the outbox retries and the failed turn's logs


def admin(client: httpx.Client) -> None:
    """The admin API and pages: refused without the token, then read with it."""
    bearer = {"Authorization": f"Bearer {ADMIN}"}
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": ADMIN}):
        assert client.get("/api/conversations", headers=headers).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    found = client.get("/api/conversations", headers=bearer).json()["items"]
    assert len(found) >= 4, found
    for item in found:
        assert client.get(f"/api/conversations/{item['id']}", headers=bearer).status_code == 200
    for path in ("/api/routes", "/metrics", "/readyz", "/healthz", "/openapi.json", "/"):
        client.get(path, headers=bearer)
    # The pages: a wrong token at the login form, then a session.
    assert client.post("/admin/login", data={"token": "not-the-token"}).status_code == 401
    client.post("/admin/login", data={"token": ADMIN})
    for path in ["/admin", "/admin/conversations", "/admin/routes"] + [
        f"/admin/conversations/{item['id']}" for item in found
    ]:
        assert client.get(path).status_code == 200, path


def commands(serve: ServeProcess, client: httpx.Client) -> list[tuple[str, str]]:
    """What `threadbridge` prints (stdout and stderr) for the admin commands."""
    bearer = {"Authorization": f"Bearer {ADMIN}"}
    ids = [c["id"] for c in client.get("/api/conversations", headers=bearer).json()["items"]]
    runs = [
        ["config", "check"],
        ["conversations", "search"],
        ["conversations", "search", "--json"],
        ["routes", "list"],
        ["doctor", "--json"],
        *(["conversations", "show", i] for i in ids),
        *(["conversations", "show", i, "--json"] for i in ids[:2]),
    ]

    def run(args: list[str]) -> tuple[str, str]:
        done = subprocess.run(
            [THREADBRIDGE, *args, "--config", str(serve.config)],
            cwd=serve.workdir,
            env=serve.env,
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=120,
            check=False,
        )
        return " ".join(args), f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(run, runs))


# -- a refused token at start -----------------------------------------------------------------


@pytest.mark.parametrize("platform", ["slack", "telegram", "discord", "telegram-unreachable"])
def test_a_refused_token_at_start_is_named_not_shown(tmp_path: Path, platform: str) -> None:
    with ExitStack() as stack:
        if platform == "slack":
            fake = stack.enter_context(fake_slack())  # knows another token
            section = f'[slack]\napi_base_url = "{fake.base_url}"'
        elif platform == "discord":
            fake = stack.enter_context(fake_discord())
            section = (
                f'[discord]\napi_base_url = "{fake.api_base_url}"\n'
                f'gateway_url = "{fake.gateway_url}"'
            )
        else:
            fake = stack.enter_context(fake_telegram())
            base = (
                fake.base_url if platform == "telegram" else f"http://127.0.0.1:{free_port()}/bot"
            )
            section = f'[telegram]\napi_base_url = "{base}"'
        config = (
            f'default_agent = "demo"\n[agents.demo]\nservice = "local"\n\n'
            f'[store]\nurl = "sqlite:///{tmp_path}/tb.db"\n\n{section}\n'
        )
        serve = ServeProcess(tmp_path, config, env=SECRETS)
        try:
            with pytest.raises(RuntimeError, match=re.escape("serve exited")) as failed:
                serve.start()
        finally:
            serve.stop()
    assert "_TOKEN" in str(failed.value) or "reach" in str(failed.value), str(failed.value)
    assert not leaks(serve.log()), serve.log()
