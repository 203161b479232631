"""Imports run one way: bots → adapters → core; core imports no platform SDK."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SDKS = {
    "slack_bolt",
    "slack_sdk",
    "discord",
    "telegram",
    "fastapi",
    "starlette",
    "uvicorn",
    "typer",
}


def imports(package: str) -> list[tuple[Path, str]]:
    found = []
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [(path, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((path, node.module))
    return found


def test_core_imports_no_adapter_bot_or_platform_sdk() -> None:
    # The agent-service emulators are ASGI apps by definition; they may use FastAPI.
    bad = [
        (str(p.relative_to(ROOT)), m)
        for p, m in imports("core")
        if m.split(".")[0] in {"adapters", "bots"}
        or (m.split(".")[0] in SDKS and "emulators" not in p.parts)
    ]
    assert bad == []


def test_adapters_never_import_bots_or_each_other() -> None:
    bad = []
    for path, module in imports("adapters"):
        top = module.split(".")
        own = path.relative_to(ROOT / "adapters").parts[0].removesuffix(".py")
        if top[0] == "bots" or (top[0] == "adapters" and len(top) > 1 and top[1] != own):
            bad.append((str(path.relative_to(ROOT)), module))
    assert bad == []
