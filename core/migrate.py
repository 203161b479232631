"""Alembic, driven from code: `threadbridge db upgrade` and every start call `upgrade`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(connection: Any = None) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(sync_connection: Any) -> None:
    """Run every migration not yet applied, on an open (sync-facing) connection."""
    command.upgrade(alembic_config(sync_connection), "head")
