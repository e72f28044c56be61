"""Alembic is the schema: a fresh migrate on Postgres and SQLite equals the ORM models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.migrate import alembic_config
from app.models import Base

pytestmark = pytest.mark.timeout(60)


def diff_against_models(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_postgres_schema_from_migrations_matches_models(service_env: dict[str, str]) -> None:
    url = service_env[
        "GRAIT_DATABASE_URL"
    ]  # migrated by the session fixture via `python -m app db upgrade`
    assert diff_against_models(url) == []
    engine = create_engine(url)
    assert "alembic_version" in inspect(engine).get_table_names()
    engine.dispose()


def test_sqlite_schema_from_migrations_matches_models(tmp_path: Path) -> None:
    from alembic import command

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    command.upgrade(alembic_config(url), "head")
    assert diff_against_models(url) == []
    command.downgrade(alembic_config(url), "base")
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    engine.dispose()
