"""The `threadbridge` command."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
from datetime import datetime
from enum import StrEnum
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


class LogFormat(StrEnum):
    text = "text"
    json = "json"


def setup_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Log to stderr as text lines, or as one JSON object per line with the `trace_id` of the
    message being handled (core/logs.py)."""
    from core.logs import TEXT_FORMAT, JsonFormatter, TraceFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceFilter())
    json_lines = log_format == LogFormat.json
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    # Neither format shows a record's source line, thread or process, and finding the caller
    # walks the stack: together a fifth of a record's cost (the logging HOWTO, "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.captureWarnings(json_lines)  # a library's warning is a JSON line too
    # Request URLs can carry tokens (Telegram puts the bot token in the path): keep them out.
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _say(text: str, json_logs: bool) -> None:
    """A line for the operator on stderr: plain, or as a log record when logs are JSON lines."""
    if json_logs:
        logging.getLogger("threadbridge").info(text)
    else:
        typer.echo(text, err=True)


class _Server(uvicorn.Server):
    """uvicorn that says where it listens once the socket is bound (port 0 included)."""

    label = "threadbridge"
    on_exit: Any = None  # called (in the loop) as soon as a stop signal arrives
    json_logs = False  # say where it listens as a log line, not as plain text

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Open event streams would hold up the shutdown until uvicorn's timeout: end them first.
        if self.on_exit is not None and self.servers:
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(self.on_exit)
        super().handle_exit(sig, frame)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        gc.freeze()  # what start-up made is never scanned again (see `serve`)
        gc.enable()
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            _say(f"{self.label}: serving on http://{host}:{port}", self.json_logs)


@cli.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="override [server] host")] = None,
    port: Annotated[int | None, typer.Option(help="override [server] port (0: any free)")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    log_format: Annotated[
        LogFormat,
        typer.Option(
            envvar="THREADBRIDGE_LOG_FORMAT",
            show_envvar=True,
            help="text, or json: one JSON object per line with a trace_id",
        ),
    ] = LogFormat.text,
) -> None:
    """Run the bridge: the channels in the config, the web chat, the admin API."""
    # Start-up makes some 150,000 objects that live as long as the process (modules, classes,
    # the app). The collector scanned them over and over while they were made (two full
    # collections, 23 and 43 ms, the second as the server came up) and in every older-generation
    # collection after (2-3 ms each). It is off until the server listens; then they are set
    # aside for good (`_Server.startup`): a start is 0.14 s shorter (median of 10, A/B).
    gc.disable()
    from bots.app import App, check_admin_exposure, check_channels
    from bots.http import create_app

    setup_logging(log_level.upper(), log_format)
    json_logs = log_format == LogFormat.json
    cfg = load(config)
    try:
        check_channels(cfg)
        check_admin_exposure(cfg, host or cfg.server.host)
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
            ws="none",  # no WebSocket routes: nor the import of a WebSocket library
            timeout_graceful_shutdown=15,
            # With JSON logs, uvicorn's own go through our handler too.
            log_config=None if json_logs else uvicorn.config.LOGGING_CONFIG,
        )
    )
    server.on_exit = app.draining
    server.json_logs = json_logs
    # A start that fails for a reason we name (a refused token…) is said once, plainly.
    logging.getLogger("uvicorn.error").addFilter(
        lambda record: app.start_error is None or record.levelno < logging.ERROR
    )
    _say(f"threadbridge: config {cfg.path}, store {_safe_url(cfg.store.url)}", json_logs)
    try:
        server.run()
    except SystemExit:  # uvicorn exits at once when the start fails
        if app.start_error is None:
            raise
    if app.start_error is not None:
        if json_logs:
            logging.getLogger("threadbridge").error(app.start_error)
            raise typer.Exit(1)
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


SourceOpt = Annotated[str | None, typer.Option(help="slack, discord, telegram, web, cli")]
DataOpt = Annotated[
    list[str] | None,
    typer.Option("--data", help="KEY=VALUE: the conversation's data[KEY] is VALUE (repeatable)"),
]
SinceOpt = Annotated[datetime | None, typer.Option(help="created at or after (ISO date/time)")]
UntilOpt = Annotated[datetime | None, typer.Option(help="created before (ISO date/time)")]
ByOpt = Annotated[
    str | None, typer.Option("--by", help="who makes the change, for the audit log [cli:$USER]")
]


def _filters(**given: Any) -> Any:
    """The search filters, or the reason one is wrong and exit code 2."""
    from core.search import FilterError, search_filters

    try:
        return search_filters(**given)
    except FilterError as exc:
        raise fail(f"--{exc.param}: {exc.reason}") from None


def _by(name: str | None) -> str:
    if name:
        return name
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in this environment
        return "cli"


def _run_admin(cfg: Config, work: Any) -> Any:
    """Run `work(admin)` against the configured store; refused changes exit with a reason."""
    from bots.admin.actions import Admin, AdminError
    from core.routing import Router
    from core.store import Store

    async def run() -> Any:
        store = Store(cfg.store.url)
        try:
            await store.migrate()
            admin = Admin(cfg, store, Router(cfg, store))
            try:
                return await work(admin)
            finally:
                await admin.aclose()
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except AdminError as exc:
        raise fail(str(exc), code=1 if exc.status in (404, 502) else 2) from None


def _echo_json(body: Any) -> None:
    typer.echo(json.dumps(body, indent=2, ensure_ascii=False))


@conversations_cli.command("search")
def conversations_search(
    config: ConfigOpt = None,
    source: SourceOpt = None,
    workspace: Annotated[str | None, typer.Option()] = None,
    channel: Annotated[str | None, typer.Option()] = None,
    user: Annotated[str | None, typer.Option(help="the platform user id who started it")] = None,
    agent: Annotated[str | None, typer.Option()] = None,
    status: Annotated[str | None, typer.Option(help="open, closed or failed")] = None,
    text: Annotated[
        str | None, typer.Option(help='words in its messages; "a phrase" in quotes')
    ] = None,
    data: DataOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    reversed: Annotated[
        bool, typer.Option("--reversed/--oldest-first", help="newest first")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """List conversations, newest first, filtered by source, channel, user, text, data…"""
    from bots.admin.api import conversation_json

    filters = _filters(
        source=source,
        workspace=workspace,
        channel=channel,
        user=user,
        agent=agent,
        status=status,
        text=text,
        data=data or [],
        since=since,
        until=until,
        limit=limit,
        offset=offset,
        reversed=reversed,
    )
    cfg = load(config, check_secrets=False)

    async def work(admin: Any) -> tuple[list[Any], int]:
        found: tuple[list[Any], int] = await admin.store.search(filters)
        return found

    found, total = _run_admin(cfg, work)
    if as_json:
        _echo_json({"total": total, "items": [conversation_json(c) for c in found]})
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
    """Print one conversation's transcript: roles, authors, times, tool calls, failures."""
    from bots.admin.api import transcript_json

    cfg = load(config, check_secrets=False)

    async def work(admin: Any) -> dict[str, Any] | None:
        conversation = await admin.store.get_conversation(conversation_id)
        return None if conversation is None else await transcript_json(admin.store, conversation)

    body = _run_admin(cfg, work)
    if body is None:
        raise fail(f"no conversation {conversation_id!r}", code=1)
    if as_json:
        _echo_json(body)
        return
    typer.echo(
        f"conversation {body['id']} · {body['source']} · agent {body['agent']} · {body['status']}"
    )
    typer.echo(f"thread {body['thread_key']} · remote id {body['remote_id'] or '-'}")
    chat = body["data"].get("chat_id")
    if body["link"] or chat is not None:
        typer.echo(f"link {body['link']}" if body["link"] else f"chat {chat}")
    typer.echo(f"created {body['created']} · updated {body['updated']}")
    typer.echo(f"data {json.dumps(body['data'], ensure_ascii=False)}")
    if body["previous_conversation_id"]:
        typer.echo(f"continues conversation {body['previous_conversation_id']}")
    if body["data"].get("moved_to_agent"):
        after = body["next_conversation_id"] or "(none yet)"
        typer.echo(f"moved to agent {body['data']['moved_to_agent']}; continued in {after}")
    for m in body["messages"]:
        who = m["author_name"] or m["name"] or m["role"]
        if m["author_id"] and m["author_id"] != who:
            who += f" ({m['author_id']})"
        tag = f"{m['role']}" + (f" ({m['kind']})" if m["kind"] != "message" else "")
        typer.echo(f"\n[{m['created']}] {tag} · {who}\n{m['content']}")
        for call in m["tool_calls"] or []:
            typer.echo(f"  → tool call {call['name']}({call['arguments']})")
        if m["tool_call_id"]:
            typer.echo(f"  ← result of tool call {m['tool_call_id']}")
    for failure in body["failures"]:
        typer.echo(f"\nfailed turn {failure['event_id']} at {failure['when']}: {failure['error']}")


@conversations_cli.command("update")
def conversations_update(
    conversation_id: Annotated[str, typer.Argument(help="the conversation id")],
    data: Annotated[
        list[str] | None,
        typer.Option("--data", help="KEY=VALUE sets a key, KEY= removes it (repeatable)"),
    ] = None,
    source: Annotated[str | None, typer.Option(help="a new source label")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a conversation's data and source; an engage-conversations agent gets it too."""
    from bots.admin.actions import AdminError, data_updates
    from bots.admin.api import conversation_json

    try:
        patch = data_updates(data or []) if data else None
    except AdminError as exc:
        raise fail(str(exc)) from None
    cfg = load(config, check_secrets=False)

    async def work(admin: Any) -> Any:
        return await admin.update_conversation(conversation_id, data=patch, source=source)

    updated, mirrored = _run_admin(cfg, work)
    body = {**conversation_json(updated), "mirrored": mirrored}
    if as_json:
        _echo_json(body)
        return
    where = f" (and at agent {updated.agent}'s service)" if mirrored else ""
    typer.echo(f"updated conversation {updated.id}{where}")
    typer.echo(f"source {updated.source}")
    typer.echo(f"data {json.dumps(updated.data, ensure_ascii=False)}")


@conversations_cli.command("export")
def conversations_export(
    config: ConfigOpt = None,
    source: SourceOpt = None,
    workspace: Annotated[str | None, typer.Option()] = None,
    channel: Annotated[str | None, typer.Option()] = None,
    user: Annotated[str | None, typer.Option()] = None,
    agent: Annotated[str | None, typer.Option()] = None,
    status: Annotated[str | None, typer.Option(help="open, closed or failed")] = None,
    text: Annotated[str | None, typer.Option(help="words in its messages")] = None,
    data: DataOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    reversed: Annotated[
        bool, typer.Option("--reversed/--oldest-first", help="newest first")
    ] = True,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv")] = "jsonl",
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="write here [default: stdout]")
    ] = None,
) -> None:
    """Write every conversation the filters find, with its messages, as JSON Lines or CSV."""
    from bots.admin.export import FORMATS, export

    if fmt not in FORMATS:
        raise fail(f"--format: use {' or '.join(FORMATS)}")
    filters = _filters(
        source=source,
        workspace=workspace,
        channel=channel,
        user=user,
        agent=agent,
        status=status,
        text=text,
        data=data or [],
        since=since,
        until=until,
        reversed=reversed,
    )
    cfg = load(config, check_secrets=False)
    try:
        out = open(output, "w", encoding="utf-8", newline="") if output else sys.stdout  # noqa: SIM115
    except OSError as exc:
        raise fail(f"--output: {exc.strerror or exc}: {output}") from None

    async def work(admin: Any) -> int:
        total = (await admin.store.search(filters))[1]
        if not sys.stderr.isatty():
            written: int = await export(admin.store, filters, fmt, out)
            return written
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("exporting", total=total)
            return await export(admin.store, filters, fmt, out, lambda n: bar.advance(task, n))

    try:
        count = _run_admin(cfg, work)
    finally:
        if out is not sys.stdout:
            out.close()
    where = f" to {output}" if output else ""
    typer.echo(f"exported {count} conversation(s){where}", err=True)


@routes_cli.command("list")
def routes_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every route, most specific first, where it comes from, who set it and when."""
    from bots.admin.api import routes_json

    cfg = load(config, check_secrets=False)
    body = _run_admin(cfg, routes_json)
    if as_json:
        _echo_json(body)
        return
    rows = [
        (
            r["tier"],
            r["source"],
            r["workspace"] or "*",
            r["channel"] or "*",
            r["agent"],
            r["origin"] + ("(overridden)" if r["overridden"] else ""),
            r["set_by"] or "",
            (r["set_at"] or "")[:19].replace("T", " "),
            _short(r["situation"]),
            _short(_access(r), 60),
        )
        for r in body["routes"]
    ]
    rows.append(("default", "*", "*", "*", cfg.default_agent, "config", "", "", "", ""))
    header = ("tier", "source", "workspace", "channel", "agent", "origin", "set by", "set at")
    _table((*header, "situation", "access"), rows)


def _access(rules: dict[str, Any]) -> str:
    """A route's or a thread's access rules on one line: `allow U1,U2; deny U3; in C1,C2`."""
    parts = []
    for key, label in (("allow_users", "allow"), ("deny_users", "deny"), ("allow_channels", "in")):
        ids = rules.get(key)
        if ids is None or (key == "deny_users" and not ids):
            continue
        parts.append(f"{label} {','.join(ids) or '(none)'}")
    if rules.get("refused_notice") == "":
        parts.append("refused silently")
    return "; ".join(parts)


def _short(text: str | None, width: int = 40) -> str:
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


ScopeSource = Annotated[str, typer.Option("--source", help="slack, discord, telegram, web, cli")]
ScopeWorkspace = Annotated[
    str | None, typer.Option(help="the Slack team or Discord guild id; none: any")
]
ScopeChannel = Annotated[str | None, typer.Option(help="the channel or chat id; none: any")]


@routes_cli.command("set")
def routes_set(
    agent: Annotated[str, typer.Argument(help="the agent that serves the scope")],
    source: ScopeSource,
    workspace: ScopeWorkspace = None,
    channel: ScopeChannel = None,
    situation: Annotated[
        str | None, typer.Option(help="instructions for this scope (sessions, openai…)")
    ] = None,
    move_open: Annotated[
        bool,
        typer.Option("--move-open", help="also move open threads: their next message starts anew"),
    ] = False,
    by: ByOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Route a source, workspace or channel to AGENT (replaces its run-time route)."""
    from bots.admin.api import outcome_json

    cfg = load(config, check_secrets=False)

    async def work(admin: Any) -> Any:
        return await admin.set_route(
            source,
            workspace,
            channel,
            agent,
            situation=situation,
            move_open=move_open,
            by=_by(by),
        )

    outcome = _run_admin(cfg, work)
    if as_json:
        _echo_json(outcome_json(outcome))
        return
    change = outcome.change
    was = f"was {change.old_agent}" if change.old_agent else "no run-time route before"
    typer.echo(f"route {_scope(change)} → {change.new_agent} ({was}; by {change.who})")
    if move_open:
        typer.echo(f"moved {change.moved} open thread(s): their next message starts anew")
    if outcome.situations_updated:
        typer.echo(f"new situation sent to {outcome.situations_updated} open session(s)")
    for failure in outcome.situation_failures:
        typer.echo(f"warning: situation not updated for {failure}", err=True)


@routes_cli.command("unset")
def routes_unset(
    source: ScopeSource,
    workspace: ScopeWorkspace = None,
    channel: ScopeChannel = None,
    by: ByOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Remove a scope's run-time route (the config file's route, if any, applies again)."""
    cfg = load(config, check_secrets=False)

    async def work(admin: Any) -> Any:
        return await admin.unset_route(source, workspace, channel, by=_by(by))

    outcome = _run_admin(cfg, work)
    change = outcome.change
    typer.echo(f"route {_scope(change)} removed (was {change.old_agent}; by {change.who})")


def _scope(change: Any) -> str:
    return "/".join((change.source, change.workspace or "*", change.channel or "*"))


@routes_cli.command("history")
def routes_history(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every change to the run-time routes, newest first: who, when, old → new."""
    from bots.admin.api import change_json

    cfg = load(config, check_secrets=False)

    async def work(admin: Any) -> tuple[list[Any], int]:
        changes = await admin.store.route_changes(limit, offset)
        return changes, await admin.store.count_route_changes()

    changes, total = _run_admin(cfg, work)
    if as_json:
        _echo_json({"total": total, "items": [change_json(c) for c in changes]})
        return
    if not changes:
        typer.echo(f"no route changes (total {total})")
        return
    rows = []
    for c in changes:
        situation = ""
        if c.old_situation != c.new_situation:
            situation = (
                f"{_short(c.old_situation, 20) or '-'} → {_short(c.new_situation, 20) or '-'}"
            )
        rows.append(
            (
                c.at.strftime("%Y-%m-%d %H:%M:%S"),
                c.who or "",
                c.action,
                _scope(c),
                f"{c.old_agent or '-'} → {c.new_agent or '-'}",
                str(c.moved) if c.moved else "",
                situation,
            )
        )
    _table(("at", "who", "action", "scope", "agent", "moved", "situation"), rows)
    typer.echo(f"{offset + 1}-{offset + len(changes)} of {total}")


@routes_cli.command("explain")
def routes_explain(
    thread: Annotated[
        str, typer.Argument(help="source:workspace/channel/thread, e.g. slack:T1/C2/1700.1")
    ],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Which agent a thread gets, and why: the matching route at each tier."""
    from bots.admin.api import explain_json
    from core.routing import parse_thread

    try:
        parsed = parse_thread(thread)
    except ValueError as exc:
        raise fail(str(exc)) from None
    cfg = load(config, check_secrets=False)
    body = _run_admin(cfg, lambda admin: explain_json(admin, parsed))
    if as_json:
        _echo_json(body)
        return
    typer.echo(f"thread {body['thread']}")
    rows = []
    for step in body["steps"]:
        route = step["route"]
        scope = ""
        if route is not None:
            scope = "/".join((route["source"], route["workspace"] or "*", route["channel"] or "*"))
        elif step["tier"] == "default":
            scope = "default_agent"
        mark = "← chosen" if step["chosen"] else ""
        origin = route["origin"] if route else ""
        rows.append((step["tier"], scope or "-", step["agent"] or "-", origin, mark, step["note"]))
    _table(("tier", "route", "agent", "origin", "", "why"), rows)
    typer.echo(f"agent: {body['agent']}")
    access = body["access"]
    if not access["channel_open"]:
        typer.echo("access: this channel is ignored (not in its route's allow_channels)")
    else:
        limits = [
            f"{access[key]} {label}"
            for key, label in (("per_user_per_minute", "a minute"), ("per_user_per_day", "a day"))
            if access[key]
        ]
        rules = _access(access) or "anyone"
        typer.echo(f"access: {rules}" + (f"; limits: {', '.join(limits)}" if limits else ""))
    current = body["conversation"]
    if current is not None:
        typer.echo(
            f"this thread continues conversation {current['id']} with agent {current['agent']}, "
            "which it keeps (routes set --move-open moves it)"
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


@cli.command()
def doctor(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    timeout: Annotated[float, typer.Option(min=0.5, help="seconds each check may take")] = 5.0,
) -> None:
    """Check tokens, scopes, agent services, the store and routes; exit 1 on any failure."""
    from bots.doctor import run

    cfg = load(config, check_secrets=False)
    raise typer.Exit(run(cfg, as_json=as_json, timeout_s=timeout))


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
