"""Alembic environment: always handed an open connection by core.migrate."""

from __future__ import annotations

from alembic import context

from core.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `threadbridge db upgrade`, which supplies the database")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
