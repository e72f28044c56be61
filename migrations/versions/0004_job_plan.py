"""The plan a job was submitted with (predicted time and peak memory per stage), the compute
class whose workers may run it, and the queue those workers take turns from.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("plan", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("compute_class", sa.String(64), nullable=True))
    op.add_column("jobs", sa.Column("queue", sa.String(255), nullable=True))
    op.create_index("ix_jobs_queue", "jobs", ["queue"])


def downgrade() -> None:
    op.drop_index("ix_jobs_queue", table_name="jobs")
    op.drop_column("jobs", "queue")
    op.drop_column("jobs", "compute_class")
    op.drop_column("jobs", "plan")
