"""A short check of the CUDA path: one GRAIT run end to end on the GPU, with stage timings.

    PYTHONPATH=. python scripts/gpu_check.py --data ../shared/data --out gpu-check [--random-weights]

It runs every stage (knowledge query, warm-up, gradient features, selection, weighted
training, evaluation) with the device and dtype picked by `grait.models.pick_runtime`
(CUDA + bf16 on Ampere or newer), then checks what a user relies on: the adapter and report
exist, every rate is a probability, the features are finite and unit-norm, and the tuned
adapter's weights changed. `--random-weights` fills a model folder that holds only the config
and tokenizer with random weights of the real shape (for machines the packaged weights can't
reach): timings stay real, quality numbers mean nothing then.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from grait.config import DEFAULT_BASE_MODEL, JobConfig
from grait.models import pick_runtime, resolve_model_path
from grait.pipeline import PipelineResult, run_pipeline


def fill_random_weights(model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    if (model_dir / "model.safetensors").exists():
        return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    model.save_pretrained(model_dir)


def check_outputs(result: PipelineResult) -> dict[str, bool]:
    """What a user relies on after a run: adapter, probabilities, unit-norm features, training."""
    checks: dict[str, bool] = {}
    checks["adapter saved"] = any(result.adapter_dir.glob("adapter_model.*"))
    rates = [
        m[k]
        for ev in result.report["evals"]
        for m in ev["models"]
        for k in ("correct", "wrong", "refused")
    ]
    checks["rates are probabilities"] = all(0.0 <= r <= 1.0 for r in rates) and bool(rates)
    feature_files = sorted(result.run_dir.rglob("*.npy"))
    norms_ok = bool(feature_files)
    for path in feature_files:
        matrix = np.load(path, mmap_mode="r")
        if matrix.ndim == 2 and len(matrix):
            norms = np.linalg.norm(np.asarray(matrix, dtype=np.float32), axis=1)
            norms_ok &= bool(np.isfinite(norms).all() and np.allclose(norms, 1.0, atol=2e-2))
    checks["features finite and unit-norm"] = norms_ok
    from safetensors.torch import load_file

    adapter = load_file(next(result.adapter_dir.glob("adapter_model.safetensors")))
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    checks["LoRA B weights moved from zero"] = bool(lora_b) and all(
        t.abs().sum() > 0 for t in lora_b
    )
    return checks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the shared data folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default=DEFAULT_BASE_MODEL)
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--allow-cpu", action="store_true", help="dry-run the check itself on CPU")
    args = p.parse_args()

    runtime = pick_runtime()
    info = {
        "torch": torch.__version__,
        "device": str(runtime.device),
        "dtype": str(runtime.dtype),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    print(json.dumps(info), flush=True)
    if runtime.device.type != "cuda" and not args.allow_cpu:
        print("no CUDA device: this check is for a GPU machine", file=sys.stderr)
        return 2
    if args.random_weights:
        fill_random_weights(Path(resolve_model_path(args.model)))

    config = JobConfig.model_validate(
        {
            "method": "grait",
            "base_model": args.model,
            "seed": 0,
            "train": {"path": str(args.data / "arc_easy" / "test.jsonl"), "limit": args.n_train},
            "evals": [
                {
                    "path": str(args.data / "arc_easy" / "dev.jsonl"),
                    "name": "arc_easy-dev",
                    "limit": args.n_eval,
                },
                {"path": str(args.data / "mmlu" / "val"), "name": "mmlu-val", "limit": args.n_eval},
            ],
            "knowledge": {"scorer": "cloze"},
            "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
            "features": {"dim": 8192},
            "training": {"epochs": 2, "learning_rate": 1e-3, "batch_size": 16},
            "evaluation": {"max_new_tokens": 12},
        }
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = run_pipeline(config, args.out / "run")
    wall = time.perf_counter() - started

    checks = check_outputs(result)
    summary = {
        **info,
        "wall_seconds": round(wall, 1),
        "stage_seconds": result.timings,
        "peak_gpu_memory_gb": (
            round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None
        ),
        "checks": checks,
        "evals": {
            ev["name"]: {
                m["name"]: {k: m.get(k) for k in ("correct", "wrong", "refused", "ths")}
                for m in ev["models"]
            }
            for ev in result.report["evals"]
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
