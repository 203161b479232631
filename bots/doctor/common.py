"""What every doctor check shares: the report row, the failure, the time limit, HTTP calls."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import httpx

TIMEOUT_S = 5.0  # the most any one check may take, unless `doctor --timeout` says otherwise
LIMIT: ContextVar[float] = ContextVar("LIMIT", default=TIMEOUT_S)  # set by run_checks

Job = Awaitable[list["Check"]]


def http_timeout() -> float:
    """One HTTP call's timeout: a little under the check's, so the call says why it failed."""
    return LIMIT.get() * 0.8


@dataclass(slots=True)
class Check:
    """One row of the report."""

    check: str
    status: str  # "ok", "FAIL" or "skip"
    detail: str = ""
    fix: str = ""


class Problem(Exception):
    """A check failed: what is wrong and how to fix it."""

    def __init__(self, detail: str, fix: str = "") -> None:
        super().__init__(detail)
        self.detail, self.fix = detail, fix


async def guarded(labels: tuple[str, ...], check: Job, fix: str) -> list[Check]:
    """`check`'s rows; a Problem or a timeout fails the first label and skips the others.

    `fix` is said when the failure brings none of its own (a timeout, an unreachable host).
    """
    try:
        return await asyncio.wait_for(check, LIMIT.get())
    except Problem as exc:
        detail, fix = exc.detail, exc.fix or fix
    except TimeoutError:
        detail = f"no answer within {LIMIT.get():g} s"
    except Exception as exc:  # one check's bug must not hide the others' results
        detail = f"{type(exc).__name__}: {exc}"
    rest = [Check(label, "skip", f"not checked: {labels[0]} failed") for label in labels[1:]]
    return [Check(labels[0], "FAIL", detail, fix), *rest]


async def done(*rows: Check) -> list[Check]:
    """Rows known without any I/O, as a job to run beside the others."""
    return list(rows)


async def request(
    http: httpx.AsyncClient, method: str, url: str, *, headers: dict[str, str] | None = None
) -> tuple[httpx.Response, Any]:
    """The response and its decoded JSON body (None when not JSON); Problem when unreachable.

    Problems name the host only: a Telegram URL carries the bot token in its path.
    """
    try:
        host = httpx.URL(url).copy_with(path="/", query=None)
    except httpx.InvalidURL:
        raise Problem("the API address is not a URL", "") from None
    try:
        response = await http.request(method, url, headers=headers)
    except httpx.TimeoutException:
        raise Problem(f"{host} did not answer within {http_timeout():g} s", "") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise Problem(f"cannot reach {host} ({type(exc).__name__})", "") from None
    try:
        return response, response.json()
    except ValueError:
        return response, None
