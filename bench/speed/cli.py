"""`python -m bench.speed [--smoke] [--only features,selection,knowledge,service]`.

Prints every figure and writes `bench/results/<name>/{results.md, summary.json}`. Feature
matrices for the selection figures go to `--scratch` (default under /tmp), never the repo.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, SHARED_DATA, machine, md_table, write_json
from grait.config import DEFAULT_BASE_MODEL
from grait.data import load_records, take, write_jsonl

PARTS = ("features", "selection", "knowledge", "service")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny random model and tiny sizes (CI)")
    p.add_argument("--name", help="results folder name (default speed, or smoke-speed)")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--scratch", type=Path, default=Path("/tmp/grait-bench-speed"))
    p.add_argument("--only", default=",".join(PARTS))
    p.add_argument("--base-model", default=None)
    p.add_argument(
        "--data",
        type=Path,
        default=SHARED_DATA / "arc_easy" / "dev.jsonl",
        help="MCQA file for features/knowledge/service",
    )
    p.add_argument("--ood-data", type=Path, default=SHARED_DATA / "mmlu" / "val")
    p.add_argument("--feature-samples", type=int, default=32)
    p.add_argument("--feature-batch", type=int, default=16)
    p.add_argument("--feature-targets", default="qv,all", help="comma list of qv | all")
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--selection-sizes", default="10000,100000")
    p.add_argument("--block-rows", type=int, default=4096)
    p.add_argument("--knowledge-questions", type=int, default=32)
    p.add_argument("--service-train", type=int, default=32)
    p.add_argument("--service-eval", type=int, default=8)
    p.add_argument("--service-method", default="grait")
    p.add_argument("--pollers", default="10,100", help="comma list of concurrent poller counts")
    p.add_argument("--poll-seconds", type=float, default=10.0)
    return p


def _smoke(args: argparse.Namespace) -> None:
    args.feature_samples, args.feature_batch, args.dim = 8, 4, 256
    args.feature_targets = "qv"
    args.selection_sizes = "1000,4000"
    args.knowledge_questions = 8
    args.service_train, args.service_eval = 12, 4
    args.poll_seconds = 3.0
    args.service_method = "van"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        _smoke(args)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = set(parts) - set(PARTS)
    if bad:
        raise SystemExit(f"--only: unknown {sorted(bad)}; choose from {', '.join(PARTS)}")
    name = args.name or ("smoke-speed" if args.smoke else "speed")
    out_dir = args.results_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    base_model = args.base_model or DEFAULT_BASE_MODEL
    if args.smoke and not args.base_model:
        from grait.testing import make_tiny_model

        base_model = str(make_tiny_model(args.scratch / "tiny-model"))
    summary: dict[str, Any] = {
        "machine": machine(),
        "base_model": args.base_model
        or (DEFAULT_BASE_MODEL if not args.smoke else "tiny random Llama (grait.testing)"),
        "smoke": args.smoke,
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
    }
    md = [
        f"# Speed benchmark{' (smoke)' if args.smoke else ''}",
        "",
        f"- Measured {summary['measured_at']} on {summary['machine']}.",
        f"- Base model: `{summary['base_model']}`. Each ratio is measured within one run, interleaved where possible.",
    ]
    if "features" in parts:
        from bench.speed.features import ALL_LINEAR, bench_features

        rows = []
        summary["features"] = []
        for t in args.feature_targets.split(","):
            targets = ["q_proj", "v_proj"] if t.strip() == "qv" else ALL_LINEAR
            r = bench_features(
                base_model,
                str(args.data),
                n=args.feature_samples,
                batch_size=args.feature_batch,
                dim=args.dim,
                targets=targets,
                log=_log,
            )
            summary["features"].append(r)
            s = r["seconds"]
            rows.append(
                [
                    r["targets"],
                    f"{r['lora_params']:,}",
                    r["n_samples"],
                    f"{r['mean_tokens']:.0f}",
                    r["dim"],
                    f"{s['floor']:.1f}",
                    f"{s['floor_answer_only']:.1f}",
                    f"{s['features']:.1f}",
                    f"{s['naive']:.1f}",
                    f"**{r['features_vs_floor']:.2f}x**",
                    f"{r['features_vs_floor_answer_only']:.2f}x",
                    f"{r['naive_vs_floor']:.2f}x",
                    f"{r['hook_vs_loop_rel_error']:.1e}",
                ]
            )
        md += [
            "",
            "## Per-sample gradient features (goal: within 1.5x of the floor)",
            "",
            (
                "floor = one plain batched forward+backward over the same samples; features = hooks + Adam preconditioning + "
                "two sparse projections + normalisation (`grait.features.compute_features`, which computes logits only at answer "
                "positions); floor* = the same plain pass with answer-only logits; naive = a batch-size-1 loop with "
                "the same post-processing. Error = hook vs loop per-sample gradients (relative L2)."
            ),
            "",
            md_table(
                [
                    "LoRA targets",
                    "LoRA params",
                    "samples",
                    "tokens/sample",
                    "d",
                    "floor s",
                    "floor* s",
                    "features s",
                    "naive s",
                    "features/floor",
                    "features/floor*",
                    "naive/floor",
                    "error",
                ],
                rows,
            ),
        ]
    if "selection" in parts:
        from bench.speed.selection import bench_selection

        rows = []
        summary["selection"] = []
        for n in [int(x) for x in args.selection_sizes.split(",")]:
            r = bench_selection(args.scratch, n, args.dim, block_rows=args.block_rows, log=_log)
            summary["selection"].append(r)
            rows.append(
                [
                    f"{r['candidates']:,}",
                    f"{r['known_rows']:,}",
                    r["dim"],
                    f"{r['on_disk_gb']:.2f}",
                    f"{r['float32_in_ram_gb']:.2f}",
                    f"**{r['seconds']:.1f}**",
                    f"{r['peak_anon_mb']:.0f}",
                    f"{r['peak_rss_mb']:.0f}",
                ]
            )
        md += [
            "",
            "## Selection + weighting on float16 memmaps (goal: 100k candidates within a minute)",
            "",
            (
                "Greedy selection (λ=μ=1, ρ=0) and adaptive weights, streamed in blocks of "
                f"{args.block_rows} rows from `.npy` memmaps (page cache warm). Peak anon = heap memory (sampled RssAnon); "
                "peak RSS (VmHWM) also counts the memmap's file pages, which the kernel can drop."
            ),
            "",
            md_table(
                [
                    "candidates",
                    "known rows",
                    "d",
                    "on disk GB",
                    "as float32 GB",
                    "seconds",
                    "peak anon MB",
                    "peak RSS MB",
                ],
                rows,
            ),
        ]
    if "knowledge" in parts:
        from bench.speed.knowledge import bench_knowledge

        r = bench_knowledge(
            base_model, str(args.data), n=args.knowledge_questions, batch_size=16, log=_log
        )
        summary["knowledge"] = r
        q = r["q_per_s"]
        md += [
            "",
            "## Knowledge query (cloze scoring), questions per second",
            "",
            md_table(
                ["mode", "questions/s", "speed-up of batched"],
                [
                    ["batched (16 sequences per forward)", f"{q['batched']:.2f}", "1.00x"],
                    [
                        "one question at a time (its options in one forward)",
                        f"{q['per_question']:.2f}",
                        f"{r['batched_speedup_vs_per_question']:.2f}x",
                    ],
                    [
                        "one sequence at a time (batch 1)",
                        f"{q['batch_1']:.2f}",
                        f"{r['batched_speedup_vs_batch_1']:.2f}x",
                    ],
                ],
            ),
            "",
            f"{r['questions']} ARC-Easy questions from `{args.data}`.",
        ]
    if "service" in parts:
        from bench.speed.service import bench_service
        from grait.testing import tiny_hyperparameters

        data = args.scratch / "service-data"
        train = take(
            load_records(args.data), seed=2, shuffle=True, offset=0, limit=args.service_train
        )
        ev = take(
            load_records(args.ood_data), seed=2, shuffle=True, offset=0, limit=args.service_eval
        )
        write_jsonl(data / "train.jsonl", (x.to_json() for x in train))
        write_jsonl(data / "eval.jsonl", (x.to_json() for x in ev))
        hyper: dict[str, Any] = (
            tiny_hyperparameters() if args.smoke else {"training": {"epochs": 1}}
        )
        hyper.setdefault("evaluation", {})["eval_base_refuse_prompt"] = False
        r = bench_service(
            args.scratch,
            base_model=base_model,
            train=data / "train.jsonl",
            evals=[data / "eval.jsonl"],
            hyper=hyper,
            method=args.service_method,
            pollers=[int(x) for x in args.pollers.split(",")],
            poll_seconds=args.poll_seconds,
            log=_log,
        )
        summary["service"] = r
        md += [
            "",
            "## Service (embedded mode: SQLite + local queue + worker; goal: overhead within 5% + a few seconds)",
            "",
            (
                f"One `{args.service_method}` job ({args.service_train} train questions, {args.service_eval} eval questions, "
                f"hyperparameters `{hyper}`)."
            ),
            "",
            md_table(
                ["path", "seconds"],
                [
                    ["pipeline called directly (fresh process)", f"{r['direct_seconds']:.1f}"],
                    ["through API + queue + worker (POST to succeeded)", f"{r['api_seconds']:.1f}"],
                    [
                        "overhead",
                        f"**{r['overhead_seconds']:+.1f} s ({(r['overhead_ratio'] - 1) * 100:+.1f}%)**",
                    ],
                ],
            ),
            "",
            (
                f"`GET /v1/jobs/{{id}}` under concurrent pollers (httpx async, loopback, {args.poll_seconds:.0f} s each, "
                "10 s client timeout; errors = timeouts or non-200):"
            ),
            "",
            md_table(
                [
                    "pollers",
                    "requests ok",
                    "requests/s",
                    "p50 ms",
                    "p99 ms",
                    "max ms",
                    "errors",
                    "error kinds",
                ],
                [
                    [
                        p["clients"],
                        p["requests_ok"],
                        f"{p['requests_per_s']:.0f}",
                        f"{p['p50_ms']:.1f}",
                        f"{p['p99_ms']:.1f}",
                        f"{p['max_ms']:.1f}",
                        p["errors"],
                        ", ".join(f"{k}: {v}" for k, v in p["error_kinds"].items()) or "–",
                    ]
                    for p in r["pollers"]
                ],
            ),
        ]
    (out_dir / "results.md").write_text("\n".join(md) + "\n")
    write_json(out_dir / "summary.json", summary)
    print("\n".join(md))
    return 0
