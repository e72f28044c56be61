"""`python -m bench.speed [--smoke] [--only features,selection,knowledge,service,pollers]`.

Prints every figure and writes `bench/results/<name>/{results.md, summary.json}`. Each part
is stored with its own date and machine, and a run replaces only the parts it ran, so one part
can be remeasured (`--only pollers`) without discarding the others. Feature matrices for the
selection figures go to `--scratch` (default under /tmp), never the repo.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, SHARED_DATA, machine, md_table, write_json
from grait.config import DEFAULT_BASE_MODEL
from grait.data import load_records, take, write_jsonl

PARTS = (
    "features",
    "selection",
    "knowledge",
    "service",
    "pollers",
    "uploads",
    "limits",
    "sharding",
)


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
    p.add_argument(
        "--poll-processes",
        type=int,
        default=2,
        help="load-generator processes the pollers are spread over",
    )
    p.add_argument("--poll-seconds", type=float, default=10.0)
    p.add_argument("--uploads", type=int, default=16, help="concurrent large uploads")
    p.add_argument("--upload-rows", type=int, default=40_000, help="rows per uploaded file")
    p.add_argument(
        "--limits-class",
        default=None,
        help="compute class the limits part calibrates (default: cpu, or the GPU's class)",
    )
    p.add_argument("--calibrate-train", type=int, default=48)
    p.add_argument("--validate-train", type=int, default=192)
    p.add_argument("--limits-eval", type=int, default=16)
    p.add_argument(
        "--write-calibration",
        action="store_true",
        help="store the fitted efficiencies in grait/planning/calibration/<class>.json",
    )
    p.add_argument("--shard-questions", type=int, default=128, help="sharding: training questions")
    p.add_argument("--shard-rows", type=int, default=32, help="sharding: rows per shard")
    p.add_argument("--note", help="stored with the parts measured now, e.g. what else ran")
    return p


def _smoke(args: argparse.Namespace) -> None:
    args.feature_samples, args.feature_batch, args.dim = 8, 4, 256
    args.feature_targets = "qv"
    args.selection_sizes = "1000,4000"
    args.knowledge_questions = 8
    args.service_train, args.service_eval = 12, 4
    args.poll_seconds = 3.0
    args.uploads, args.upload_rows = 4, 2000
    args.service_method = "van"
    args.calibrate_train, args.validate_train, args.limits_eval = 12, 20, 4
    args.shard_questions, args.shard_rows = 12, 4


def _load_summary(path: Path) -> dict[str, Any]:
    """The stored parts; a summary from before per-part storage is read as one dated run."""
    if not path.exists():
        return {"parts": {}}
    old = json.loads(path.read_text())
    if "parts" in old:
        return old
    stamp = {k: old.get(k) for k in ("machine", "base_model", "measured_at")}
    parts = {k: {**stamp, "result": old[k]} for k in PARTS if k in old}
    if "service" in parts and "pollers" in parts["service"]["result"]:
        parts["pollers"] = {**stamp, "result": parts["service"]["result"].pop("pollers")}
    return {"parts": parts, "smoke": old.get("smoke", False)}


def _run_features(args: argparse.Namespace, base_model: str) -> dict[str, Any]:
    from bench.speed.features import ALL_LINEAR, bench_features

    results = []
    for t in args.feature_targets.split(","):
        targets = ["q_proj", "v_proj"] if t.strip() == "qv" else ALL_LINEAR
        results.append(
            bench_features(
                base_model,
                str(args.data),
                n=args.feature_samples,
                batch_size=args.feature_batch,
                dim=args.dim,
                targets=targets,
                log=_log,
            )
        )
    return {"result": results}


def _md_features(part: dict[str, Any]) -> list[str]:
    rows = []
    for r in part["result"]:
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
    return [
        "## Per-sample gradient features (goal: within 1.5x of the floor)",
        "",
        _stamp(part),
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


def _run_selection(args: argparse.Namespace, base_model: str) -> dict[str, Any]:
    from bench.speed.selection import bench_selection

    sizes = [int(x) for x in args.selection_sizes.split(",")]
    results = [
        bench_selection(args.scratch, n, args.dim, block_rows=args.block_rows, log=_log)
        for n in sizes
    ]
    return {"result": results, "block_rows": args.block_rows}


def _md_selection(part: dict[str, Any]) -> list[str]:
    rows = [
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
        for r in part["result"]
    ]
    return [
        "## Selection + weighting on float16 memmaps (goal: 100k candidates within a minute)",
        "",
        _stamp(part),
        "",
        (
            "Greedy selection (λ=μ=1, ρ=0) and adaptive weights, streamed in blocks of "
            f"{part.get('block_rows', 4096)} rows from `.npy` memmaps (page cache warm). Peak anon = heap memory (sampled RssAnon); "
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


def _run_knowledge(args: argparse.Namespace, base_model: str) -> dict[str, Any]:
    from bench.speed.knowledge import bench_knowledge

    r = bench_knowledge(
        base_model, str(args.data), n=args.knowledge_questions, batch_size=16, log=_log
    )
    return {"result": r, "data": str(args.data)}


def _md_knowledge(part: dict[str, Any]) -> list[str]:
    r = part["result"]
    q = r["q_per_s"]
    return [
        "## Knowledge query (cloze scoring), questions per second",
        "",
        _stamp(part),
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
        f"{r['questions']} ARC-Easy questions from `{part.get('data', 'arc_easy/dev.jsonl')}`.",
    ]


def _run_service(args: argparse.Namespace, base_model: str) -> dict[str, Any]:
    from bench.speed.service import bench_service
    from grait.testing import tiny_hyperparameters

    data = args.scratch / "service-data"
    train = take(load_records(args.data), seed=2, shuffle=True, offset=0, limit=args.service_train)
    ev = take(load_records(args.ood_data), seed=2, shuffle=True, offset=0, limit=args.service_eval)
    write_jsonl(data / "train.jsonl", (x.to_json() for x in train))
    write_jsonl(data / "eval.jsonl", (x.to_json() for x in ev))
    hyper: dict[str, Any] = tiny_hyperparameters() if args.smoke else {"training": {"epochs": 1}}
    hyper.setdefault("evaluation", {})["eval_base_refuse_prompt"] = False
    r = bench_service(
        args.scratch,
        base_model=base_model,
        train=data / "train.jsonl",
        evals=[data / "eval.jsonl"],
        hyper=hyper,
        method=args.service_method,
        log=_log,
    )
    return {
        "result": r,
        "method": args.service_method,
        "n_train": args.service_train,
        "n_eval": args.service_eval,
        "hyperparameters": hyper,
    }


def _md_service(part: dict[str, Any]) -> list[str]:
    r = part["result"]
    job = (
        f"One `{part.get('method', 'grait')}` job ({part.get('n_train', 32)} train questions, "
        f"{part.get('n_eval', 8)} eval questions, hyperparameters "
        f"`{json.dumps(part.get('hyperparameters', {}))}`)."
    )
    return [
        "## Service overhead (embedded mode: SQLite + local queue + worker; goal: within 5% + a few seconds)",
        "",
        _stamp(part),
        "",
        job,
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
    ]


def _run_pollers(args: argparse.Namespace, base_model: str) -> dict[str, Any]:
    from bench.speed.service import bench_pollers

    r = bench_pollers(
        args.scratch,
        train=args.data,
        pollers=[int(x) for x in args.pollers.split(",")],
        seconds=args.poll_seconds,
        processes=args.poll_processes,
        log=_log,
    )
    return {"result": r, "seconds": args.poll_seconds, "processes": args.poll_processes}


def _md_pollers(part: dict[str, Any]) -> list[str]:
    rows = [
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
        for p in part["result"]
    ]
    generator = (
        f"aiohttp keep-alive clients spread over {part['processes']} load-generator processes"
        if "processes" in part
        else "one httpx async process"
    )
    return [
        "## Service: `GET /v1/jobs/{id}` under concurrent pollers",
        "",
        _stamp(part),
        "",
        (
            f"Embedded server (SQLite), loopback; {generator} on the same machine, "
            f"{part.get('seconds', 10):.0f} s per row, 10 s client timeout; errors = timeouts or "
            "non-200. Each poller sends its next request as soon as the last one is answered, "
            "so p50 ≈ pollers / throughput."
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
            rows,
        ),
    ]


def _run_uploads(args: argparse.Namespace, base_model: str) -> dict[str, Any]:
    from bench.speed.service import bench_uploads

    r = bench_uploads(
        args.scratch, train=args.data, uploads=args.uploads, rows=args.upload_rows, log=_log
    )
    return {"result": r}


def _md_uploads(part: dict[str, Any]) -> list[str]:
    r = part["result"]
    return [
        "## Service: job reads during concurrent large uploads",
        "",
        _stamp(part),
        "",
        (
            f"Embedded server (SQLite), loopback, one client process: `GET /v1/jobs/{{id}}` every "
            f"50 ms, first alone, then while {r['uploads']} uploads of {r['upload_mb']:.1f} MB "
            "(JSONL, validated on arrival) go up at once, more than the API's database slots: a "
            "read that waited for a slot held by a parsing upload would take as long as the uploads."
        ),
        "",
        md_table(
            ["", "value"],
            [
                ["upload statuses", ", ".join(map(str, r["upload_status"]))],
                [
                    "uploads wall / p50 / max (s)",
                    f"{r['uploads_wall_s']:.1f} / {r['upload_p50_s']:.1f} / {r['upload_max_s']:.1f}",
                ],
                ["reads alone: count, p50 ms", f"{r['reads_alone']}, {r['read_alone_p50_ms']:.1f}"],
                [
                    "reads during uploads: count, p50 / p99 / max ms",
                    (
                        f"{r['reads_during']}, {r['read_during_p50_ms']:.1f} / "
                        f"{r['read_during_p99_ms']:.1f} / {r['read_during_max_ms']:.1f}"
                    ),
                ],
                ["reads failed during uploads", str(r["read_failed_during"])],
            ],
        ),
    ]


def _run_limits(args: argparse.Namespace, base_model: str) -> dict[str, Any]:
    from bench.speed.limits import run_limits

    name = args.limits_class or "cpu"
    return {
        "result": run_limits(
            base_model=base_model,
            data=SHARED_DATA,
            work=args.scratch / "limits",
            class_name=name,
            calibrate_train=args.calibrate_train,
            validate_train=args.validate_train,
            n_eval=args.limits_eval,
            write_calibration=args.write_calibration and not args.smoke,
            log=_log,
        )
    }


def _md_limits(part: dict[str, Any]) -> list[str]:
    r = part["result"]
    cal = r["calibration_job"]
    rows = [
        [
            x["stage"],
            f"{x['tflop']:.3f}",
            f"{x['seconds']:.1f}",
            f"**{100 * x['mfu']:.1f}%**",
            f"{100 * x['bandwidth_share']:.1f}%" if "bandwidth_share" in x else "",
        ]
        for x in cal["ratios"]
    ]
    val = r["validation_job"]
    before = {s["stage"]: s for s in val["predicted"]["stages"]}
    knowing = {
        s["stage"]: s for s in val.get("predicted_knowing_split", val["predicted"])["stages"]
    }
    check = []
    for stage, got in val["measured"].items():
        if stage not in before:
            continue
        b, k = before[stage], knowing[stage]
        seconds = got["seconds"]
        check.append(
            [
                stage,
                f"{b['seconds']:.1f}",
                f"{k['seconds']:.1f}",
                f"{seconds:.1f}",
                f"{k['seconds'] / seconds:.2f}x" if seconds else "",
                f"{k['peak_memory_bytes'] / 1e9:.2f}",
                f"{got['peak_memory_bytes'] / 1e9:.2f}" if got["peak_memory_bytes"] else "",
            ]
        )
    eff = ", ".join(f"{k} {v:.3g}" for k, v in r["efficiency"].items())
    return [
        "## Each stage against the hardware's limit, and the planner checked on a second job",
        "",
        _stamp(part),
        "",
        *([f"Note: {part['note']}", ""] if part.get("note") else []),
        (
            f"Limits measured here ({r['dtype']}): peak matmul "
            f"{r['measured_peak_flops'] / 1e9:,.1f} GFLOP/s, copy bandwidth "
            f"{r['measured_bandwidth'] / 1e9:,.1f} GB/s. MFU = the planner's matmul FLOPs of the "
            "stage / (seconds × that peak); generation's bandwidth share = one read of every "
            "weight per new token / (seconds × that bandwidth). Calibration job: "
            f"{cal['questions']} ARC-Easy questions, method grait; efficiencies fitted with "
            f"the split Stage 1 found ({100 * cal.get('known_share', 0.5):.0f}% known)."
        ),
        "",
        md_table(["stage", "TFLOP", "seconds", "MFU", "bandwidth share"], rows),
        "",
        f"Fitted efficiencies (`grait.planning`): {eff}.",
        "",
        (
            f"Validation: a {val['questions']}-question job planned with those efficiencies: "
            "before it ran (half the questions assumed known, as a user would), and with the "
            f"split Stage 1 then found ({100 * val.get('known_share', 0.5):.0f}% known), which "
            "isolates the cost model's own error. "
            + part.get(
                "memory_note",
                "Measured peak memory on CPU: the resident set's high-water mark within the stage.",
            )
        ),
        "",
        md_table(
            [
                "stage",
                "predicted before s",
                "predicted, split known s",
                "measured s",
                "split known / measured",
                "predicted GB",
                "measured GB",
            ],
            check,
        ),
    ]


def _run_sharding(args: argparse.Namespace, base_model: str) -> dict[str, Any]:
    from bench.speed.sharding import bench_sharding
    from grait.testing import tiny_hyperparameters

    return {
        "result": bench_sharding(
            base_model,
            str(args.data),
            scratch=args.scratch,
            n=args.shard_questions,
            batch_size=args.feature_batch,
            dim=args.dim,
            rows_per_shard=args.shard_rows,
            hyper=tiny_hyperparameters() if args.smoke else None,
            log=_log,
        )
    }


def _md_sharding(part: dict[str, Any]) -> list[str]:
    r = part["result"]
    rows = []
    for name, label in (("one_worker", "one worker"), ("two_workers", "two workers")):
        x, same = r[name], r["same"][name]
        rows.append(
            [
                label,
                f"{x['wall_s']:.1f}",
                f"{x['load_s']:.1f}",
                f"{x['compute_s']:.1f}",
                "yes" if same["selection_equals_unsharded"] else "**no**",
                f"{same['max_abs_feature_diff']:.1e}",
            ]
        )
    return [
        "## Stage 2b in shards: two workers against one",
        "",
        _stamp(part),
        "",
        (
            f"{r['questions']} ARC-Easy questions → {r['feature_rows']} feature rows in "
            f"{r['shards']} shards of {r['rows_per_shard']} rows (batch {r['batch_size']}, "
            f"d = {r['dim']}). Each worker is a fresh process (start, model load, its shards) on "
            f"its own copy of the warm-up; one worker gets all {r['cores']} cores, two get half "
            f"each and run at once. The unsharded stage took {r['unsharded_stage_s']:.1f} s in "
            "process. Selection and features are compared with the unsharded stage's."
        ),
        "",
        md_table(
            [
                "",
                "wall s",
                "start + load s",
                "shards s",
                "same selection",
                "max |Δ feature|",
            ],
            rows,
        ),
        "",
        (
            f"**Two workers / one worker: {r['ratio_wall']:.2f}× wall, "
            f"{r['ratio_compute']:.2f}× shard compute** on this {r['cores']}-core machine: two "
            "workers here split the same cores, so this measures the cost of sharding more than "
            "its gain; on machines with a GPU each, the shards' compute divides by the workers."
        ),
    ]


def _stamp(part: dict[str, Any]) -> str:
    return (
        f"*Measured {part['measured_at']} on {part['machine']}; base model `{part['base_model']}`.*"
    )


RUNNERS = {
    "features": (_run_features, _md_features),
    "selection": (_run_selection, _md_selection),
    "knowledge": (_run_knowledge, _md_knowledge),
    "service": (_run_service, _md_service),
    "pollers": (_run_pollers, _md_pollers),
    "uploads": (_run_uploads, _md_uploads),
    "limits": (_run_limits, _md_limits),
    "sharding": (_run_sharding, _md_sharding),
}


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
    shown_model = args.base_model or (
        DEFAULT_BASE_MODEL if not args.smoke else "tiny random Llama (grait.testing)"
    )
    summary = _load_summary(out_dir / "summary.json")
    summary["smoke"] = args.smoke
    for part in parts:
        run, _ = RUNNERS[part]
        _log(f"{part}: measuring")
        entry = run(args, base_model)
        entry.update(
            measured_at=time.strftime("%Y-%m-%d %H:%M"), machine=machine(), base_model=shown_model
        )
        if args.note:
            entry["note"] = args.note
        summary["parts"][part] = entry
        write_json(out_dir / "summary.json", summary)  # a later part's failure keeps this one
    md = [
        f"# Speed benchmark{' (smoke)' if args.smoke else ''}",
        "",
        (
            "Each ratio is measured within one run, interleaved where possible, so it holds on a "
            "shared machine; absolute seconds do not. Parts are dated separately (`--only` "
            "remeasures some and keeps the rest)."
        ),
    ]
    for part in PARTS:
        if part in summary["parts"]:
            md += ["", *RUNNERS[part][1](summary["parts"][part])]
    (out_dir / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0
