"""How many optimizer steps a training set gets: plain arithmetic, free of torch.

The trainer uses it to run a job and the planner (`grait.planning`) to predict one, so both
count the same steps.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from grait.config import JobConfig


def steps_per_epoch(n_examples: int, batch_size: int, accumulation: int = 1) -> int:
    return max(1, math.ceil(n_examples / (batch_size * accumulation)))


def auto_epochs(
    n_examples: int,
    batch_size: int,
    accumulation: int = 1,
    *,
    epochs: float = 3.0,
    min_steps: int = 48,
    max_epochs: float = 25.0,
) -> float:
    """`epochs: auto`: `epochs` passes, or as many whole passes as reach `min_steps` steps.

    A 60-question set at batch 16 is 4 steps an epoch: 3 epochs are 12 steps, too few for
    the LoRA to learn a refusal (bench.fit measures it), so small sets get more passes, up to
    `max_epochs`. Large sets keep `epochs`.
    """
    per_epoch = steps_per_epoch(n_examples, batch_size, accumulation)
    needed = math.ceil(min_steps / per_epoch)
    return float(min(max_epochs, max(epochs, needed)))


def resolved_epochs(cfg: JobConfig, n_examples: int) -> float:
    """The job's epochs as a number: `auto` resolved from the training-set size."""
    t = cfg.training
    if t.epochs != "auto":
        return float(t.epochs)
    return auto_epochs(
        n_examples,
        t.batch_size,
        t.gradient_accumulation_steps,
        epochs=t.auto.epochs,
        min_steps=t.auto.min_steps,
        max_epochs=t.auto.max_epochs,
    )
