"""Test-wide rules: nothing leaves the machine; proxies never intercept loopback."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

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
