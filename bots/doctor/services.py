"""Doctor checks of what sits behind the bridge: each agent service reachable and taking its
key, the store at the newest migration, and every admin route naming a defined agent."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from bots.doctor.common import Check, Job, Problem, guarded, http_timeout
from core.agents import build_service
from core.agents.base import AgentConfigBase, HttpAgentConfig, HttpAgentService
from core.config import Config
from core.errors import AgentRejected, AgentServiceError, AgentUnavailable
from core.migrate import alembic_config
from core.store import Store

# service -> (method, path, params, json, statuses that mean "key accepted, nothing ran").
# Engage, sessions and openai have a harmless authenticated list. Execute and rowboat have only
# their run endpoint, so they get a body that is invalid on purpose: the service checks the key
# first (401/403 when refused), then refuses the body (422/400) before any agent runs.
PROBES: dict[str, tuple[str, str, dict[str, Any] | None, Any, tuple[int, ...]]] = {
    "engage-conversations": ("GET", "/v1/conversations/me", {"limit": 1}, None, ()),
    "engage-runs": ("GET", "/v1/conversations/me", {"limit": 1}, None, ()),
    "sessions": ("GET", "/sessions", {"limit": 1}, None, ()),
    "openai": ("GET", "/models", None, None, ()),
    "execute": ("POST", "/v4/agents/execute", None, {}, (400, 422)),
    "rowboat": ("POST", "/api/v1/{project}/chat", None, {"messages": "doctor"}, (400,)),
}
# What a successful probe answers; anything else is some other API at that base_url.
SHAPES: dict[str, type] = {
    "engage-conversations": list,
    "engage-runs": list,
    "sessions": dict,
    "openai": dict,
}


def agent_jobs(config: Config) -> list[Job]:
    """One check per agent in the config."""
    return [
        guarded(
            (f"agent {name}",),
            agent_check(name, agent),
            f"check that the service answers at agents.{name}.base_url",
        )
        for name, agent in config.agent_configs.items()
    ]


async def agent_check(name: str, agent: AgentConfigBase) -> list[Check]:
    """One cheap authenticated call to the agent's service (see PROBES), no retries."""
    label = f"agent {name}"
    if not isinstance(agent, HttpAgentConfig):
        return [Check(label, "ok", f"{agent.service}: built in, nothing to reach")]
    if agent.service not in PROBES:
        return [Check(label, "skip", f"{agent.service}: no probe for this service")]
    for field, env in agent.model_dump().items():
        if field.endswith("_env") and env and not os.environ.get(env):
            raise Problem(f"{env} (agents.{name}.{field}) is not set", f"export {env}=…")
    method, path, params, body, accepted = PROBES[agent.service]
    path = path.format(project=quote(str(getattr(agent, "project_id", "")), safe=""))
    where = f"{agent.service} at {agent.base_url}"
    client = build_service(
        name, agent.model_copy(update={"retries": 0, "timeout_s": http_timeout()})
    )
    assert isinstance(client, HttpAgentService)
    try:
        reply = await client.request(method, path, params=params, json=body)
    except AgentRejected as exc:
        return [_rejected(label, agent, where, exc, accepted)]
    except AgentUnavailable as exc:
        if exc.status == 429:
            return [Check(label, "skip", f"{where}: rate limited just now (HTTP 429)")]
        raise Problem(f"{agent.service}: {exc}", "") from None
    except AgentServiceError as exc:
        raise Problem(f"{where}: {exc}", "") from None
    finally:
        await client.aclose()
    return [_accepted(label, agent, where, reply)]


def _rejected(
    label: str, agent: HttpAgentConfig, where: str, exc: AgentRejected, accepted: tuple[int, ...]
) -> Check:
    if exc.status in accepted:
        return Check(label, "ok", f"{where}: key accepted (probe refused by design, no agent ran)")
    key = agent.api_key_env or "api_key_env"
    if exc.status in (401, 403) or (exc.status == 400 and "authorization" in str(exc).lower()):
        # The service's own words are left out: some echo part of the key back.
        org = getattr(agent, "org_id_env", None)
        return Check(
            label,
            "FAIL",
            f"{where} refused the key in {key} (HTTP {exc.status})",
            f"set {key} to a key this service accepts" + (f", and {org} to its org" if org else ""),
        )
    if agent.service == "rowboat" and exc.status == 404:
        return Check(label, "FAIL", f"{where}: {exc}", "check project_id (the RowBoat project)")
    return Check(label, "FAIL", f"{where}: {exc}", "check base_url: the root of the service's API")


def _accepted(label: str, agent: HttpAgentConfig, where: str, reply: Any) -> Check:
    shape = SHAPES.get(agent.service)
    if shape is not None and not isinstance(reply, shape):
        fix = "check base_url: the root of the service's API"
        return Check(label, "FAIL", f"{where}: an answer that is not this service's", fix)
    model = getattr(agent, "model", None)
    if agent.service == "openai":
        served = [m.get("id") for m in reply.get("data") or [] if isinstance(m, dict)]
        if model not in served:
            some = ", ".join(str(m) for m in served[:8]) or "none"
            return Check(
                label,
                "FAIL",
                f"{where}: model {model!r} is not among those it serves ({some})",
                "set model to one the server lists at GET /models",
            )
        return Check(label, "ok", f"{where}: key accepted, model {model} served")
    return Check(label, "ok", f"{where}: key accepted")


async def store_checks(config: Config) -> list[Check]:
    """The store at the newest migration (never created here), then the admin routes."""
    url = make_url(config.store.url)
    shown = url.render_as_string(hide_password=True)
    upgrade = "run `threadbridge db upgrade` (serve also migrates at start)"
    database = url.database or ""
    is_file = url.get_backend_name() == "sqlite" and not database.startswith((":memory:", "file:"))
    if is_file and database and not await asyncio.to_thread(Path(database).exists):
        raise Problem(f"{shown}: no database file yet", upgrade)
    script = ScriptDirectory.from_config(alembic_config())
    heads = set(script.get_heads())
    store = Store(config.store.url)
    try:
        try:
            current = await store.read(
                lambda conn: set(MigrationContext.configure(conn).get_current_heads())
            )
        except Exception as exc:  # the driver's own errors: refused, no such database…
            said = (str(exc).strip().splitlines() or [""])[0][:160]
            raise Problem(f"{shown}: cannot read it ({type(exc).__name__}: {said})", "") from None
        if current != heads:
            known = all(_known(script, revision) for revision in current)
            raise Problem(
                f"{shown}: at revision {', '.join(sorted(current)) or 'none (not migrated)'}; "
                f"this version needs {', '.join(sorted(heads))}",
                upgrade if known else "the database is newer than this threadbridge: upgrade it",
            )
        rows = await store.list_routes()
    finally:
        await store.close()
    at = f"{shown} at {', '.join(sorted(heads))} (newest)"
    return [Check("store", "ok", at), routes_check(config, rows)]


def _known(script: Any, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except Exception:  # alembic raises its own errors for a revision it has never seen
        return False


def routes_check(config: Config, rows: list[Any]) -> Check:
    """The file's routes were checked when it loaded; an admin's may outlive its agent."""
    agents = config.agent_configs
    lost = [
        f"{row.source}/{row.workspace or '*'}/{row.channel or '*'} → {row.agent!r}"
        for row in rows
        if row.agent not in agents
    ]
    if lost:
        return Check(
            "routes",
            "FAIL",
            f"admin routes name agents the config does not define: {'; '.join(lost)}",
            f"define them, or `threadbridge routes set` those scopes to one of: "
            f"{', '.join(sorted(agents))} (or `routes unset` them)",
        )
    counts = f"{len(config.routes)} from the config, {len(rows)} set by admins"
    return Check("routes", "ok", f"{counts}, default {config.default_agent}: all agents defined")
