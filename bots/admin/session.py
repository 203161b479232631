"""Who may see the admin pages: a signed session cookie, or loopback when no token is set.

With a token, the login form checks it and sets `tb_admin = EXPIRY.NONCE.SIG`, where SIG is the
HMAC-SHA256 of `EXPIRY.NONCE` keyed with the token: nothing is kept server-side, and changing
the token ends every session. Forms carry a CSRF token, the HMAC of the session's nonce, on top
of the cookie's SameSite=Strict. Without a token the pages answer loopback callers only (and a
Host header naming this machine, so a rebound DNS name cannot reach them); their forms carry a
CSRF token keyed with a secret made at start.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass
from urllib.parse import quote

from fastapi import HTTPException, Request

COOKIE = "tb_admin"
COOKIE_PATH = "/admin"
SESSION_S = 12 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    """A caller allowed in: its CSRF token, and whether it came in with no token set."""

    csrf: str
    local: bool  # no admin token is set: loopback only, and every page says so


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is this machine."""
    if host.lower() in ("localhost", "testclient"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AdminAuth:
    """Issues and checks the admin pages' session cookies and CSRF tokens."""

    def __init__(self, token: str, token_env: str) -> None:
        self.token = token
        self.token_env = token_env
        self._key = token.encode() if token else secrets.token_bytes(32)

    def _sign(self, message: str) -> str:
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()

    def new_cookie(self, now: float | None = None) -> str:
        expiry = int((now if now is not None else time.time()) + SESSION_S)
        body = f"{expiry}.{secrets.token_hex(16)}"
        return f"{body}.{self._sign(body)}"

    def check_cookie(self, value: str, now: float | None = None) -> Session | None:
        """The session a cookie value stands for, or None when forged, garbled or expired."""
        expiry, _, rest = value.partition(".")
        nonce, _, signature = rest.partition(".")
        if not (expiry.isdigit() and nonce and signature):
            return None
        if not hmac.compare_digest(signature, self._sign(f"{expiry}.{nonce}")):
            return None
        if int(expiry) < (now if now is not None else time.time()):
            return None
        return Session(csrf=self._sign(f"csrf.{nonce}"), local=False)

    def check_token(self, given: str) -> bool:
        return bool(self.token) and hmac.compare_digest(given.encode(), self.token.encode())

    def session(self, request: Request) -> Session:
        """The caller's session; otherwise a redirect to the login form, or 403."""
        if not self.token:
            self._require_loopback(request)
            return Session(csrf=self._sign("csrf.local"), local=True)
        found = self.check_cookie(request.cookies.get(COOKIE, ""))
        if found is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise HTTPException(
                303,
                "log in first",
                headers={"Location": f"/admin/login?next={quote(target, safe='')}"},
            )
        return found

    def _require_loopback(self, request: Request) -> None:
        caller = request.client.host if request.client else ""
        if not is_loopback(caller) or not is_loopback(request.url.hostname or ""):
            raise HTTPException(
                403,
                "no admin token is set, so the admin pages answer on this machine only "
                f"(loopback); set {self.token_env} (the variable [admin] token_env names) "
                "to a long random secret to let admins in from elsewhere",
            )

    def check_csrf(self, session: Session, given: str) -> None:
        if not hmac.compare_digest(given.encode(), session.csrf.encode()):
            raise HTTPException(
                403, "the form's CSRF token is missing or stale: reload the page and try again"
            )


def safe_next(target: str | None) -> str:
    """Where to go after logging in: only somewhere under /admin on this site."""
    if not target or "\\" in target or "//" in target or target.startswith("/admin/login"):
        return "/admin"
    return target if target == "/admin" or target.startswith(("/admin/", "/admin?")) else "/admin"
