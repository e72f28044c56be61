"""Compute classes: what a kind of worker can do, and how much of it our stages reach.

A class pairs the hardware's limits (peak FLOP/s by dtype from the spec sheet, memory
bandwidth, memory) with efficiencies: the share of peak each stage reaches. `bench.speed
--only calibrate` measures the efficiencies on a machine and writes them as JSON
(`calibration/<class>.json` beside this module ships the measured ones); a class without a
measurement uses cautious defaults and says so in every plan.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

CALIBRATION_DIR = Path(__file__).with_name("calibration")


@dataclass(frozen=True)
class Efficiency:
    """Shares of peak reached per kind of work, and the fixed costs no FLOP count sees."""

    prefill: float = 0.4  # inference forwards: knowledge query, prompt prefill, probes
    training: float = 0.3  # LoRA forward + backward: warm-up, training, rehearsal
    features: float = 0.25  # forward + backward with per-sample gradient capture
    decode: float = 0.4  # generation: share of peak memory bandwidth per new token
    seconds_per_layer_call: float = 1e-4  # one block in one forward call (Python + launches)
    seconds_per_step: float = 0.05  # one optimizer step's bookkeeping in the Trainer
    seconds_per_stage: float = 1.0  # starting a stage: LoRA attach, Trainer set-up, saving


@dataclass(frozen=True)
class ComputeClass:
    name: str
    device: Literal["cpu", "cuda"]
    description: str
    memory_bytes: float
    bandwidth: float  # bytes/s
    peak_flops: dict[str, float]  # by torch dtype name
    efficiency: Efficiency = field(default_factory=Efficiency)
    # Memory in use before any tensor: the CUDA context and cuBLAS workspace on a GPU; the
    # interpreter, torch and the tokenizer in a CPU worker's resident set.
    runtime_bytes: float = 0.6 * 1024**3
    calibration: str | None = None  # where the efficiencies were measured; None = defaults

    def peak(self, dtype: str) -> float:
        return self.peak_flops.get(dtype) or self.peak_flops["float32"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


GIB = 1024**3

# Spec-sheet peaks: dense tensor-core FLOP/s (no sparsity), HBM bandwidth, memory users see.
_BUILT_IN: dict[str, ComputeClass] = {
    c.name: c
    for c in (
        ComputeClass(
            "cpu",
            "cpu",
            "any CPU worker; peak and efficiencies measured on the calibration machine",
            memory_bytes=16 * GIB,
            bandwidth=20e9,
            peak_flops={"float32": 1e11},
            # HF Trainer steps and stage set-up cost more in Python time on a CPU
            efficiency=Efficiency(seconds_per_step=0.25, seconds_per_stage=0.5),
            runtime_bytes=0.7 * GIB,
        ),
        ComputeClass(
            "gpu-h100-80g",
            "cuda",
            "NVIDIA H100 SXM 80 GB",
            memory_bytes=79.6 * GIB,
            bandwidth=3.35e12,
            peak_flops={"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
        ),
        ComputeClass(
            "gpu-h200-141g",
            "cuda",
            "NVIDIA H200 141 GB",
            memory_bytes=140.4 * GIB,
            bandwidth=4.8e12,
            peak_flops={"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
        ),
        ComputeClass(
            "gpu-a100-80g",
            "cuda",
            "NVIDIA A100 SXM 80 GB",
            memory_bytes=79.2 * GIB,
            bandwidth=2.04e12,
            peak_flops={"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
        ),
        ComputeClass(
            "gpu-l4-24g",
            "cuda",
            "NVIDIA L4 24 GB",
            memory_bytes=22.0 * GIB,
            bandwidth=0.3e12,
            peak_flops={"bfloat16": 121e12, "float16": 121e12, "float32": 30e12},
        ),
    )
}


def compute_classes() -> list[str]:
    return sorted(_BUILT_IN)


def built_in_class(name: str) -> ComputeClass:
    """A class as shipped, before any calibration file (what a new calibration starts from)."""
    if name not in _BUILT_IN:
        raise ValueError(f"unknown compute class {name!r}; known: {', '.join(compute_classes())}")
    return _BUILT_IN[name]


def _calibration_dirs() -> list[Path]:
    """$GRAIT_CALIBRATION_DIR first (a deployment's own measurements), then the shipped ones."""
    extra = os.environ.get("GRAIT_CALIBRATION_DIR")
    return ([Path(extra)] if extra else []) + [CALIBRATION_DIR]


def load_compute_class(name: str) -> ComputeClass:
    """A built-in class with its measured calibration applied, if one exists."""
    cls = built_in_class(name)
    for folder in _calibration_dirs():
        path = folder / f"{name}.json"
        if path.exists():
            return apply_calibration(cls, json.loads(path.read_text()))
    return cls


def apply_calibration(cls: ComputeClass, raw: dict[str, Any]) -> ComputeClass:
    """Overlay measured numbers (peak, memory, efficiencies) on a class."""
    eff = replace(cls.efficiency, **raw.get("efficiency", {}))
    return replace(
        cls,
        peak_flops={**cls.peak_flops, **raw.get("peak_flops", {})},
        memory_bytes=float(raw.get("memory_bytes", cls.memory_bytes)),
        runtime_bytes=float(raw.get("runtime_bytes", cls.runtime_bytes)),
        bandwidth=float(raw.get("bandwidth", cls.bandwidth)),
        efficiency=eff,
        calibration=str(raw.get("source", "calibration file")),
    )
