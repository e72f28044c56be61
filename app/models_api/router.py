from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from app.deps import REQUIRE_KEY
from app.errors import ERROR_RESPONSES
from grait.registry import describe_models

router = APIRouter(
    prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES, dependencies=[REQUIRE_KEY]
)


# Where a worker keeps weights on disk is the server's business, not a tenant's.
PRIVATE_FIELDS = frozenset({"path"})


def _model_object(info: dict[str, Any]) -> dict[str, Any]:
    return {"object": "model", **{k: v for k, v in info.items() if k not in PRIVATE_FIELDS}}


@router.get("")
async def list_models() -> dict[str, Any]:
    """Base models workers can load by alias, and where their weights come from. Any local
    Hugging Face directory or hub id is accepted as `base_model` too."""
    models = [_model_object(m) for m in await run_in_threadpool(describe_models)]
    return {
        "object": "list",
        "data": models,
        "has_more": False,
        "first_id": models[0]["id"] if models else None,
        "last_id": models[-1]["id"] if models else None,
    }
