"""`python -m bench.quality --setting tradeoff|real|testbed [--smoke] [sizes as flags]`.

`tradeoff` (the study that judges methods): every method at several refusal budgets on the
topic-following and the uniform testbed, >= 5 paired seeds (`bench/quality/tradeoff.py`).
`testbed` and `real`: every method at the default budget, greedy generation.

Writes `bench/results/<name>/{results.md, summary.json, pw_pc.png}`; run folders and the
cached knowing model live under `bench/results/work/` and `bench/results/cache/` (ignored).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import RESULTS, SHARED_DATA, machine
from bench.quality import testbed
from bench.quality.report import write_results
from bench.quality.runner import METHODS, EvalSet, evaluate_all, train_all
from grait.config import ALL_LINEAR, DEFAULT_BASE_MODEL
from grait.data import load_records, take, write_jsonl

REAL_HYPER: dict[str, Any] = {
    "knowledge": {"batch_size": 16},
    # The library's training defaults (epochs auto: at least 48 steps): 2 epochs at this size
    # were 6 steps, and no method learned to refuse anything (issue 16).
    "training": {"batch_size": 16, "max_length": 384},
    "features": {"batch_size": 16},
    "evaluation": {"max_new_tokens": 12, "batch_size": 16},
}
TESTBED_HYPER: dict[str, Any] = {
    "knowledge": {"k_samples": 4, "max_new_tokens": 12, "batch_size": 16},
    "lora": {
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "target_modules": list(ALL_LINEAR),
    },
    "warmup": {"fraction": 0.1, "min_samples": 16, "learning_rate": 1e-3},
    "training": {"epochs": 3, "learning_rate": 1e-3, "batch_size": 16, "max_length": 256},
    "features": {"batch_size": 16},
}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_sets(hyper: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """`--set training.epochs=3`: the value is parsed as YAML."""
    for item in sets:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected group.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.split(".")
        node = hyper
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(raw)
    return hyper


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    p.add_argument("--setting", choices=["tradeoff", "real", "testbed"], default="tradeoff")
    p.add_argument("--smoke", action="store_true", help="tiny random model and tiny sizes (CI)")
    p.add_argument("--name", help="results folder name (default: the setting, or smoke-<setting>)")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--work-dir", type=Path, help="run folders (default: <results-dir>/work/<name>)")
    p.add_argument(
        "--cache-dir", type=Path, help="knowing-model cache (default: <results-dir>/cache)"
    )
    p.add_argument(
        "--base-model",
        default=None,
        help=f"alias, HF folder or hub id (default {DEFAULT_BASE_MODEL})",
    )
    p.add_argument("--seeds", type=int, help="number of seeds (default: testbed 3, real 1)")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma list; grait always runs (it computes the shared stages)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="GROUP.KEY=VALUE",
        help="override a JobConfig knob",
    )
    p.add_argument("--bootstrap", type=int, default=1000)
    real = p.add_argument_group("real setting")
    real.add_argument("--train", type=Path, default=SHARED_DATA / "arc_easy" / "test.jsonl")
    real.add_argument("--train-format", default="auto", help="auto|canonical|mmlu|arc|nq")
    real.add_argument("--n-train", type=int, default=240)
    real.add_argument(
        "--id-eval",
        type=Path,
        help="in-distribution eval file (default: held-apart questions of --train)",
    )
    real.add_argument("--id-format", default="auto")
    real.add_argument("--ood-eval", type=Path, default=SHARED_DATA / "mmlu" / "val")
    real.add_argument("--ood-format", default="auto")
    real.add_argument("--n-eval", type=int, default=80, help="questions per eval set")
    real.add_argument(
        "--data-seed", type=int, default=0, help="fixes the train/eval excerpts for every seed"
    )
    to = p.add_argument_group("tradeoff setting")
    to.add_argument("--profiles", default="topic,uniform", help="testbeds: topic, uniform")
    to.add_argument("--seed-start", type=int, default=0, help="first seed (fresh seeds confirm)")
    to.add_argument("--budgets", default="4,8,16,32", help="refusal budgets below 'all'")
    to.add_argument("--steps", type=int, default=16, help="optimizer steps at every budget")
    to.add_argument("--eval-sets", default="id,ood", help="id (training paraphrase), ood")
    to.add_argument("--eval-known", type=int, default=100)
    to.add_argument("--eval-unknown", type=int, default=100)
    tb = p.add_argument_group("testbed setting")
    tb.add_argument("--n-facts", type=int, default=160)
    tb.add_argument("--n-taught", type=int, default=80)
    tb.add_argument(
        "--n-rait-train", type=int, default=90, help="facts in the RAIT training set (half taught)"
    )
    tb.add_argument("--teach-epochs", type=float, default=6.0)
    tb.add_argument("--teach-lr", type=float, default=3e-3)
    return p


def _smoke_defaults(args: argparse.Namespace) -> None:
    args.n_train, args.n_eval = 16, 6
    args.n_facts, args.n_taught, args.n_rait_train, args.teach_epochs = 16, 8, 8, 1.0
    args.seeds = args.seeds or 1
    args.bootstrap = min(args.bootstrap, 200)


def prepare_real(args: argparse.Namespace, folder: Path) -> tuple[Path, list[EvalSet], str]:
    """Fixed excerpts (same for every seed and method), written as canonical JSONL."""
    train_all_recs = take(
        load_records(args.train, args.train_format),
        seed=args.data_seed,
        shuffle=True,
        offset=0,
        limit=None,
    )
    train = train_all_recs[: args.n_train]

    def eval_excerpt(path: str, fmt: str) -> list:
        """`--n-eval` records of an eval file, shuffled by `--data-seed`."""
        return take(
            load_records(path, fmt), seed=args.data_seed, shuffle=True, offset=0, limit=args.n_eval
        )

    if args.id_eval:
        id_recs = eval_excerpt(args.id_eval, args.id_format)
    else:
        id_recs = train_all_recs[args.n_train : args.n_train + args.n_eval]
        if len(id_recs) < args.n_eval:
            raise SystemExit(
                f"{args.train}: {len(train_all_recs)} records cannot give {args.n_train} train + {args.n_eval} eval"
            )
    ood = eval_excerpt(args.ood_eval, args.ood_format)
    names = (_label(args.id_eval or args.train) + "-id", _label(args.ood_eval) + "-ood")
    paths = {
        "train": folder / "train.jsonl",
        names[0]: folder / "eval_id.jsonl",
        names[1]: folder / "eval_ood.jsonl",
    }
    for key, recs in zip(paths, (train, id_recs, ood)):
        write_jsonl(paths[key], (r.to_json() for r in recs))
    evals = [EvalSet(names[0], paths[names[0]]), EvalSet(names[1], paths[names[1]])]
    desc = f"train {len(train)} from `{args.train}`; eval {len(id_recs)} ID, {len(ood)} OOD from `{args.ood_eval}`"
    return paths["train"], evals, desc


def _label(path: Path) -> str:
    path = Path(path)
    parent = (
        path.parent.name if path.name in ("test.jsonl", "dev.jsonl", "val", "test", "dev") else ""
    )
    stem = path.stem if path.is_file() else path.name
    return f"{parent}-{stem}" if parent else stem


def _with_earlier_profiles(
    summary_path: Path, results: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """This run's testbeds, plus the other testbeds an earlier run of the study stored.

    Each testbed is a study of its own (its knowing model, Stage 1, seeds), so a study too
    long for one session runs one `--profiles` at a time, each whole on one machine, and the
    results folder gathers them. A testbed run again replaces its earlier results.
    """
    from bench.quality.tradeoff import PROFILES

    if not summary_path.exists():
        return results
    now = {r["profile"] for r in results}
    earlier = [
        r for r in json.loads(summary_path.read_text())["results"] if r["profile"] not in now
    ]
    order = list(PROFILES)
    return sorted([*earlier, *results], key=lambda r: order.index(r["profile"]))


def main_tradeoff(args: argparse.Namespace) -> int:
    """The trade-off study over both testbeds (see bench/quality/tradeoff.py)."""
    from bench.quality import tradeoff
    from bench.quality.tradeoff_report import write_study

    name = args.name or ("smoke-tradeoff" if args.smoke else "tradeoff")
    cache = args.cache_dir or (args.results_dir / "cache")
    # Absolute: run folders are keyed by specs that hold data paths.
    work = (args.work_dir or (args.results_dir / "work" / name)).resolve()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    hyper = copy.deepcopy(tradeoff.STUDY_HYPER)
    hyper["training"]["max_steps"] = args.steps
    base_model = args.base_model or DEFAULT_BASE_MODEL
    sizes: dict[str, Any] = {}
    teach = testbed.TeachSettings(epochs=args.teach_epochs, learning_rate=args.teach_lr)
    if args.smoke:
        from grait.testing import make_tiny_model, tiny_hyperparameters

        base_model = args.base_model or str(make_tiny_model(cache / "tiny-model"))
        hyper = _merge(tiny_hyperparameters(), {"training": {"max_steps": 2}})
        sizes = {"n_facts": 48, "n_taught": 24}
        args.eval_known = args.eval_unknown = 6
        args.budgets = "2,4"
        teach = testbed.TeachSettings(epochs=1.0)
    hyper = _apply_sets(hyper, args.set)
    seeds = list(range(args.seed_start, args.seed_start + (args.seeds or 5)))
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    results = []
    started = time.perf_counter()
    for profile in [p.strip() for p in args.profiles.split(",") if p.strip()]:
        digest = hashlib.sha256(
            json.dumps(
                [
                    profile,
                    base_model,
                    hyper,
                    args.eval_known,
                    args.eval_unknown,
                    sizes,
                    teach.__dict__,
                ],
                sort_keys=True,
                default=list,
            ).encode()
        ).hexdigest()[:12]
        results.append(
            tradeoff.run_profile(
                profile,
                base_model=base_model,
                cache=cache,
                work=work / f"{profile}-{digest}",
                seeds=seeds,
                methods=methods,
                budgets=budgets,
                hyper=hyper,
                n_eval_known=args.eval_known,
                n_eval_unknown=args.eval_unknown,
                teach=teach,
                eval_sets=tuple(e.strip() for e in args.eval_sets.split(",") if e.strip()),
                log=_log,
                **sizes,
            )
        )
    header = [
        f"- Measured {time.strftime('%Y-%m-%d %H:%M')} on {machine()}.",
        (
            f"- Base model: `{args.base_model or ('tiny random Llama' if args.smoke else DEFAULT_BASE_MODEL)}`; "
            f"seeds {seeds[0]}–{seeds[-1]}; budgets {budgets} + all (= R-Tuning); "
            f"{hyper['training']['max_steps']} optimizer steps at every budget."
        ),
        f"- Hyperparameters: `{json.dumps(hyper, separators=(',', ':'))}`.",
        f"- Study wall time: {time.perf_counter() - started:.0f} s (cached cells count as 0).",
    ]
    for result in results:
        result["header"] = header
    results = _with_earlier_profiles(args.results_dir / name / "summary.json", results)
    paths = write_study(args.results_dir / name, results, header=header, n_boot=args.bootstrap)
    _log(f"wrote {paths['md']}")
    print(paths["md"].read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.setting == "tradeoff":
        if args.methods == ",".join(METHODS):
            args.methods = "grait,random-idk,stratified-random"
        return main_tradeoff(args)
    if args.smoke:
        _smoke_defaults(args)
    name = args.name or (f"smoke-{args.setting}" if args.smoke else args.setting)
    out_dir = args.results_dir / name
    work = args.work_dir or (args.results_dir / "work" / name)
    cache = args.cache_dir or (args.results_dir / "cache")
    seeds = list(range(args.seeds or (3 if args.setting == "testbed" else 1)))
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    hyper = copy.deepcopy(REAL_HYPER if args.setting == "real" else TESTBED_HYPER)
    base_model = args.base_model or DEFAULT_BASE_MODEL
    if args.smoke:
        from grait.testing import make_tiny_model, tiny_hyperparameters

        base_model = args.base_model or str(make_tiny_model(cache / "tiny-model"))
        smoke = {"evaluation": {"max_new_tokens": 4, "batch_size": 8}}
        if args.setting == "real":
            smoke["knowledge"] = {"tau": 0.27}  # a random model's cloze probabilities sit near 1/4
        hyper = _merge(tiny_hyperparameters(), smoke)
    hyper = _apply_sets(hyper, args.set)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    extra: dict[str, Any] = {}
    if args.setting == "real":
        train_path, evals, desc = prepare_real(args, work / "data")
        share_stage1 = all(r.kind == "mcqa" for r in load_records(train_path, "canonical"))
    else:
        facts = testbed.make_facts(args.n_facts, args.n_taught)
        t0 = time.perf_counter()
        knowing, teaching = testbed.knowing_model(
            base_model,
            facts,
            cache,
            testbed.TeachSettings(epochs=args.teach_epochs, learning_rate=args.teach_lr),
            log=_log,
        )
        timings["teach facts + merge (cached)"] = round(time.perf_counter() - t0, 2)
        base_model = str(knowing)
        train_facts, eval_facts = testbed.split_facts(facts, args.n_rait_train)
        paths = testbed.write_sets(work / "data", train_facts, eval_facts)
        truth = [f.taught for f in eval_facts]
        evals = [
            EvalSet("facts-id", paths["id"], known=truth),
            EvalSet("facts-ood-paraphrase", paths["ood"], known=truth),
        ]
        train_path, share_stage1 = paths["train"], False
        desc = (
            f"{args.n_facts} invented facts, {args.n_taught} taught (LoRA r=16 all linear, {args.teach_epochs:g} epochs, "
            f"lr {args.teach_lr:g}, merged); RAIT train on {len(train_facts)} facts "
            f"({sum(f.taught for f in train_facts)} taught); eval on {len(eval_facts)} other facts "
            f"({sum(truth)} taught): ID = training paraphrase, OOD = an unseen paraphrase"
        )
        extra["teaching"] = teaching
    job = {
        "base_model": base_model,
        "train": {"path": str(train_path), "format": "canonical", "shuffle": False},
        **hyper,
    }
    # Run folders are keyed by everything that shapes them, so changed sizes or knobs never
    # resume a stale run (and unchanged reruns skip finished stages and evaluations).
    digest = hashlib.sha256(json.dumps(job, sort_keys=True).encode())
    for path in [train_path] + [ev.path for ev in evals]:
        digest.update(Path(path).read_bytes())
    work = work / digest.hexdigest()[:12]
    t0 = time.perf_counter()
    runs = train_all(
        job,
        seeds=seeds,
        methods=methods,
        work_dir=work,
        share_stage1_across_seeds=share_stage1,
        log=_log,
    )
    timings["training side, all methods and seeds"] = round(time.perf_counter() - t0, 2)
    ev_cfg = hyper.get("evaluation", {})
    t0 = time.perf_counter()
    base, base_seconds = evaluate_all(
        base_model,
        runs,
        evals,
        refusal=hyper.get("refusal", "I don't know."),
        max_new_tokens=int(ev_cfg.get("max_new_tokens", 24)),
        batch_size=int(ev_cfg.get("batch_size", 16)),
        work_dir=work,
        log=_log,
    )
    timings["evaluation, all models"] = round(time.perf_counter() - t0, 2)
    timings["total"] = round(time.perf_counter() - started, 2)
    paths = write_results(
        out_dir,
        setting=args.setting,
        smoke=args.smoke,
        base_model=args.base_model
        or (DEFAULT_BASE_MODEL if not args.smoke else "tiny random Llama (grait.testing)"),
        description=desc,
        machine=machine(),
        seeds=seeds,
        hyper=hyper,
        runs=runs,
        base=base,
        base_seconds=base_seconds,
        evals=evals,
        timings=timings,
        extra=extra,
        n_boot=args.bootstrap,
    )
    _log(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(paths["md"].read_text())
    return 0
