from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.models import Dataset


class DatasetCounts(BaseModel):
    mcqa: int
    oeqa: int


class DatasetObject(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    name: str
    filename: str
    format: str = Field(
        description="canonical | mmlu | arc | nq | openai_chat (as detected or named at upload)."
    )
    kind: Literal["mcqa", "oeqa", "mixed"]
    rows: int
    counts: DatasetCounts
    bytes: int
    sha256: str
    created_at: int = Field(description="Unix seconds.")

    @classmethod
    def of(cls, row: Dataset) -> DatasetObject:
        return cls(
            id=row.id,
            name=row.name,
            filename=row.filename,
            format=row.format,
            kind=row.kind,  # type: ignore[arg-type]
            rows=row.rows,
            counts=DatasetCounts(mcqa=row.mcqa_rows, oeqa=row.oeqa_rows),
            bytes=row.bytes,
            sha256=row.sha256,
            created_at=int(row.created_at.timestamp()),
        )


class DatasetDeleted(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    deleted: bool = True
