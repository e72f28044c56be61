"""How many optimizer steps does a LoRA need to learn the refusal? (The rule behind `epochs: auto`.)

For each training-set size and learning rate: Stage 1 labels the questions (the library's own
knowledge query), the RAIT set is R-Tuning's (every unknown -> the refusal, every known keeps
its answer), and one LoRA trains for `--steps` optimizer steps with the job's defaults. At each
checkpoint the training-fit check (`grait.fit_check`, the one every job runs) reports the share
of training refusals and of known answers the model now gives.

Checkpoints are read inside one cosine run, so a checkpoint at step s of S has seen a higher
learning rate than an s-step run would end on; the curve is a guide to the order of steps
needed, not an exact s-step result.

    .venv/bin/python -m bench.fit                       # ARC-Easy, 60 and 240 questions
    .venv/bin/python -m bench.fit --smoke               # tiny random model (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import machine

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.fit", description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, default=SHARED / "arc_easy" / "test.jsonl")
    p.add_argument("--format", default="arc")
    p.add_argument("--sizes", default="60,240", help="training-set sizes (questions)")
    p.add_argument("--learning-rates", default="2e-4", help="comma list")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--checkpoints", default="4,8,16,24,32,48,64")
    p.add_argument("--probe-rows", type=int, default=64, help="rows probed per kind")
    p.add_argument("--base-model", default=None)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--name", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny random model, tiny sizes")
    return p


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_one(
    base_model: str,
    train: Path,
    fmt: str,
    size: int,
    lr: float,
    steps: int,
    checkpoints: list[int],
    probe_rows: int,
    work: Path,
    hyper: dict[str, Any],
) -> dict[str, Any]:
    """One (size, learning rate): fit shares at every checkpoint."""
    from transformers import set_seed

    from grait.config import FitCheckConfig, JobConfig
    from grait.data import load_records, read_jsonl, take
    from grait.fit_check import check_fit
    from grait.knowledge import KnowledgeResult
    from grait.models import load_base_model, pick_runtime
    from grait.pipeline import run_pipeline
    from grait.prompts import encode_training_pair
    from grait.training import TrainSettings, WeightedExample, attached_lora, train_weighted

    spec = {"path": str(train), "format": fmt, "limit": size, "shuffle": True}
    stage1_cfg = JobConfig.model_validate(
        {"method": "rtuning", "base_model": base_model, "train": spec, **hyper}
    )
    stage1_dir = work / f"stage1-n{size}"
    run_pipeline(stage1_cfg, stage1_dir, until="knowledge_query")
    known = [
        KnowledgeResult(**r).known
        for r in read_jsonl(stage1_dir / "knowledge_query" / "knowledge.jsonl")
    ]
    records = take(
        load_records(train, fmt), seed=stage1_cfg.seed, shuffle=True, offset=0, limit=size
    )
    runtime = pick_runtime(stage1_cfg.device, stage1_cfg.dtype)
    model, tok = load_base_model(base_model, runtime)
    refusal = stage1_cfg.refusal
    t = stage1_cfg.training
    plan = [
        ("ik" if k else "idk", r, r.answer_text if k else refusal) for r, k in zip(records, known)
    ]
    encoded = [
        (kind, encode_training_pair(tok, r, target, refusal=refusal, max_length=t.max_length))
        for kind, r, target in plan
    ]
    fit_cfg = FitCheckConfig(max_rows=probe_rows)
    points: list[dict[str, Any]] = []
    started = time.perf_counter()

    def on_step(done: int, total: int) -> None:
        if done in checkpoints:
            fit = check_fit(peft, encoded, fit_cfg, pad_id=tok.pad_token_id, batch_size=16, seed=0)
            peft.train()
            points.append(
                {
                    "step": done,
                    "epochs": round(done * t.batch_size / len(encoded), 2),
                    "refusal_learned": fit.refusal_learned,
                    "answers_kept": fit.answers_kept,
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            _log(f"n={size} lr={lr:g} step {done}: {points[-1]}")

    set_seed(0)
    settings = TrainSettings(
        epochs=1.0,
        learning_rate=lr,
        batch_size=t.batch_size,
        lr_scheduler=t.lr_scheduler,
        warmup_ratio=t.warmup_ratio,
        grad_clip=t.grad_clip,
        max_steps=steps,
    )
    with attached_lora(model, spec=stage1_cfg.lora) as peft:
        train_weighted(
            peft,
            tok,
            [WeightedExample(e, 1.0) for _, e in encoded],
            settings,
            work_dir=work / "hf",
            on_step=on_step,
        )
    return {
        "size": size,
        "learning_rate": lr,
        "n_refusal": sum(1 for k, _ in encoded if k == "idk"),
        "n_answer": sum(1 for k, _ in encoded if k == "ik"),
        "steps_per_epoch": -(-len(encoded) // t.batch_size),
        "points": points,
    }


def _tiny_mcqa(path: Path, n: int) -> Path:
    """Invented four-option questions for the smoke run (a random model knows none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "id": f"q{i}",
            "question": f"Which colour is item {i}?",
            "options": ["red", "green", "blue", "black"],
            "answer": "ABCD"[i % 4],
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def write_results(out: Path, runs: list[dict[str, Any]], header: list[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Steps needed to learn the refusal (`python -m bench.fit`)", "", *header, ""]
    lines += [
        "| n | lr | refusals / answers | steps/epoch | step | epochs | refusals given | answers given |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        for p in r["points"]:
            lines.append(
                f"| {r['size']} | {r['learning_rate']:g} | {r['n_refusal']} / {r['n_answer']} | "
                f"{r['steps_per_epoch']} | {p['step']} | {p['epochs']:g} | "
                f"{_pct(p['refusal_learned'])} | {_pct(p['answers_kept'])} |"
            )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    return out / "results.md"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from grait.config import DEFAULT_BASE_MODEL

    hyper: dict[str, Any] = {"knowledge": {"batch_size": 16}}
    base_model = args.base_model or DEFAULT_BASE_MODEL
    sizes = [int(s) for s in args.sizes.split(",")]
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    name = args.name or ("smoke-fit" if args.smoke else "fit")
    if args.smoke:
        from grait.testing import make_tiny_model, tiny_hyperparameters

        base_model = str(make_tiny_model(args.results_dir / "cache" / "tiny-model"))
        args.train = _tiny_mcqa(args.results_dir / "work" / name / "train.jsonl", 24)
        args.format = "canonical"
        hyper = tiny_hyperparameters()
        sizes, args.steps, checkpoints = [12], 4, [2, 4]
    work = args.results_dir / "work" / name
    runs = []
    started = time.perf_counter()
    for size in sizes:
        for lr in [float(x) for x in args.learning_rates.split(",")]:
            runs.append(
                run_one(
                    base_model,
                    args.train,
                    args.format,
                    size,
                    lr,
                    args.steps,
                    [c for c in checkpoints if c <= args.steps],
                    args.probe_rows,
                    work / f"n{size}-lr{lr:g}",
                    hyper,
                )
            )
    header = [
        (
            f"- Measured {time.strftime('%Y-%m-%d %H:%M')} on {machine()}; "
            f"wall {time.perf_counter() - started:.0f} s."
        ),
        (
            f"- Base model `{base_model}`; train `{args.train.name}` ({args.format}); R-Tuning sets "
            f"(Stage 1 labels); default LoRA and batch; {args.steps}-step cosine runs read at "
            "checkpoints; fit = teacher-forced greedy-equivalent on up to "
            f"{args.probe_rows} rows per kind."
        ),
    ]
    path = write_results(args.results_dir / name, runs, header)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
