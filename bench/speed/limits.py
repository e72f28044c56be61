"""Each stage against the hardware's limit, and the planner calibrated from it.

1. Measure this machine's limits: peak matmul FLOP/s in the run's dtype (best of repeated
   square matmuls) and copy bandwidth (a large tensor copy; read + write bytes).
2. Run a real job (`--calibrate-train` questions) and read each stage's time and peak memory.
3. Per stage, the model FLOP utilisation = the planner's FLOP count / (seconds × peak), and for
   generation the share of peak bandwidth its weight reads reach. Then solve, per kind of work,
   the efficiency that makes the planner predict the measured time (bisection: predicted
   time falls as the efficiency rises).
4. Validate: a second job of another size (`--validate-train`), predicted with the fitted
   efficiencies before it runs, against what it takes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from grait.config import JobConfig
from grait.models import pick_runtime
from grait.pipeline import run_pipeline
from grait.planning import ComputeClass, Plan, job_inputs, plan_config
from grait.planning.hardware import CALIBRATION_DIR, built_in_class

# Which efficiency a stage's time depends on (knowledge before the stages that reuse prefill).
STAGE_EFFICIENCY = {
    "knowledge_query": "prefill",
    "training": "training",
    "gradient_features": "features",
    "evaluation": "decode",
}


def peak_matmul_flops(
    device: torch.device, dtype: torch.dtype, *, size: int, repeats: int
) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def copy_bandwidth(device: torch.device, *, mib: int, repeats: int) -> float:
    """Bytes read + written per second by a plain tensor copy."""
    src = torch.empty(mib * 1024 * 1024 // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2.0 * src.numel() * 4 / best


def _resident_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _job(base_model: str, data: Path, n_train: int, n_eval: int) -> JobConfig:
    return JobConfig.model_validate(
        {
            "method": "grait",
            "base_model": base_model,
            "seed": 0,
            "train": {"path": str(data / "arc_easy" / "test.jsonl"), "limit": n_train},
            "evals": [
                {"path": str(data / "arc_easy" / "dev.jsonl"), "limit": n_eval, "name": "arc"}
            ],
        }
    )


def _measured(run_dir: Path) -> dict[str, dict[str, float]]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {
        stage: {"seconds": info["seconds"], "peak_memory_bytes": info.get("peak_memory_bytes", 0)}
        for stage, info in manifest["stages"].items()
    }


def known_share(run_dir: Path) -> float:
    """The share of training questions Stage 1 found known in a finished run."""
    split = json.loads((run_dir / "knowledge_query" / "split.json").read_text())
    return len(split["ik_all"]) / max(1, len(split["ik_all"]) + len(split["idk_all"]))


def _fit(
    predict: Callable[[float], float], measured: float, lo: float = 1e-4, hi: float = 1.0
) -> float | None:
    """The efficiency whose prediction equals `measured`; None when even `hi` is too slow or
    `lo` too fast (fixed costs alone exceed the measurement)."""
    if predict(hi) > measured or predict(lo) < measured:
        return None
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        if predict(mid) > measured:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5


def calibrate(
    cls: ComputeClass,
    config: JobConfig,
    measured: dict[str, dict[str, float]],
    *,
    share: float,
) -> ComputeClass:
    """Fit each stage kind's efficiency so the plan reproduces the measured seconds, planned
    with the known share Stage 1 really found (so the split is not part of the fit)."""
    inputs = job_inputs(config)
    for stage, kind in STAGE_EFFICIENCY.items():
        if stage not in measured:
            continue

        def predict(
            eff: float, kind: str = kind, stage: str = stage, current: ComputeClass = cls
        ) -> float:
            trial = replace(current, efficiency=replace(current.efficiency, **{kind: eff}))
            plan = plan_config(config, trial, inputs=inputs, known_share=share)
            return plan.stage(stage).seconds

        fitted = _fit(predict, measured[stage]["seconds"])
        if fitted is not None:
            cls = replace(cls, efficiency=replace(cls.efficiency, **{kind: round(fitted, 4)}))
    return cls


def limit_ratios(
    plan: Plan, measured: dict[str, dict[str, float]], cls: ComputeClass
) -> list[dict[str, Any]]:
    """Per stage: achieved FLOP/s against peak (MFU); generation also against bandwidth."""
    peak = cls.peak(plan.dtype)
    rows = []
    for s in plan.stages:
        if s.stage not in measured or not s.flops:
            continue
        seconds = measured[s.stage]["seconds"]
        row: dict[str, Any] = {
            "stage": s.stage,
            "tflop": s.flops / 1e12,
            "seconds": seconds,
            "mfu": s.flops / (seconds * peak),
        }
        if s.stage == "evaluation":
            # Each new token reads every weight once: bytes / seconds against peak bandwidth.
            reads = s.decode_steps * plan.weights_bytes
            row["bandwidth_share"] = reads / (seconds * cls.bandwidth)
        rows.append(row)
    return rows


def run_limits(
    *,
    base_model: str,
    data: Path,
    work: Path,
    class_name: str,
    calibrate_train: int,
    validate_train: int,
    n_eval: int,
    write_calibration: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    runtime = pick_runtime()
    baseline = _resident_bytes()
    cls = built_in_class(class_name)  # fit from the shipped defaults, not an older fit
    results: dict[str, Any] = {"class": class_name, "dtype": str(runtime.dtype).split(".")[-1]}

    log(f"limits: calibration job ({calibrate_train} questions)")
    config = _job(base_model, data, calibrate_train, n_eval)
    run_pipeline(config, work / "calibrate")
    measured = _measured(work / "calibrate")

    dtype = results["dtype"]
    on_gpu = runtime.device.type == "cuda"
    peak = peak_matmul_flops(
        runtime.device, runtime.dtype, size=8192 if on_gpu else 2048, repeats=10 if on_gpu else 5
    )
    bandwidth = copy_bandwidth(runtime.device, mib=1024, repeats=10 if on_gpu else 5)
    log(
        f"limits: peak {peak / 1e9:.1f} GFLOP/s ({dtype}), copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    measured_cls = replace(
        cls,
        peak_flops={**cls.peak_flops, dtype: peak},
        bandwidth=bandwidth,
        runtime_bytes=float(baseline) if not on_gpu else cls.runtime_bytes,
    )
    share = known_share(work / "calibrate")
    fitted = calibrate(measured_cls, config, measured, share=share)
    results["measured_peak_flops"] = peak
    results["measured_bandwidth"] = bandwidth
    results["spec_peak_flops"] = cls.peak_flops.get(dtype)
    results["efficiency"] = fitted.efficiency.__dict__
    results["calibration_job"] = {
        "questions": calibrate_train,
        "known_share": share,
        "measured": measured,
        "ratios": limit_ratios(plan_config(config, fitted, known_share=share), measured, fitted),
    }

    log(f"limits: validation job ({validate_train} questions), predicted before it runs")
    check = _job(base_model, data, validate_train, n_eval)
    predicted = plan_config(check, fitted)
    run_pipeline(check, work / "validate")
    got = _measured(work / "validate")
    actual = known_share(work / "validate")
    results["validation_job"] = {
        "questions": validate_train,
        "predicted": predicted.to_json(),  # before the run: half the questions assumed known
        "known_share": actual,
        "predicted_knowing_split": plan_config(check, fitted, known_share=actual).to_json(),
        "measured": got,
    }
    if write_calibration:
        source = (
            f"bench.speed --only limits on {time.strftime('%Y-%m-%d')} "
            f"({calibrate_train}-question {base_model} job, {runtime.device.type})"
        )
        payload = {
            "source": source,
            "peak_flops": {dtype: round(peak)},
            "bandwidth": round(bandwidth),
            "efficiency": fitted.efficiency.__dict__,
        }
        if not on_gpu:
            payload["runtime_bytes"] = baseline
            payload["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        CALIBRATION_DIR.mkdir(exist_ok=True)
        (CALIBRATION_DIR / f"{class_name}.json").write_text(json.dumps(payload, indent=2) + "\n")
        results["calibration_file"] = str(CALIBRATION_DIR / f"{class_name}.json")
    return results
