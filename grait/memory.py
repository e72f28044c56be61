"""Peak memory of a stage, measured the way the planner predicts it.

On CUDA: the caching allocator's peak of live tensors since the stage began. On CPU there is
no per-stage counter, so it is the process's peak resident set so far (it never goes down):
a stage's figure is at least the largest of the stages before it.
"""

from __future__ import annotations

import resource
import sys

import torch

from grait.models import Runtime


def reset_peak_memory(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)


def peak_memory(runtime: Runtime) -> int:
    """Bytes: CUDA peak allocated since the last reset, else the process's peak RSS."""
    if runtime.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(runtime.device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB
