"""What the pipeline tells its caller while it runs.

The library reports through a plain callback so the CLI can draw progress bars and the
service can persist events, without `grait/` knowing about either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

# Stage names, in the order the pipeline runs them. Baselines skip the gradient stages.
STAGES: tuple[str, ...] = (
    "knowledge_query",
    "rehearsal",
    "warmup",
    "gradient_features",
    "selection",
    "training",
    "evaluation",
)

EventKind = Literal[
    "stage_started", "progress", "stage_completed", "stage_skipped", "metrics", "warning"
]


@dataclass(frozen=True)
class PipelineEvent:
    """One report from the pipeline: a stage boundary, progress inside a stage, or metrics."""

    kind: EventKind
    stage: str
    done: int = 0
    total: int = 0
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


ProgressCallback = Callable[[PipelineEvent], None]
CancelCheck = Callable[[], bool]


class Cancelled(Exception):
    """Raised between steps when the caller's cancel check answers True."""


def no_progress(event: PipelineEvent) -> None:
    """Default callback: ignore events."""


def never_cancel() -> bool:
    return False
