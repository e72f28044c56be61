"""Warnings on jobs (a job that succeeded but barely learned to refuse says so), and a
per-job wall-clock limit.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("warnings", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("time_limit_seconds", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "time_limit_seconds")
    op.drop_column("jobs", "warnings")
