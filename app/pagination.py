"""OpenAI-style lists: `{"object": "list", "data", "has_more", "first_id", "last_id"}`."""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel

T = TypeVar("T")

LimitQuery = Annotated[int, Query(ge=1, le=100, description="Items per page (1-100).")]
AfterQuery = Annotated[str | None, Query(description="Cursor: the `last_id` of the previous page.")]


class ListPage(BaseModel, Generic[T]):
    object: str = "list"
    data: list[T]
    has_more: bool
    first_id: str | None
    last_id: str | None


def page_of(items: list[Any], *, limit: int, to_schema: Any) -> dict[str, Any]:
    """`items` was fetched with limit + 1 rows: the extra row only says there is more."""
    has_more = len(items) > limit
    data = [to_schema(item) for item in items[:limit]]
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0].id if data else None,
        "last_id": data[-1].id if data else None,
    }
