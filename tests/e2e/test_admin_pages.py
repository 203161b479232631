"""The /admin pages of the real `threadbridge serve`, driven in headless Chromium (Debian's
`chromium`, through Playwright's `executable_path`: no browser is downloaded).

One browser for the module; one server with an admin token, one without. Conversations come
from the web chat API (the demo agent answers them) and, for Slack and Discord, through the
store's own write path before the server starts.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from bots.admin.session import SESSION_S, AdminAuth, safe_next
from bots.app import check_admin_exposure
from core.config import parse_config
from core.errors import ConfigError
from tests.e2e import admin_seed
from tests.e2e.serve import THREADBRIDGE, ServeProcess

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
TOKEN = "admin-pages-e2e-token-0123456789"
PHONE = {"width": 375, "height": 812}
DASH = "\u2013"  # the search page writes "1-25 of 132" with an en dash

CONFIG = """
default_agent = "demo"

[store]
url = "sqlite+aiosqlite:///{db}"

[bridge]
poll_s = 0.05

[agents.demo]
service = "local"

[agents.other]
service = "local"
greeting = "I am the other agent."

[[routes]]
source = "web"
channel = "lobby"
agent = "other"

[web]
enabled = true
"""


class AdminServe(ServeProcess):
    """A server whose store was seeded first; `seeded` holds those conversations' ids."""

    seeded: dict[str, str]


def start_server(workdir: Path, token: str | None) -> AdminServe:
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "tb.db"
    url = f"sqlite+aiosqlite:///{db}"
    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API holds this thread's event loop
        ids = pool.submit(lambda: asyncio.run(admin_seed.seed(url))).result(timeout=60)
    process = AdminServe(workdir, CONFIG.format(db=db))
    process.seeded = ids
    process.env.pop("THREADBRIDGE_ADMIN_TOKEN", None)
    if token is not None:
        process.env["THREADBRIDGE_ADMIN_TOKEN"] = token
    try:
        process.start()
    except BaseException:
        process.stop()
        raise
    for name in ("ann", "bob", "cy"):
        assert process.post(f"web-{name}", f"hello from {name}", user=name).status_code == 202
    for name in ("ann", "bob", "cy"):
        process.wait_messages(f"web-{name}", 2)
    return process


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("Chromium is not installed here (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminServe]:
    process = start_server(tmp_path_factory.mktemp("admin-token"), TOKEN)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminServe]:
    process = start_server(tmp_path_factory.mktemp("admin-open"), None)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def context(browser: Browser, server: AdminServe) -> Iterator[BrowserContext]:
    made = browser.new_context(base_url=server.url)
    made.set_default_timeout(10_000)
    # The pages run no script and load nothing from elsewhere: Chromium must report no
    # Content-Security-Policy refusal and no error but the 4xx statuses the tests ask for.
    complaints: list[str] = []
    made.on("console", lambda m: complaints.append(m.text) if m.type == "error" else None)
    made.on("weberror", lambda e: complaints.append(str(e.error)))
    try:
        yield made
    finally:
        made.close()
    assert [c for c in complaints if not c.startswith("Failed to load resource")] == []


def log_in(context: BrowserContext, token: str = TOKEN, start: str = "/admin") -> Page:
    page = context.new_page()
    page.goto(start)
    expect(page).to_have_url(re.compile(r"/admin/login\?next="))
    page.fill("input[name=token]", token)
    page.click("form.stack button[type=submit]")
    return page


def no_horizontal_scroll(page: Page) -> None:
    wide, seen = page.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert wide <= seen, f"{page.url}: {wide}px wide in a {seen}px viewport"


def csrf_of(page: Page, form: str = "#set-route") -> str:
    return str(page.locator(f"{form} input[name=csrf]").get_attribute("value"))


def cookie_header(context: BrowserContext) -> dict[str, str]:
    jar = {c["name"]: c["value"] for c in context.cookies()}
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in jar.items())}


# -- with a token --------------------------------------------------------------------------


def test_a_wrong_token_is_refused_and_the_right_one_sets_a_strict_httponly_cookie(
    context: BrowserContext,
) -> None:
    page = log_in(context, token="not-the-token", start="/admin/conversations?source=web")
    expect(page.locator(".error")).to_have_text("That is not the admin token.")
    assert context.cookies() == []
    page.fill("input[name=token]", TOKEN)
    page.click("form.stack button[type=submit]")
    expect(page).to_have_url(re.compile(r"/admin/conversations\?source=web$"))
    [cookie] = context.cookies()
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/admin"
    assert TOKEN not in cookie["value"]
    assert 0 < cookie["expires"] - time.time() <= SESSION_S + 5
    expect(page.locator("#no-token-banner")).to_have_count(0)


def test_search_by_source_then_open_a_transcript_with_its_platform_link(
    context: BrowserContext, server: AdminServe
) -> None:
    page = log_in(context, start="/admin/conversations")
    page.select_option("select[name=source]", "web")
    page.click("#search-form button[type=submit]")
    expect(page.locator("#result-count")).to_have_text(re.compile(f"1{DASH}3 of 3 conversations"))
    expect(page.locator("#results tbody tr")).to_have_count(3)
    for cell in page.locator("#results td[data-label=source]").all_inner_texts():
        assert cell == "web"

    page.goto("/admin/conversations?text=order+42")
    expect(page.locator("#results tbody tr")).to_have_count(1)
    page.goto("/admin/conversations")
    page.select_option("select[name=source]", "slack")
    page.click("#search-form button[type=submit]")
    expect(page.locator("#result-count")).to_have_text(re.compile(rf"1{DASH}1 of 1 conversation\b"))
    page.click("#results tbody tr a")

    seeded = server.seeded
    expect(page).to_have_url(re.compile(f"/admin/conversations/{seeded['slack']}$"))
    facts = page.locator("#facts")
    expect(facts).to_contain_text(admin_seed.SLACK_REMOTE_ID)
    expect(facts).to_contain_text("demo")
    expect(facts).to_contain_text("failed")
    link = page.locator("#platform-link")
    expect(link).to_have_attribute("href", admin_seed.SLACK_DATA["permalink"])
    transcript = page.locator("#transcript")
    expect(transcript.locator(".msg")).to_have_count(3)
    expect(transcript.locator(".msg.user")).to_contain_text("Ann Admin")
    expect(transcript.locator(".msg.user")).to_contain_text("Where is order 42?")
    expect(transcript.locator(".msg.agent .call")).to_contain_text("lookup_order")
    expect(transcript.locator(".msg.agent .call pre")).to_contain_text('"order_id": "42"')
    expect(transcript.locator(".msg.tool")).to_contain_text("call_1")
    expect(transcript.locator("time").first).to_have_text(re.compile(r"\d{4}-\d\d-\d\d .* UTC"))
    expect(page.locator("#failures")).to_contain_text(admin_seed.SLACK_FAILURE)

    page.goto(f"/admin/conversations/{seeded['discord']}")
    expect(page.locator("#platform-link")).to_have_attribute(
        "href", admin_seed.DISCORD_DATA["jump_url"]
    )


def test_paging_and_bad_filters(context: BrowserContext) -> None:
    page = log_in(context, start="/admin/conversations?limit=2")
    expect(page.locator("#result-count")).to_have_text(re.compile(f"1{DASH}2 of 5 "))
    page.click("a[rel=next]")
    expect(page.locator("#result-count")).to_have_text(re.compile(f"3{DASH}4 of 5 "))
    page.click("a[rel=next]")
    expect(page.locator("#result-count")).to_have_text(re.compile(f"5{DASH}5 of 5 "))
    expect(page.locator("a[rel=next]")).to_have_count(0)
    page.click("a[rel=prev]")
    expect(page.locator("#result-count")).to_have_text(re.compile(f"3{DASH}4 of 5 "))

    answer = page.goto("/admin/conversations?limit=lots&status=lost")
    assert answer is not None and answer.status == 422
    errors = page.locator("ul.error")
    expect(errors).to_contain_text("limit 'lots': a whole number")
    expect(errors.locator("li", has_text="status: ")).to_contain_text("open")
    expect(page.locator("select[name=status]")).to_have_value("")
    # The filters are read by core.search, as the CLI's and the API's are: the page says why.
    for query, error in [
        ("since=yesterday", "since: "),
        ("data=ticket", "data: "),
        ("since=2030-01-02&until=2030-01-01", "until: "),
    ]:
        answer = page.goto(f"/admin/conversations?{query}")
        assert answer is not None and answer.status == 422
        expect(page.locator("ul.error")).to_contain_text(error)
    page.goto("/admin/conversations?data=ticket%3DT-42")
    expect(page.locator("#results tbody tr")).to_have_count(1)
    expect(page.locator("input[name=data]").first).to_have_value("ticket=T-42")
    answer = page.goto("/admin/conversations/no-such-id")
    assert answer is not None and answer.status == 404


def test_set_a_route_see_the_audit_entry_then_unset_it(context: BrowserContext) -> None:
    page = log_in(context, start="/admin/routes")
    page.select_option("#set-route select[name=source]", "slack")
    page.fill("#set-route input[name=workspace]", "T0ADMIN")
    page.fill("#set-route input[name=channel]", "C0NEW")
    page.select_option("#set-route select[name=agent]", "other")
    page.click("#set-route button[type=submit]")
    expect(page.locator(".ok")).to_have_text("Route saved.")
    row = page.locator("#routes tbody tr.admin", has_text="C0NEW")
    expect(row.locator("td[data-label=tier]")).to_have_text("channel")
    expect(row.locator("td[data-label=agent]")).to_have_text("other")
    expect(row.locator("td[data-label='set by']")).to_have_text("admin-page")
    expect(row.locator("td[data-label=when]")).to_have_text(re.compile(r"UTC$"))
    expect(page.locator("#routes tr.config", has_text="lobby")).to_have_count(1)

    audit = page.locator("#audit tbody tr", has_text="C0NEW").first
    expect(audit).to_contain_text("admin-page")
    expect(audit).to_contain_text("→ other")

    page.fill("input[name=explain]", "slack:T0ADMIN/C0NEW/1712345678.000200")
    page.click("form.row button[type=submit]")
    expect(page.locator("#explained tr.chosen")).to_contain_text("slack/T0ADMIN/C0NEW (admin)")
    expect(page.locator("#explained tr.chosen td[data-label=agent]")).to_have_text("other")

    row.locator("button", has_text="Unset").click()
    expect(page.locator(".ok")).to_have_text("Route removed.")
    expect(page.locator("#routes tbody tr", has_text="C0NEW")).to_have_count(0)
    expect(page.locator("#audit tbody tr", has_text="C0NEW")).to_have_count(2)


def test_route_form_errors_and_csrf(context: BrowserContext, server: AdminServe) -> None:
    page = log_in(context, start="/admin/routes")
    page.select_option("#set-route select[name=source]", "slack")
    page.fill("#set-route input[name=channel]", "C0ORPHAN")
    page.click("#set-route button[type=submit]")
    expect(page.locator("#route-error")).to_contain_text("channel route needs its workspace")
    expect(page.locator("#set-route input[name=channel]")).to_have_value("C0ORPHAN")

    headers = cookie_header(context)
    form = {"source": "web", "workspace": "", "channel": "x", "agent": "demo"}
    url = f"{server.url}/admin/routes"
    refused = httpx.post(url, data=form, headers=headers)
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["detail"]
    wrong = httpx.post(
        url, data={**form, "agent": "nobody", "csrf": csrf_of(page)}, headers=headers
    )
    assert wrong.status_code == 422
    assert "unknown agent 'nobody'" in html.unescape(wrong.text)
    anonymous = httpx.post(url, data={**form, "csrf": csrf_of(page)})
    assert anonymous.status_code == 303
    assert anonymous.headers["location"].startswith("/admin/login")
    as_json = httpx.post(url, json={**form, "csrf": csrf_of(page)}, headers=headers)
    assert as_json.status_code == 415
    page.goto("/admin/routes")
    expect(
        page.locator("#routes td[data-label=channel]", has_text=re.compile("^x$"))
    ).to_have_count(0)


def test_log_out_ends_the_session(context: BrowserContext) -> None:
    page = log_in(context)
    expect(page.locator("h1")).to_have_text("Overview")
    page.click("button:has-text('Log out')")
    expect(page).to_have_url(re.compile(r"/admin/login$"))
    assert context.cookies() == []
    page.goto("/admin/routes")
    expect(page).to_have_url(re.compile(r"/admin/login\?next=%2Fadmin%2Froutes$"))


def test_overview_draws_conversations_per_source_and_lists_failed_turns(
    context: BrowserContext,
) -> None:
    page = log_in(context)
    chart = page.locator("svg.chart")
    expect(chart).to_have_count(1)
    for source in ("web", "slack", "discord"):
        expect(chart.locator("rect title", has_text=f" {source}: ")).to_have_count(1)
    expect(chart.locator("rect title", has_text=" web: 3")).to_have_count(1)
    expect(page.locator("#failed-turns")).to_contain_text(admin_seed.SLACK_FAILURE)
    expect(page.locator(".legend")).to_contain_text("discord")


def test_pages_fit_a_phone_screen(browser: Browser, server: AdminServe) -> None:
    phone = browser.new_context(base_url=server.url, viewport=PHONE, is_mobile=True)
    try:
        page = log_in(phone, start="/admin/conversations")
        expect(page.locator("#results tbody tr")).to_have_count(5)
        no_horizontal_scroll(page)
        seeded = server.seeded
        for path in ("/admin", "/admin/routes", f"/admin/conversations/{seeded['slack']}"):
            page.goto(path)
            no_horizontal_scroll(page)
        size = page.evaluate("getComputedStyle(document.body).fontSize")
        assert float(size.removesuffix("px")) >= 16
    finally:
        phone.close()


def test_the_api_still_takes_the_bearer_token(server: AdminServe) -> None:
    api = f"{server.url}/api/conversations"
    assert httpx.get(api).status_code == 401
    answer = httpx.get(
        api, params={"source": "slack"}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert answer.status_code == 200
    assert answer.json()["total"] == 1
    page = httpx.get(f"{server.url}/admin", headers={"Authorization": f"Bearer {TOKEN}"})
    assert page.status_code == 303  # the pages take the session cookie only


def test_schemathesis_finds_no_server_error_in_the_admin_api(server: AdminServe) -> None:
    import schemathesis
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json").include(
        path_regex=r"^/api/(conversations|routes)"
    )
    headers = {"Authorization": f"Bearer {TOKEN}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, "the admin API is missing from /openapi.json"
    per_operation = max(20, 320 // len(operations))
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + 60
    for operation in operations:
        valid = operation.as_strategy(schemathesis.GenerationMode.POSITIVE)
        invalid = operation.as_strategy(schemathesis.GenerationMode.NEGATIVE)

        @settings(
            max_examples=per_operation,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=valid | invalid)
        def check(case: Any) -> None:
            response = case.call_and_validate(
                base_url=server.url, headers=headers, checks=[not_a_server_error], timeout=10
            )
            statuses[response.status_code] += 1

        check()
        assert time.monotonic() < deadline, "the fuzz run took more than 60 s"
    assert statuses[200] > 0 and statuses[422] > 0, statuses  # in, and refusing bad input
    assert statuses[401] == 0, statuses
    assert httpx.get(f"{server.url}/healthz").status_code == 200


# -- without a token -----------------------------------------------------------------------


def test_without_a_token_loopback_gets_in_and_every_page_says_so(
    browser: Browser, open_server: AdminServe
) -> None:
    context = browser.new_context(base_url=open_server.url)
    try:
        page = context.new_page()
        seeded = open_server.seeded
        for path in (
            "/admin",
            "/admin/conversations?source=web",
            f"/admin/conversations/{seeded['slack']}",
            "/admin/login",  # nothing to log in to: on to the overview
            "/admin/routes",
        ):
            page.goto(path)
            banner = page.locator("#no-token-banner")
            expect(banner).to_contain_text("No admin token is set")
            expect(banner).to_contain_text("THREADBRIDGE_ADMIN_TOKEN")
        expect(page.locator("button:has-text('Log out')")).to_have_count(0)
        page.select_option("#set-route select[name=source]", "web")
        page.select_option("#set-route select[name=agent]", "other")
        page.click("#set-route button[type=submit]")
        expect(page.locator("#routes tr.admin td[data-label=agent]")).to_have_text("other")
    finally:
        context.close()
    rebound = httpx.get(f"{open_server.url}/admin", headers={"Host": "admin.example.com"})
    assert rebound.status_code == 403
    assert "THREADBRIDGE_ADMIN_TOKEN" in rebound.json()["detail"]


def test_without_a_token_serve_refuses_a_public_address(tmp_path: Path) -> None:
    (tmp_path / "tb.toml").write_text(CONFIG.format(db=tmp_path / "tb.db"), encoding="utf-8")
    args = [THREADBRIDGE, "serve", "--config", str(tmp_path / "tb.toml")]
    env = {k: v for k, v in os.environ.items() if k != "THREADBRIDGE_ADMIN_TOKEN"}
    done = subprocess.run(
        [*args, "--host", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "admin.token_env: no admin token is set ($THREADBRIDGE_ADMIN_TOKEN is empty)" in (
        done.stderr
    )
    assert "would listen on 0.0.0.0" in done.stderr
    assert "fix: set THREADBRIDGE_ADMIN_TOKEN" in done.stderr
    assert "serving on" not in done.stderr
    assert not (tmp_path / "tb.db").exists()  # refused before anything started


@pytest.mark.parametrize(
    ("host", "token", "refused"),
    [
        ("0.0.0.0", "", True),
        ("::", "", True),
        ("192.0.2.10", "", True),
        ("bots.example.com", "", True),
        ("0.0.0.0", "set", False),
        ("127.0.0.1", "", False),
        ("127.0.0.2", "", False),
        ("::1", "", False),
        ("localhost", "", False),
    ],
)
def test_the_server_host_needs_a_token_unless_it_is_loopback(
    monkeypatch: pytest.MonkeyPatch, host: str, token: str, refused: bool
) -> None:
    monkeypatch.setenv("TB_PAGES_TOKEN", token)
    raw = {
        "server": {"host": host},
        "admin": {"token_env": "TB_PAGES_TOKEN"},
        "agents": {"demo": {"service": "local"}},
    }
    config = parse_config(raw, "tb.toml", check_secrets=False)
    if not refused:
        check_admin_exposure(config, config.server.host)
        return
    with pytest.raises(ConfigError) as caught:
        check_admin_exposure(config, config.server.host)
    assert caught.value.key == "admin.token_env"
    assert "$TB_PAGES_TOKEN is empty" in str(caught.value)
    assert "fix: set TB_PAGES_TOKEN" in str(caught.value)


# -- the session cookie itself -----------------------------------------------------------


def test_session_cookies_are_signed_with_the_token_and_expire() -> None:
    auth = AdminAuth("k" * 32, "THREADBRIDGE_ADMIN_TOKEN")
    cookie = auth.new_cookie(now=1000.0)
    session = auth.check_cookie(cookie, now=1000.0 + SESSION_S - 1)
    assert session is not None and len(session.csrf) == 64
    assert auth.check_cookie(cookie, now=1000.0 + SESSION_S + 1) is None
    expiry, nonce, signature = cookie.split(".")
    assert auth.check_cookie(f"{int(expiry) + 9999}.{nonce}.{signature}", now=1000.0) is None
    assert auth.check_cookie(f"{expiry}.{nonce}.{'0' * 64}", now=1000.0) is None
    for garbage in ("", "...", "abc.def.ghi", cookie + "x"):
        assert auth.check_cookie(garbage, now=1000.0) is None
    other = AdminAuth("another token", "THREADBRIDGE_ADMIN_TOKEN")
    assert other.check_cookie(cookie, now=1000.0) is None
    assert (
        not auth.check_token("") and not auth.check_token("k" * 31) and auth.check_token("k" * 32)
    )


@pytest.mark.parametrize(
    ("target", "safe"),
    [
        ("/admin/routes", "/admin/routes"),
        ("/admin/conversations?source=web", "/admin/conversations?source=web"),
        ("https://evil.example/admin", "/admin"),
        ("//evil.example/admin", "/admin"),
        ("/adminx", "/admin"),
        ("/admin/login?next=/admin", "/admin"),
        ("/admin/\\evil", "/admin"),
        (None, "/admin"),
    ],
)
def test_after_login_only_admin_pages_are_a_destination(target: str | None, safe: str) -> None:
    assert safe_next(target) == safe
