"""`threadbridge doctor`, the real command, against the fake platforms and the agent emulators.

Every run also checks that no secret it was given appears in what it printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bots.doctor import Redactor
from bots.doctor.platforms import SLACK_BOT_SCOPES
from core.agents.emulators import load as emulator
from core.config import parse_config
from core.store import Store
from tests.e2e.serve import THREADBRIDGE
from tests.fakes.discord import BOT_TOKEN as DISCORD_TOKEN
from tests.fakes.discord import FakeDiscord, fake_discord
from tests.fakes.slack import APP_TOKEN as SLACK_APP_TOKEN
from tests.fakes.slack import BOT_TOKEN as SLACK_TOKEN
from tests.fakes.slack import FakeSlack, fake_slack
from tests.fakes.telegram import BOT_TOKEN as TELEGRAM_TOKEN
from tests.fakes.telegram import FakeTelegram, fake_telegram
from tests.servers import run_asgi

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "proj-doctor"
# service -> (emulator, the key it accepts, the environment variable holding it)
KEYS = {
    "engage": ("engage-key-0001", "TB_ENGAGE_KEY"),
    "sessions": ("sessions-key-0002", "TB_SESSIONS_KEY"),
    "execute": ("execute-key-0003", "TB_EXECUTE_KEY"),
    "rowboat": ("rowboat-key-0004", "TB_ROWBOAT_KEY"),
    "openai": ("sk-openai-key-0005", "TB_OPENAI_KEY"),
}
SECRETS = {
    "SLACK_BOT_TOKEN": SLACK_TOKEN,
    "SLACK_APP_TOKEN": SLACK_APP_TOKEN,
    "TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
    "DISCORD_BOT_TOKEN": DISCORD_TOKEN,
    "TB_ENGAGE_ORG": "org-doctor-0006",
    **{env: key for key, env in KEYS.values()},
}


def agent_tables(urls: dict[str, str]) -> dict[str, str]:
    """The TOML of one agent per remote service, by agent name."""
    engage = f'base_url = "{urls["engage"]}"\napi_key_env = "TB_ENGAGE_KEY"\n'
    engage += 'org_id_env = "TB_ENGAGE_ORG"\nagent = "pensions"'
    return {
        "pensions": f'service = "engage-conversations"\n{engage}',
        "runs": f'service = "engage-runs"\n{engage}',
        "coach": f'service = "sessions"\nbase_url = "{urls["sessions"]}/api"\n'
        'api_key_env = "TB_SESSIONS_KEY"\nagent_id = "9bb48ef4-b6f7-4dd8-a5ea-ab775e2e8d1b"',
        "helper": f'service = "execute"\nbase_url = "{urls["execute"]}"\n'
        'api_key_env = "TB_EXECUTE_KEY"',
        "payments": f'service = "rowboat"\nbase_url = "{urls["rowboat"]}"\n'
        f'api_key_env = "TB_ROWBOAT_KEY"\nproject_id = "{PROJECT}"',
        "gpt": f'service = "openai"\nbase_url = "{urls["openai"]}/v1"\n'
        'api_key_env = "TB_OPENAI_KEY"\nmodel = "gpt-4o-mini"',
    }


def config(
    db: str,
    agents: dict[str, str] | None = None,
    *,
    slack: FakeSlack | None = None,
    telegram: FakeTelegram | None = None,
    discord: FakeDiscord | None = None,
    extra: str = "",
) -> str:
    text = f'default_agent = "demo"\n{extra}\n[store]\nurl = "{db}"\n\n[agents.demo]\n'
    text += 'service = "local"\n'
    for name, table in (agents or {}).items():
        text += f"\n[agents.{name}]\n{table}\n"
    if slack is not None:
        text += f'\n[slack]\napi_base_url = "{slack.base_url}"\n'
    if telegram is not None:
        text += f'\n[telegram]\napi_base_url = "{telegram.base_url}"\n'
    if discord is not None:
        text += f'\n[discord]\napi_base_url = "{discord.api_base_url}"\n'
    return text


def doctor(
    tmp_path: Path,
    text: str,
    env: dict[str, str] | None = None,
    *,
    table: bool = False,
    timeout: float = 30,
) -> tuple[int, dict[str, dict[str, str]], str]:
    """Run `threadbridge doctor`; (exit code, rows by check name, stdout).

    Checks get `timeout` seconds (the default 5 is too short when the test machine is busy).
    """
    path = tmp_path / "doctor.toml"
    path.write_text(text, encoding="utf-8")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("THREADBRIDGE_")}
    for name in ("SLACK_SIGNING_SECRET", *SECRETS):
        clean.pop(name, None)
    clean.update(PYTHONIOENCODING="utf-8", **(SECRETS if env is None else env))
    args = [THREADBRIDGE, "doctor", "--config", str(path), "--timeout", str(timeout)]
    args += [] if table else ["--json"]
    result = subprocess.run(
        args, capture_output=True, text=True, encoding="utf-8", env=clean, cwd=tmp_path, timeout=90
    )
    output = result.stdout + result.stderr
    given = {**SECRETS, **(env or {})}
    for name, value in given.items():
        assert value not in output, f"the value of {name} was printed:\n{output}"
    assert result.returncode in (0, 1), output
    rows = {} if table else {r["check"]: r for r in json.loads(result.stdout)["checks"]}
    return result.returncode, rows, result.stdout


def statuses(rows: dict[str, dict[str, str]]) -> dict[str, str]:
    return {name: row["status"] for name, row in rows.items()}


def migrated(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path}/tb.db"
    asyncio.run(_migrate(url))
    return url


async def _migrate(url: str, route_to: str | None = None) -> None:
    store = Store(url)
    try:
        await store.migrate()
        if route_to is not None:
            await store.set_route("slack", "T0001", "C0001", route_to, set_by="U0001")
    finally:
        await store.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def urls() -> Iterator[dict[str, str]]:
    """Every emulator, each accepting only its key (rowboat: only project PROJECT)."""
    with ExitStack() as stack:
        found = {}
        for service, (key, _) in KEYS.items():
            options: dict[str, Any] = {"api_keys": {key}}
            if service == "rowboat":
                options["projects"] = {PROJECT}
            found[service] = stack.enter_context(run_asgi(emulator(service)(**options)))
        yield found


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with fake_slack(scopes=SLACK_BOT_SCOPES) as running:
        yield running


@pytest.fixture
def telegram() -> Iterator[FakeTelegram]:
    with fake_telegram() as running:
        yield running


@pytest.fixture
def discord() -> Iterator[FakeDiscord]:
    with fake_discord() as running:
        yield running


def test_the_slack_scopes_are_the_manifests() -> None:
    manifest = yaml.safe_load((ROOT / "config/examples/slack-manifest.yaml").read_text())
    assert tuple(manifest["oauth_config"]["scopes"]["bot"]) == SLACK_BOT_SCOPES


def test_every_secret_the_config_names_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the services and platforms answer passes through the Redactor before printing."""
    tables = agent_tables(dict.fromkeys(KEYS, "http://127.0.0.1:9"))
    raw = tomllib.loads(config("postgresql://tb:db-password-1@127.0.0.1/tb", tables))
    raw |= {"slack": {"bot_token_env": "MY_SLACK"}, "telegram": {}, "discord": {}}
    for name, value in {**SECRETS, "MY_SLACK": "xoxb-mine-0009"}.items():
        monkeypatch.setenv(name, value)
    redactor = Redactor(parse_config(raw, "doctor.toml"))
    named = [v for k, v in SECRETS.items() if k != "SLACK_BOT_TOKEN"]
    named += ["xoxb-mine-0009", "db-password-1"]
    masked = redactor.text(f"said: {' '.join(named)}; {SLACK_TOKEN} is not this config's")
    assert masked == f"said: {' '.join(['***'] * len(named))}; {SLACK_TOKEN} is not this config's"


def test_all_green_exits_0_and_runs_no_agent(
    tmp_path: Path,
    urls: dict[str, str],
    slack: FakeSlack,
    telegram: FakeTelegram,
    discord: FakeDiscord,
) -> None:
    for service in KEYS:
        httpx.post(f"{urls[service]}/_emulator/reset").raise_for_status()
    db = migrated(tmp_path)
    asyncio.run(_migrate(db, route_to="helper"))
    text = config(db, agent_tables(urls), slack=slack, telegram=telegram, discord=discord)
    code, rows, _ = doctor(tmp_path, text)
    assert {name: row for name, row in rows.items() if row["status"] != "ok"} == {}
    assert code == 0, rows
    agents = ["demo", "pensions", "runs", "coach", "helper", "payments", "gpt"]
    assert statuses(rows) == {
        "slack bot token": "ok",
        "slack scopes": "ok",
        "slack app token": "ok",
        "telegram bot token": "ok",
        "telegram webhook": "ok",
        "discord bot token": "ok",
        "discord intents": "ok",
        **{f"agent {name}": "ok" for name in agents},
        "store": "ok",
        "routes": "ok",
    }
    assert "Socket Mode" in rows["slack bot token"]["detail"]
    assert "@tb_test_bot" in rows["telegram bot token"]["detail"]
    assert "model gpt-4o-mini served" in rows["agent gpt"]["detail"]
    assert "1 set by admins" in rows["routes"]["detail"]
    # The probes ran nothing: no agent answered, no conversation was made anywhere.
    assert [(c.method, c.status) for c in slack.calls] == [
        ("auth.test", 200),
        ("apps.connections.open", 200),
    ]
    assert {c.method for c in telegram.calls} == {"getMe", "getWebhookInfo"}
    seen = {
        service: [(r["method"], r["path"]) for r in httpx.get(f"{url}/_emulator/requests").json()]
        for service, url in urls.items()
    }
    assert seen == {
        "engage": [("GET", "/v1/conversations/me")] * 2,
        "sessions": [("GET", "/api/sessions")],
        "execute": [("POST", "/v4/agents/execute")],
        "rowboat": [("POST", f"/api/v1/{PROJECT}/chat")],
        "openai": [("GET", "/v1/models")],
    }
    assert httpx.get(f"{urls['execute']}/_emulator/kept").json() == []

    code, _, out = doctor(tmp_path, text, table=True)
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["check", "status", "detail", "fix"]
    assert set(lines[1]) == {"-", " "}
    assert lines[-1] == "16 checks: 16 ok, 0 failed, 0 skipped"


def test_a_wrong_slack_token(tmp_path: Path, slack: FakeSlack) -> None:
    env = {"SLACK_BOT_TOKEN": "xoxb-not-the-right-one", "SLACK_SIGNING_SECRET": "signing-0007"}
    code, rows, _ = doctor(tmp_path, config(migrated(tmp_path), slack=slack), env)
    assert code == 1
    assert statuses(rows)["slack bot token"] == "FAIL"
    assert "invalid_auth" in rows["slack bot token"]["detail"]
    assert "Bot User OAuth Token" in rows["slack bot token"]["fix"]
    assert statuses(rows)["slack scopes"] == "skip"
    assert "slack app token" not in rows  # HTTP events mode: there is none


def test_a_missing_slack_scope(tmp_path: Path) -> None:
    granted = tuple(s for s in SLACK_BOT_SCOPES if s not in ("im:write", "users:read"))
    with fake_slack(scopes=granted) as slack:
        code, rows, _ = doctor(tmp_path, config(migrated(tmp_path), slack=slack))
    assert code == 1
    assert statuses(rows)["slack bot token"] == "ok"
    scopes = rows["slack scopes"]
    assert (scopes["status"], scopes["detail"]) == ("FAIL", "missing im:write, users:read")
    assert "reinstall the app" in scopes["fix"]


def test_a_slack_section_without_its_token(tmp_path: Path, slack: FakeSlack) -> None:
    code, rows, _ = doctor(tmp_path, config(migrated(tmp_path), slack=slack), env={})
    assert code == 1
    assert rows["slack bot token"]["status"] == "FAIL"
    assert rows["slack bot token"]["fix"].startswith("export SLACK_BOT_TOKEN=")


@pytest.mark.parametrize(
    ("mode", "registered", "status", "fix"),
    [
        ("polling", "https://old.example.com/telegram/webhook", "FAIL", "deletes it at start"),
        ("webhook", "https://old.example.com/telegram/webhook", "FAIL", "set public_url"),
        ("webhook", None, "FAIL", "it registers https://bots.example.com/telegram/webhook"),
        ("webhook", "https://bots.example.com/telegram/webhook", "ok", ""),
    ],
)
def test_the_telegram_webhook_against_the_mode(
    tmp_path: Path,
    telegram: FakeTelegram,
    mode: str,
    registered: str | None,
    status: str,
    fix: str,
) -> None:
    if registered:
        set_hook = f"{telegram.base_url}{TELEGRAM_TOKEN}/setWebhook"
        assert httpx.post(set_hook, data={"url": registered}).json()["ok"]
    extra = '[server]\npublic_url = "https://bots.example.com"\n'
    text = config(migrated(tmp_path), telegram=telegram, extra=extra)
    text += f'mode = "{mode}"\n'
    env = {"TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN, "TELEGRAM_WEBHOOK_SECRET": "hook-secret-0008"}
    code, rows, _ = doctor(tmp_path, text, env)
    assert (code, rows["telegram webhook"]["status"]) == (1 if status == "FAIL" else 0, status)
    assert fix in rows["telegram webhook"]["fix"]
    assert rows["telegram bot token"]["status"] == "ok"
    assert not telegram.calls_to("setWebhook")[1:] and not telegram.calls_to("deleteWebhook")


def test_a_discord_app_without_the_message_content_intent(tmp_path: Path) -> None:
    with fake_discord(privileged_intents=()) as discord:
        text = config(migrated(tmp_path), discord=discord)
        code, rows, _ = doctor(tmp_path, text)
        assert code == 1
        assert statuses(rows) == {
            "discord bot token": "ok",
            "discord intents": "FAIL",
            "agent demo": "ok",
            "store": "ok",
            "routes": "ok",
        }
        assert "Privileged Gateway Intents" in rows["discord intents"]["fix"]

        code, rows, _ = doctor(tmp_path, text + "message_content = false\n")
        assert (code, rows["discord intents"]["status"]) == (0, "skip")


def test_agents_with_a_wrong_key(tmp_path: Path, urls: dict[str, str]) -> None:
    tables = agent_tables(urls)
    env = {**SECRETS, **{env: f"wrong-{key}" for key, env in KEYS.values()}}
    code, rows, _ = doctor(tmp_path, config(migrated(tmp_path), tables), env)
    assert code == 1
    for agent in tables:
        row = rows[f"agent {agent}"]
        assert row["status"] == "FAIL", row
        assert "refused the key in TB_" in row["detail"]
        assert row["fix"].startswith("set TB_")
    assert "(HTTP 403)" in rows["agent payments"]["detail"]  # RowBoat's word for a bad key
    assert "TB_ENGAGE_ORG" in rows["agent pensions"]["fix"]
    assert statuses(rows)["store"] == "ok"


def test_an_unreachable_agent_and_a_missing_key(tmp_path: Path, urls: dict[str, str]) -> None:
    port = closed_port()
    tables = agent_tables({**urls, "openai": f"http://127.0.0.1:{port}"})
    env = {k: v for k, v in SECRETS.items() if k != "TB_SESSIONS_KEY"}
    code, rows, _ = doctor(tmp_path, config(migrated(tmp_path), tables), env)
    assert code == 1
    assert statuses(rows)["agent gpt"] == "FAIL"
    assert f"cannot reach http://127.0.0.1:{port}/v1" in rows["agent gpt"]["detail"]
    assert "agents.gpt.base_url" in rows["agent gpt"]["fix"]
    assert statuses(rows)["agent coach"] == "FAIL"
    assert rows["agent coach"]["detail"] == "TB_SESSIONS_KEY (agents.coach.api_key_env) is not set"
    assert rows["agent coach"]["fix"] == "export TB_SESSIONS_KEY=…"
    assert statuses(rows)["agent helper"] == "ok"


def test_a_wrong_project_and_an_unserved_model(tmp_path: Path, urls: dict[str, str]) -> None:
    tables = agent_tables(urls)
    tables["payments"] = tables["payments"].replace(PROJECT, "no-such-project")
    tables["gpt"] = tables["gpt"].replace("gpt-4o-mini", "gpt-9")
    code, rows, _ = doctor(tmp_path, config(migrated(tmp_path), tables))
    assert code == 1
    assert "project_id" in rows["agent payments"]["fix"]
    assert "model 'gpt-9' is not among those it serves" in rows["agent gpt"]["detail"]


def test_slow_services_time_out_together(tmp_path: Path) -> None:
    key, env = KEYS["openai"]
    names = ("gpt", "gpt2", "gpt3", "gpt4")
    with run_asgi(emulator("openai")(api_keys={key})) as slow:
        table = agent_tables(dict.fromkeys(KEYS, slow))["gpt"]
        text = config(migrated(tmp_path), dict.fromkeys(names, table))
        started = time.monotonic()
        assert doctor(tmp_path, text, {env: key})[0] == 0
        baseline = time.monotonic() - started  # starting the process, mostly
        fault = {"status": 0, "delay_s": 60, "times": len(names)}
        assert httpx.post(f"{slow}/_emulator/faults", json=fault).status_code == 200
        started = time.monotonic()
        code, rows, _ = doctor(tmp_path, text, {env: key}, timeout=3)
        took = time.monotonic() - started
    assert code == 1
    for name in names:
        assert rows[f"agent {name}"]["status"] == "FAIL"
        detail = rows[f"agent {name}"]["detail"]
        assert "timed out after 2.4s" in detail or "no answer within 3 s" in detail, detail
        assert "agents." in rows[f"agent {name}"]["fix"]
    # One after another, the waits alone would take 4 x 2.4 s or more.
    assert took - baseline < 7, (took, baseline)


def test_an_unmigrated_store(tmp_path: Path, store_url: str) -> None:
    if store_url.startswith("sqlite"):
        code, rows, _ = doctor(tmp_path, config(store_url))
        assert code == 1
        assert "no database file yet" in rows["store"]["detail"]
        assert not (tmp_path / "tb.db").exists()  # the doctor made nothing
        (tmp_path / "tb.db").touch()
    code, rows, _ = doctor(tmp_path, config(store_url))
    assert code == 1
    assert statuses(rows) == {"agent demo": "ok", "store": "FAIL", "routes": "skip"}
    assert "at revision none (not migrated)" in rows["store"]["detail"]
    assert rows["store"]["fix"].startswith("run `threadbridge db upgrade`")

    asyncio.run(_migrate(store_url, route_to="retired"))
    code, rows, _ = doctor(tmp_path, config(store_url))
    assert code == 1
    assert statuses(rows) == {"agent demo": "ok", "store": "ok", "routes": "FAIL"}
    assert "slack/T0001/C0001 → 'retired'" in rows["routes"]["detail"]
    assert "one of: demo" in rows["routes"]["fix"]

    code, rows, _ = doctor(tmp_path, config(store_url, {"retired": 'service = "local"'}))
    assert code == 0
