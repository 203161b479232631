"""`threadbridge doctor`: does everything the config names answer, and accept our keys?

Checks, all at once and each within `--timeout` (5 s): each platform's tokens and the scopes,
webhook and intents its adapter needs (platforms.py); each agent service reachable with its key
accepted, the store migrated, each admin route's agent defined (services.py). The report is a
table, or JSON with `--json`; secrets are sent, never shown: every text passes `Redactor`.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict

import httpx
import typer
from sqlalchemy.engine import make_url

from bots.doctor.common import LIMIT, TIMEOUT_S, Check, Job, guarded, http_timeout
from bots.doctor.platforms import PLATFORMS, platform_jobs, read_section
from bots.doctor.services import agent_jobs, store_checks
from core.config import Config
from core.errors import ConfigError

__all__ = ["Check", "Redactor", "run", "run_checks"]


def run(config: Config, *, as_json: bool = False, timeout_s: float = TIMEOUT_S) -> int:
    """Run every check and print the report; return the exit code: 1 if any failed, else 0."""
    checks = Redactor(config).clean(asyncio.run(run_checks(config, timeout_s)))
    failed = sum(c.status == "FAIL" for c in checks)
    if as_json:
        typer.echo(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print_table(checks)
        skipped = sum(c.status == "skip" for c in checks)
        passed = len(checks) - failed - skipped
        typer.echo(f"\n{len(checks)} checks: {passed} ok, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


async def run_checks(config: Config, timeout_s: float = TIMEOUT_S) -> list[Check]:
    """Every check of `config`, run concurrently, each within `timeout_s`; rows in order."""
    LIMIT.set(timeout_s)  # this task's context; the checks' tasks inherit it
    async with httpx.AsyncClient(timeout=http_timeout()) as http:
        jobs: list[Job] = [*platform_jobs(config, http), *agent_jobs(config)]
        jobs.append(guarded(("store", "routes"), store_checks(config), "check [store] url"))
        groups = await asyncio.gather(*jobs)
    return [row for group in groups for row in group]


class Redactor:
    """Replaces every secret the config names (and the store's password) with `***`."""

    def __init__(self, config: Config) -> None:
        names = {config.admin.token_env}
        for agent in config.agent_configs.values():
            names |= {v for k, v in agent.model_dump().items() if k.endswith("_env") and v}
        names |= {t.auth_env for t in config.tool_configs.values() if t.auth_env}
        for platform in PLATFORMS:
            try:
                section = read_section(config, platform)
            except ConfigError:
                continue
            if section is not None:
                fields = section.model_dump().items()
                names |= {v for k, v in fields if k.endswith("_env") and isinstance(v, str)}
        secrets = {os.environ.get(name, "") for name in names}
        try:
            secrets.add(str(make_url(config.store.url).password or ""))
        except Exception:  # not a database URL: the store check says so
            pass
        # Longest first, so that a secret containing another is replaced whole.
        self.secrets = sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            value = value.replace(secret, "***")
        return value

    def clean(self, checks: list[Check]) -> list[Check]:
        return [Check(c.check, c.status, self.text(c.detail), self.text(c.fix)) for c in checks]


def print_table(checks: list[Check]) -> None:
    """check · status · detail · fix, the first three columns padded to their widest."""
    rows = [
        ("check", "status", "detail", "fix"),
        *[(c.check, c.status, c.detail, c.fix) for c in checks],
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for index, row in enumerate(rows):
        cells = [value.ljust(width) for value, width in zip(row[:3], widths, strict=True)]
        typer.echo("  ".join([*cells, row[3]]).rstrip())
        if index == 0:
            typer.echo("  ".join("-" * width for width in [*widths, 3]))
