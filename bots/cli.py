"""The `threadbridge` command."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import datetime
from typing import Annotated, Any

import typer
import uvicorn

from core.config import Config, load_config
from core.errors import ConfigError

cli = typer.Typer(
    help="Put hosted AI agents into Slack, Discord, Telegram and a web chat.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
conversations_cli = typer.Typer(help="Search and read stored conversations.", no_args_is_help=True)
routes_cli = typer.Typer(help="Which agent serves which channel.", no_args_is_help=True)
db_cli = typer.Typer(help="The database.", no_args_is_help=True)
config_cli = typer.Typer(help="The configuration file.", no_args_is_help=True)
cli.add_typer(conversations_cli, name="conversations")
cli.add_typer(routes_cli, name="routes")
cli.add_typer(db_cli, name="db")
cli.add_typer(config_cli, name="config")

ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        envvar="THREADBRIDGE_CONFIG",
        show_envvar=True,
        help="config file [default: config/threadbridge.toml]",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def load(path: str | None, *, check_secrets: bool = True) -> Config:
    """The config, or a clear message and exit code 2."""
    try:
        return load_config(path, check_secrets=check_secrets)
    except ConfigError as exc:
        raise fail(str(exc)) from None


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # Request URLs can carry tokens (Telegram puts the bot token in the path): keep them out.
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Server(uvicorn.Server):
    """uvicorn that says where it listens once the socket is bound (port 0 included)."""

    label = "threadbridge"
    on_exit: Any = None  # called (in the loop) as soon as a stop signal arrives

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Open event streams would hold up the shutdown until uvicorn's timeout: end them first.
        if self.on_exit is not None and self.servers:
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(self.on_exit)
        super().handle_exit(sig, frame)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            typer.echo(f"{self.label}: serving on http://{host}:{port}", err=True)


@cli.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="override [server] host")] = None,
    port: Annotated[int | None, typer.Option(help="override [server] port (0: any free)")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run the bridge: the channels in the config, the web chat, the admin API."""
    from bots.app import App, check_channels
    from bots.http import create_app

    setup_logging(log_level.upper())
    cfg = load(config)
    try:
        check_channels(cfg)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    app = App(cfg)
    server = _Server(
        uvicorn.Config(
            create_app(app),
            host=host or cfg.server.host,
            port=cfg.server.port if port is None else port,
            log_level=log_level.lower(),
            lifespan="on",
            timeout_graceful_shutdown=15,
        )
    )
    server.on_exit = app.draining
    # A start that fails for a reason we name (a refused token…) is said once, plainly.
    logging.getLogger("uvicorn.error").addFilter(
        lambda record: app.start_error is None or record.levelno < logging.ERROR
    )
    typer.echo(f"threadbridge: config {cfg.path}, store {_safe_url(cfg.store.url)}", err=True)
    try:
        server.run()
    except SystemExit:  # uvicorn exits at once when the start fails
        if app.start_error is None:
            raise
    if app.start_error is not None:
        raise fail(app.start_error, code=1)
    if not server.started:
        raise typer.Exit(1)


@cli.command()
def chat(
    config: ConfigOpt = None,
    agent: Annotated[
        str | None, typer.Option(help="talk to this agent, whatever the routes say")
    ] = None,
    thread: Annotated[str | None, typer.Option(help="continue this terminal thread id")] = None,
    user: Annotated[str, typer.Option(help="your name in the conversation")] = "you",
) -> None:
    """Talk to an agent in the terminal (source `cli`)."""
    from adapters.cli import TerminalAdapter
    from bots.app import App

    setup_logging("WARNING")
    cfg = load(config)
    if agent is not None and agent not in cfg.agent_configs:
        raise fail(f"unknown agent {agent!r}; defined: {', '.join(sorted(cfg.agent_configs))}")
    terminal = TerminalAdapter(thread=thread, user=user, agent=agent)

    async def run() -> None:
        app = App(cfg, adapters=[terminal])
        await app.start()
        try:
            existing = await app.store.conversation_for_thread(terminal.thread.key)
            serving = agent or (existing.agent if existing else None)
            serving = serving or (await app.router.agent_for(terminal.thread)).agent
            typer.echo(f"thread {terminal.thread.thread} · agent {serving}")
            await terminal.repl()
        finally:
            await app.stop(deadline_s=5)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        typer.echo(
            f"\n(interrupted; what you sent is kept: threadbridge chat --thread "
            f"{terminal.thread.thread} continues this conversation)",
            err=True,
        )
        raise typer.Exit(130) from None


@conversations_cli.command("search")
def conversations_search(
    config: ConfigOpt = None,
    source: Annotated[str | None, typer.Option(help="slack, discord, telegram, web, cli")] = None,
    workspace: Annotated[str | None, typer.Option()] = None,
    channel: Annotated[str | None, typer.Option()] = None,
    user: Annotated[str | None, typer.Option(help="the platform user id who started it")] = None,
    agent: Annotated[str | None, typer.Option()] = None,
    status: Annotated[str | None, typer.Option(help="open, closed or failed")] = None,
    text: Annotated[str | None, typer.Option(help="words in any message")] = None,
    since: Annotated[
        datetime | None, typer.Option(help="created at or after (ISO date/time)")
    ] = None,
    until: Annotated[datetime | None, typer.Option(help="created before (ISO date/time)")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    reversed: Annotated[
        bool, typer.Option("--reversed/--oldest-first", help="newest first")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """List conversations, newest first, filtered by source, channel, user, text…"""
    from bots.admin.api import conversation_json
    from core.store import SearchFilters, Store, aware

    if status is not None and status not in ("open", "closed", "failed"):
        raise fail("--status takes open, closed or failed")
    cfg = load(config, check_secrets=False)
    filters = SearchFilters(
        source=source,
        workspace=workspace,
        channel=channel,
        user=user,
        agent=agent,
        status=status,
        text=text,
        since=aware(since),
        until=aware(until),
        limit=limit,
        offset=offset,
        reversed=reversed,
    )

    async def run() -> tuple[list[Any], int]:
        store = Store(cfg.store.url)
        try:
            await store.migrate()
            return await store.search(filters)
        finally:
            await store.close()

    found, total = asyncio.run(run())
    if as_json:
        typer.echo(
            json.dumps(
                {"total": total, "items": [conversation_json(c) for c in found]},
                indent=2,
                ensure_ascii=False,
            )
        )
        return
    if not found:
        typer.echo(f"no conversations match (total {total})")
        return
    rows = [
        (
            c.id,
            c.source,
            c.agent,
            c.status,
            c.created.strftime("%Y-%m-%d %H:%M") if c.created else "",
            c.thread_key,
            str(c.data.get("user_name") or c.data.get("user_id") or ""),
        )
        for c in found
    ]
    _table(("id", "source", "agent", "status", "created", "thread", "user"), rows)
    shown = f"{offset + 1}-{offset + len(found)}"
    typer.echo(f"{shown} of {total}")


@conversations_cli.command("show")
def conversations_show(
    conversation_id: Annotated[str, typer.Argument(help="the conversation id")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print one conversation's transcript."""
    from bots.admin.api import transcript_json
    from core.store import Store

    cfg = load(config, check_secrets=False)

    async def run() -> dict[str, Any] | None:
        store = Store(cfg.store.url)
        try:
            await store.migrate()
            conversation = await store.get_conversation(conversation_id)
            return None if conversation is None else await transcript_json(store, conversation)
        finally:
            await store.close()

    body = asyncio.run(run())
    if body is None:
        raise fail(f"no conversation {conversation_id!r}", code=1)
    if as_json:
        typer.echo(json.dumps(body, indent=2, ensure_ascii=False))
        return
    typer.echo(
        f"conversation {body['id']} · {body['source']} · agent {body['agent']} · {body['status']}"
    )
    typer.echo(f"thread {body['thread_key']} · remote id {body['remote_id'] or '-'}")
    typer.echo(f"data {json.dumps(body['data'], ensure_ascii=False)}")
    for m in body["messages"]:
        who = m["author_name"] or m["name"] or m["role"]
        tag = f"{m['role']}" + (f" ({m['kind']})" if m["kind"] != "message" else "")
        typer.echo(f"\n[{m['created']}] {tag} · {who}\n{m['content']}")
        for call in m["tool_calls"] or []:
            typer.echo(f"  → tool call {call['name']}({call['arguments']})")
    for failure in body["failures"]:
        typer.echo(f"\nfailed turn {failure['event_id']} at {failure['when']}: {failure['error']}")


@routes_cli.command("list")
def routes_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every route, most specific first, and the default agent."""
    from core.routing import Router
    from core.store import Store

    cfg = load(config, check_secrets=False)

    async def run() -> list[Any]:
        store = Store(cfg.store.url)
        try:
            await store.migrate()
            return await Router(cfg, store).routes()
        finally:
            await store.close()

    found = asyncio.run(run())
    items = [
        {
            "tier": r.tier,
            "source": r.source,
            "workspace": r.workspace,
            "channel": r.channel,
            "agent": r.agent,
            "origin": r.origin,
            "set_by": r.set_by,
        }
        for r in found
    ]
    if as_json:
        typer.echo(json.dumps({"default_agent": cfg.default_agent, "routes": items}, indent=2))
        return
    _table(
        ("tier", "source", "workspace", "channel", "agent", "origin"),
        [
            (
                i["tier"],
                i["source"],
                i["workspace"] or "*",
                i["channel"] or "*",
                i["agent"],
                i["origin"],
            )
            for i in items
        ]
        + [("default", "*", "*", "*", cfg.default_agent, "config")],
    )


@cli.command()
def emulate(
    service: Annotated[str, typer.Argument(help="engage")],
    port: Annotated[int, typer.Option(help="0: any free port")] = 8765,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    api_key: Annotated[
        list[str] | None, typer.Option(help="accept only this key (repeatable)")
    ] = None,
    latency: Annotated[float, typer.Option(help="seconds each agent answer takes")] = 0.0,
) -> None:
    """Run an emulator of an agent service, for trying threadbridge without an account."""
    from core.agents import emulators

    try:
        factory = emulators.load(service)
    except KeyError as exc:
        raise fail(str(exc.args[0]) if exc.args else f"unknown service {service!r}") from None
    app = factory(api_keys=set(api_key) if api_key else None, latency_s=latency)
    setup_logging("WARNING")
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    server.label = f"emulator {service}"
    server.run()


@db_cli.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Apply every database migration not yet applied."""
    from core.store import Store

    cfg = load(config, check_secrets=False)

    async def run() -> None:
        store = Store(cfg.store.url)
        try:
            await store.migrate()
        finally:
            await store.close()

    asyncio.run(run())
    typer.echo(f"database {_safe_url(cfg.store.url)} is up to date")


@config_cli.command("check")
def config_check(config: ConfigOpt = None) -> None:
    """Validate the config file, its secrets and its routes; exit 2 on any problem."""
    from adapters.discord.app import invite_url
    from bots.app import check_channels, discord_config

    cfg = load(config)
    try:
        channels = check_channels(cfg)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"{cfg.path}: ok")
    typer.echo(f"  agents: {', '.join(f'{n} ({a.service})' for n, a in cfg.agent_configs.items())}")
    typer.echo(f"  default agent: {cfg.default_agent}; routes: {len(cfg.routes)}")
    for name, fate in channels.items():
        typer.echo(f"  channel {name}: {fate}")
    discord = discord_config(cfg)
    if discord is not None and discord.application_id:
        typer.echo(f"  discord invite: {invite_url(discord.application_id)}")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    cells = [tuple(str(v) for v in header), *[tuple(str(v) for v in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for index, row in enumerate(cells):
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            typer.echo("  ".join("-" * w for w in widths))


def _safe_url(url: str) -> str:
    """A database URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main() -> None:
    cli()
