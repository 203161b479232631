"""Test-wide rules: nothing leaves the machine; proxies never intercept loopback."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pg import PostgresServer, pg_bin

for _var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_var, None)

_LOOPBACK = ("127.", "::1", "localhost")
_real_connect = socket.socket.connect


def _offline_connect(self: socket.socket, address: Any) -> Any:
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not host.startswith(_LOOPBACK) and self.family != socket.AF_UNIX:
        raise OSError(f"test tried to reach {address!r}: tests run offline, loopback only")
    return _real_connect(self, address)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _offline_connect)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL for the session. CI must have it; elsewhere its tests are skipped."""
    if pg_bin("initdb") is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is missing: .ci/run installs it with apt-get")
        pytest.skip("PostgreSQL is not installed here (apt-get install postgresql)")
    # Not under pytest's temp dir: for root that folder is closed to the postgres user.
    root = Path(tempfile.mkdtemp(prefix="threadbridge-pg-"))
    root.chmod(0o755)
    server = PostgresServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store URL of each backend the store-touching tests run on."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/tb.db"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.database()
