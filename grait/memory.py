"""Peak memory of a stage, measured the way the planner predicts it.

On CUDA: the caching allocator's peak of live tensors since the stage began. On Linux CPUs:
the process's peak resident set since the stage began (writing 5 to /proc/self/clear_refs
resets the high-water mark); elsewhere the process's peak so far, which never goes down.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

from grait.models import Runtime

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:  # not Linux, or not allowed: the peak stays the process's so far
        pass


def peak_memory(runtime: Runtime) -> int:
    """Bytes: CUDA peak allocated since the last reset, else the resident set's peak."""
    if runtime.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(runtime.device))
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB
