"""The job lifecycle: one module owns the status names and every transition; leases use the
database's clock."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from app.db import short_session
from app.jobs.lifecycle import JOB_STATUSES, TERMINAL_STATUSES, JobStatus, db_now

from .conftest import ROOT, settings_for

# A job status written or compared as a bare string outside the lifecycle module.
_STATUS = "|".join(s.value for s in JobStatus)
_BARE = re.compile(
    rf'Job\.status\s*[!=]=\s*"({_STATUS})"'
    rf'|Job\.status\.in_\(\(\s*"({_STATUS})"'
    rf'|\bjob\.status\s*=\s*"({_STATUS})"'
)


def test_status_names_and_transitions_live_in_the_lifecycle_module() -> None:
    offenders = []
    for folder in ("app", "worker"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "app" / "jobs" / "lifecycle.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if _BARE.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert set(TERMINAL_STATUSES) < set(JOB_STATUSES)
    assert JobStatus.QUEUED == "queued"  # stored and compared as the plain string


def test_db_now_reads_the_database_clock_on_postgres(service_env: dict[str, str]) -> None:
    with short_session(settings_for(service_env)) as session:
        stamped = db_now(session)
        server = session.execute(select(text("now()"))).scalar_one()
    assert stamped.tzinfo is not None and stamped.utcoffset() == timedelta(0)
    assert stamped == server  # one transaction: Postgres' now() is its start


def test_db_now_keeps_milliseconds_on_sqlite(tmp_path: Path) -> None:
    """CURRENT_TIMESTAMP's whole seconds would date a fresh heartbeat up to 1 s back."""
    engine = create_engine(f"sqlite:///{tmp_path / 'clock.db'}")
    stamps = []
    with Session(engine) as session:
        for _ in range(20):
            stamps.append(db_now(session))
    assert all(s.tzinfo is not None for s in stamps)
    assert any(s.microsecond for s in stamps)
    assert abs(stamps[0] - datetime.now(UTC)) < timedelta(seconds=5)
