"""Emulators of the agent services, for tests and `threadbridge emulate NAME`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# name -> "module:factory"; each factory takes keyword options and returns an ASGI app.
EMULATORS: dict[str, str] = {
    "engage": "core.agents.emulators.engage:create_app",
    "sessions": "core.agents.emulators.sessions:create_app",
    "execute": "core.agents.emulators.execute:create_app",
    "rowboat": "core.agents.emulators.rowboat:create_app",
    "openai": "core.agents.emulators.openai:create_app",
}


def load(name: str) -> Callable[..., Any]:
    """The app factory of the emulator called `name`; KeyError listing the known names."""
    try:
        target = EMULATORS[name]
    except KeyError:
        known = ", ".join(sorted(EMULATORS))
        raise KeyError(f"no emulator called {name!r}; known: {known}") from None
    module_name, _, attribute = target.partition(":")
    factory: Callable[..., Any] = getattr(importlib.import_module(module_name), attribute)
    return factory
