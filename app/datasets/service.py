"""Datasets: accept an upload only once grait can read every record of it."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import APIError, not_found
from app.idempotency import Idempotency
from app.jobs.lifecycle import ACTIVE_STATUSES
from app.models import Dataset, Job, JobDataset
from app.storage import Storage
from grait.data import FORMATS, DataError, detect_format, load_records

UPLOAD_FORMATS = ("auto", *FORMATS)


def safe_filename(name: str | None) -> str:
    base = Path(name or "dataset").name
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "dataset"
    return cleaned[:200]


def inspect_file(
    path: Path, *, format: str, display_name: str, max_rows: int | None = None
) -> tuple[str, int, int]:
    """(format, mcqa rows, oeqa rows), or a 422 naming the line and field at fault."""
    if format not in UPLOAD_FORMATS:
        raise APIError(
            422,
            "invalid_request",
            f"format must be one of {', '.join(UPLOAD_FORMATS)}",
            param="format",
        )
    try:
        fmt = detect_format(path) if format == "auto" else format
        records = load_records(path, fmt)
    except DataError as exc:
        where = ", ".join(
            part
            for part in (
                f"line {exc.line}" if exc.line else "",
                f"field '{exc.field}'" if exc.field else "",
            )
            if part
        )
        message = f"{display_name}: {where + ': ' if where else ''}{exc.reason}"
        raise APIError(
            422, "invalid_dataset", message, param="file", line=exc.line, field=exc.field
        ) from None
    except UnicodeDecodeError as exc:
        raise APIError(
            422, "invalid_dataset", f"{display_name}: not UTF-8 text ({exc.reason})", param="file"
        ) from None
    except csv.Error as exc:
        raise APIError(
            422, "invalid_dataset", f"{display_name}: unreadable CSV ({exc})", param="file"
        ) from None
    if max_rows is not None and len(records) > max_rows:
        raise APIError(
            422,
            "too_many_rows",
            f"{display_name}: {len(records)} records; the limit is {max_rows} per dataset "
            "(GRAIT_MAX_DATASET_ROWS). Split the file or use `limit` on the job.",
            param="file",
            rows=len(records),
            max_rows=max_rows,
        )
    mcqa = sum(1 for r in records if r.kind == "mcqa")
    return fmt, mcqa, len(records) - mcqa


def dataset_key(dataset_id: str, display_name: str) -> str:
    """The stored name: `safe_filename` of the client's, under a folder named by the new id,
    so `../x` or `C:\\x` cannot point anywhere else."""
    return f"datasets/{dataset_id}/{display_name}"


def dataset_folder(stored_key: str) -> str:
    return str(Path(stored_key).parent)


def record_dataset(
    *,
    session: Session,
    tenant_id: str,
    dataset_id: str,
    stored_key: str,
    display_name: str,
    name: str | None,
    inspected: tuple[str, int, int],
    size: int,
    sha256: str,
    idempotency: Idempotency | None = None,
) -> Dataset:
    """Commit the row of a file already validated (`inspect_file`'s answer) and stored.

    The caller stores the file first, outside any database session (an object store's upload
    takes a while), and removes it again when this raises.
    """
    fmt, mcqa, oeqa = inspected
    try:
        row = Dataset(
            id=dataset_id,
            tenant_id=tenant_id,
            filename=display_name,
            name=(name or "").strip() or Path(display_name).stem,
            format=fmt,
            kind="mcqa" if not oeqa else "oeqa" if not mcqa else "mixed",
            rows=mcqa + oeqa,
            mcqa_rows=mcqa,
            oeqa_rows=oeqa,
            bytes=size,
            sha256=sha256,
            storage_key=stored_key,
        )
        session.add(row)
        if idempotency is not None:
            session.add(idempotency.record(dataset_id))
        session.commit()
        return row
    except BaseException:
        session.rollback()
        raise


def get_dataset(*, session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    """The tenant's dataset; another tenant's id is as unknown as a made-up one."""
    row = session.get(Dataset, dataset_id)
    if row is None or row.tenant_id != tenant_id:
        raise not_found("dataset", dataset_id)
    return row


def list_datasets(
    *, session: Session, tenant_id: str, after: str | None, limit: int, order: str = "desc"
) -> list[Dataset]:
    """Newest first (or oldest first with `order="asc"`); `after` is the previous page's last id."""
    newest_first = order == "desc"
    query = (
        select(Dataset)
        .where(Dataset.tenant_id == tenant_id)
        .order_by(Dataset.id.desc() if newest_first else Dataset.id)
        .limit(limit + 1)
    )
    if after:
        query = query.where(Dataset.id < after if newest_first else Dataset.id > after)
    return list(session.scalars(query))


def delete_dataset(*, session: Session, storage: Storage, tenant_id: str, dataset_id: str) -> None:
    row = session.scalar(
        select(Dataset)
        .where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)
        .with_for_update()
    )
    if row is None:
        raise not_found("dataset", dataset_id)
    users = list(
        session.scalars(
            select(Job.id)
            .join(JobDataset, JobDataset.job_id == Job.id)
            .where(JobDataset.dataset_id == dataset_id, Job.status.in_(ACTIVE_STATUSES))
            .distinct()
        )
    )
    if users:
        raise APIError(
            409,
            "dataset_in_use",
            f"Dataset {dataset_id} is used by active job(s) {', '.join(sorted(users))}; cancel them or wait.",
            param="id",
        )
    # Finished jobs keep their history; their link just loses the file.
    for link in session.scalars(select(JobDataset).where(JobDataset.dataset_id == dataset_id)):
        link.dataset_id = None
    session.delete(row)
    session.commit()
    storage.delete_prefix(dataset_folder(row.storage_key))
