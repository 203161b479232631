"""Every shipped config file validates, with its secrets set."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.config import load_config

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "config").rglob("*.toml"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_is_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in re.findall(r'_env\s*=\s*"([A-Z0-9_]+)"', path.read_text(encoding="utf-8")):
        monkeypatch.setenv(name, "set-for-the-test")
    config = load_config(path)
    assert config.default_agent in config.agent_configs
