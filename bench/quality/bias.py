"""A refusal bias at decoding time, measured on the adapters a trade-off study left behind.

`python -m bench.quality.bias --study tradeoff-craft --profile topic --name refusal-bias-topic`
probes chosen cells of a finished `--setting tradeoff` run once more (two teacher-forced
passes per eval question, `grait.refusal_score.probe_first_step`; cached per cell as
`first_step.json`, so the run resumes), checks that bias 0 reproduces the study's own greedy
outcomes, and writes `bench/results/<name>/{results.md, summary.json}`:

- `auto` by bias vs `auto` by budget: on one half of each seed's eval questions choose the
  bias (or, as `knowledge.n_idk: auto` does, the budget) with over-refusal within 5%, measure
  THS on the other half, swap halves; paired differences with a hierarchical bootstrap
  (seeds, then the test half's known and unknown questions; the choices held fixed);
- each cell's bias-traced trade-off area up to 30% over-refusal beside its method's
  budget-traced area.

Reads the study's `summary.json` (eval ids, base and probe outcomes), its run folders under
`bench/results/work/<study>/<profile>-*/` and the cached knowing model; teaches nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, machine, md_table
from bench.quality import testbed
from bench.quality.curves import CAP, tradeoff_area
from bench.quality.tradeoff import PROFILES
from bench.quality.tradeoff_report import known_of

TARGET = 0.05
# The cell whose bias `auto` is compared with budget `auto` (pre-registered).
PRIMARY = "random-idk:24"
DEFAULT_CELLS = "rtuning:all,random-idk:8,random-idk:24,craft:8,craft:24"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Cell:
    """One trained (method, budget) of one seed, probed at its first step."""

    seed: int
    method: str
    budget: str
    margin: np.ndarray  # [questions]
    refusal_rest: np.ndarray
    answer_top: np.ndarray  # gold's first token is the top non-refusal token
    answer_ref: np.ndarray  # gold's first token is the refusal's first token
    answer_rest: np.ndarray

    def outcomes(self, bias: float) -> tuple[np.ndarray, np.ndarray]:
        """(refused, correct) per question at `bias` (grait.refusal_bias.FirstStep.outcome)."""
        start = self.margin + bias > 0
        refused = start & self.refusal_rest
        correct = np.where(
            start,
            ~self.refusal_rest & self.answer_ref & self.answer_rest,
            self.answer_top & self.answer_rest,
        )
        return refused, correct


def _cell_from_json(seed: int, method: str, budget: str, probes: list[dict[str, Any]]) -> Cell:
    arr = lambda k: np.array([p[k] for p in probes])
    start = arr("answer_start")
    return Cell(
        seed,
        method,
        budget,
        arr("margin").astype(float),
        arr("refusal_rest").astype(bool),
        start == "top_other",
        start == "refusal_token",
        arr("answer_rest").astype(bool),
    )


def probe_cells(
    study: dict[str, Any],
    work: Path,
    knowing: Path,
    wanted: list[tuple[str, str]],
    facts: dict[str, testbed.Fact],
) -> tuple[list[Cell], dict[str, float]]:
    """Probe (or reuse) every wanted cell of every seed; returns the cells and probe seconds."""
    from dataclasses import asdict

    from grait.config import REFUSAL
    from grait.models import load_base_model, pick_runtime
    from grait.refusal_score import probe_first_step
    from grait.training import attached_lora

    model, tok = None, None
    cells, seconds = [], {}
    for s in study["seeds"]:
        records = [facts[i].record(0) for i in s["eval_ids"]]
        for method, budget in wanted:
            run_dir = work / f"seed{s['seed']}" / method / f"b{budget}"
            cache = run_dir / "first_step.json"
            if not cache.exists():
                if model is None:
                    model, tok = load_base_model(str(knowing), pick_runtime())
                started = time.perf_counter()
                with attached_lora(
                    model, adapter_dir=run_dir / "training" / "adapter", trainable=False
                ) as tuned:
                    probes = probe_first_step(tuned, tok, records, refusal=REFUSAL)
                took = time.perf_counter() - started
                cache.write_text(
                    json.dumps({"seconds": took, "probes": [asdict(p) for p in probes]})
                )
                _log(f"seed {s['seed']}: {method} b={budget} probed in {took:.0f}s")
            stored = json.loads(cache.read_text())
            seconds[f"{s['seed']}/{method}/{budget}"] = stored["seconds"]
            cells.append(_cell_from_json(s["seed"], method, budget, stored["probes"]))
    return cells, seconds


def prefetch(
    profile: str,
    seeds: list[int],
    work: Path,
    knowing: Path,
    wanted: list[tuple[str, str]],
    *,
    n_eval: int = 100,
    poll_seconds: float = 60.0,
) -> None:
    """Probe each wanted cell as soon as the running study has finished it (its `cell.json`),
    until every one is probed: the report's later run then only reads the caches."""
    from bench.quality.tradeoff import split_for_seed

    facts = testbed.make_facts(*PROFILES[profile], profile=profile)
    eval_ids = {s: [f.id for f in split_for_seed(facts, s, n_eval, n_eval)[1]] for s in seeds}
    study = {"profile": profile, "seeds": [{"seed": s, "eval_ids": eval_ids[s]} for s in seeds]}
    while True:
        missing = [
            (s, m, b)
            for s in seeds
            for m, b in wanted
            if not (work / f"seed{s}" / m / f"b{b}" / "first_step.json").exists()
        ]
        ready = [
            (s, m, b)
            for s, m, b in missing
            if (work / f"seed{s}" / m / f"b{b}" / "cell.json").exists()
        ]
        for s, m, b in ready:
            one = {**study, "seeds": [x for x in study["seeds"] if x["seed"] == s]}
            probe_cells(one, work, knowing, [(m, b)], {f.id: f for f in facts})
        if len(ready) == len(missing):
            return
        time.sleep(poll_seconds)


def study_facts(study: dict[str, Any]) -> list[testbed.Fact]:
    """The study's testbed facts, rebuilt from its sizes (make_facts is deterministic)."""
    n_taught = sum(f["taught"] for f in study["facts"])
    facts = testbed.make_facts(len(study["facts"]), n_taught, profile=study["profile"])
    if [f.id for f in facts] != [f["id"] for f in study["facts"]]:
        raise ValueError("the testbed's facts no longer match the study's: rerun the study")
    return facts


def agreement(study: dict[str, Any], cells: list[Cell]) -> float:
    """Share of (cell, question) whose bias-0 outcome equals the study's own probe outcome."""
    by = {(c["seed"], c["method"], str(c["budget"])): c for c in study["cells"]}
    same, total = 0, 0
    for cell in cells:
        theirs = np.array(by[(cell.seed, cell.method, cell.budget)]["probe"]["id"]["outcomes"])
        refused, correct = cell.outcomes(0.0)
        ours = np.where(refused, "refused", np.where(correct, "correct", "wrong"))
        same += int((ours == theirs).sum())
        total += len(theirs)
    return same / total


def choose_bias(cell: Cell, known: np.ndarray, idx: np.ndarray, target: float = TARGET) -> float:
    """grait.refusal_bias.choose_bias on the questions `idx` (kept in numpy for the bootstrap)."""
    from grait.refusal_bias import FirstStep
    from grait.refusal_bias import choose_bias as choose

    probes = [
        FirstStep(float(cell.margin[i]), bool(cell.refusal_rest[i]), "not_top", False) for i in idx
    ]
    return choose(probes, known[idx], target)


def ths(refused: np.ndarray, correct: np.ndarray, base: np.ndarray, idx: np.ndarray) -> float:
    """THS on questions `idx`; `base` holds the untuned model's outcomes (plain prompt)."""
    c, r = correct[idx].mean(), refused[idx].mean()
    w = 1.0 - c - r
    c0, w0 = (base[idx] == "correct").mean(), (base[idx] == "wrong").mean()
    return float(c - w * (c0 / w0)) if w0 > 0 else float("nan")


def bias_curve_area(cell: Cell, known: np.ndarray, cap: float = CAP) -> float:
    """Trade-off area of the curve traced by every bias (each threshold is one point)."""
    biases = np.append(-cell.margin + 1e-6, [-1e9, 1e9])
    over, recall = [], []
    for b in biases:
        refused, _ = cell.outcomes(float(b))
        over.append(refused[known].mean())
        recall.append(refused[~known].mean())
    return tradeoff_area(over, recall, cap)


def _halves(n_questions: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per seed the eval halves `_auto_simulation` gives its first method (rng seed 0)."""
    rng = np.random.default_rng(0)
    out = []
    for n in n_questions:
        idx = rng.permutation(n)
        out.append((idx[: n // 2], idx[n // 2 :]))
    return out


def _budget_rows(study: dict[str, Any], seed: int, method: str) -> list[dict[str, Any]]:
    """The method's cells of a seed by budget ascending, R-Tuning's as budget `all`."""
    rt = [c for c in study["cells"] if c["seed"] == seed and c["method"] == "rtuning"]
    if method == "rtuning":
        return rt
    mine = [c for c in study["cells"] if c["seed"] == seed and c["method"] == method]
    mine.sort(key=lambda c: int(c["budget"]))
    return mine + rt


def simulate(study: dict[str, Any], cells: list[Cell], *, n_boot: int = 1000) -> dict[str, Any]:
    """`auto` by bias (per probed cell) and by budget (per method), paired over (seed, half)."""
    seeds = study["seeds"]
    halves = _halves([len(s["eval_ids"]) for s in seeds])
    by_cell = {(c.seed, c.method, c.budget): c for c in cells}
    # Per seed and direction: (test idx, known, base, {label: (refused, correct)}).
    plans: list[list[tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]]] = []
    chosen: dict[str, list[Any]] = {}
    for s, (h1, h2) in zip(seeds, halves):
        known = known_of(s, "id")
        base = np.array(s["base"]["id"]["outcomes"])
        per_seed = []
        for a, b in ((h1, h2), (h2, h1)):
            arms: dict[str, Any] = {}
            for (seed, method, budget), cell in by_cell.items():
                if seed != s["seed"]:
                    continue
                bias = choose_bias(cell, known, a)
                arms[f"{method} b={budget} + bias"] = cell.outcomes(bias)
                chosen.setdefault(f"{method} b={budget} + bias", []).append(bias)
            for method in {c.method for c in cells if c.method != "rtuning"} | {"rtuning"}:
                rows = _budget_rows(study, s["seed"], method)
                refused = np.array(
                    [np.array(r["probe"]["id"]["outcomes"]) == "refused" for r in rows]
                )
                correct = np.array(
                    [np.array(r["probe"]["id"]["outcomes"]) == "correct" for r in rows]
                )
                over = refused[:, a][:, known[a]].mean(axis=1)
                ok = np.flatnonzero(over <= TARGET + 1e-9)
                label = f"{method} budget auto"
                if len(ok):
                    pick = int(ok.max())
                    arms[label] = (refused[pick], correct[pick])
                    chosen.setdefault(label, []).append(str(rows[pick]["budget"]))
                else:  # nothing within target: refuse nothing (THS of the base ≈ 0)
                    arms[label] = (np.zeros_like(known), base == "correct")
                    chosen.setdefault(label, []).append("none")
            per_seed.append((b, known, base, arms))
        plans.append(per_seed)
    labels = sorted(plans[0][0][3])

    def stat(label: str, other: str | None, picks: list[int], rng: np.random.Generator | None):
        vals = []
        for j in picks:
            per = []
            for test, known, base, arms in plans[j]:
                idx = test
                if rng is not None:
                    k, u = test[known[test]], test[~known[test]]
                    idx = np.concatenate([rng.choice(k, len(k)), rng.choice(u, len(u))])
                v = ths(*arms[label], base, idx)
                if other is not None:
                    v -= ths(*arms[other], base, idx)
                per.append(v)
            vals.append(np.mean(per))
        return float(np.mean(vals))

    def with_ci(label: str, other: str | None = None) -> list[float]:
        point = stat(label, other, list(range(len(plans))), None)
        rng = np.random.default_rng(0)
        draws = [
            stat(label, other, list(rng.integers(len(plans), size=len(plans))), rng)
            for _ in range(n_boot)
        ]
        lo, hi = np.nanpercentile(draws, [2.5, 97.5])
        return [point, float(lo), float(hi)]

    def held_out(label: str) -> dict[str, float]:
        over, unk = [], []
        for per_seed in plans:
            for test, known, _, arms in per_seed:
                refused = arms[label][0]
                over.append(refused[test][known[test]].mean())
                unk.append(refused[test][~known[test]].mean())
        return {"over_refusal": float(np.mean(over)), "unknown_refusal": float(np.mean(unk))}

    out: dict[str, Any] = {"target": TARGET, "arms": {}, "differences": {}}
    for label in labels:
        out["arms"][label] = {"ths": with_ci(label), **held_out(label), "chosen": chosen[label]}
    for cell_label in [lb for lb in labels if lb.endswith("+ bias")]:
        method = cell_label.split(" b=")[0]
        out["differences"][f"{cell_label} − {method} budget auto"] = with_ci(
            cell_label, f"{method} budget auto"
        )
    return out


def areas(study: dict[str, Any], cells: list[Cell]) -> dict[str, list[float]]:
    """Per probed cell: its bias-traced area (mean over seeds, with the seeds' sd)."""
    known = {s["seed"]: known_of(s, "id") for s in study["seeds"]}
    acc: dict[str, list[float]] = {}
    for c in cells:
        acc.setdefault(f"{c.method} b={c.budget}", []).append(bias_curve_area(c, known[c.seed]))
    return {k: [float(np.mean(v)), float(np.std(v))] for k, v in acc.items()}


def render(summary: dict[str, Any], study_name: str, budget_areas: dict[str, Any]) -> str:
    sim = summary["auto"]
    method, budget = summary["primary"].split(":")
    prim = f"{method} b={budget} + bias − {method} budget auto"
    fmt = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"
    lines = [
        f"# A refusal bias at decoding time, on the adapters of `{study_name}` ({summary['profile']})",
        "",
        (
            "Pre-registered in `PREREGISTERED.md`. Bias b is added to the logit of the refusal's "
            "first token at the first generated step; greedy otherwise (`grait/refusal_bias.py`)."
        ),
        "",
        (
            f"- Seeds {summary['seeds'][0]}–{summary['seeds'][-1]}; ID eval set; cells "
            f"{', '.join(summary['cells'])}."
        ),
        (
            f"- Bias 0 reproduces the study's greedy-equivalent outcomes on "
            f"{summary['agreement']:.2%} of (cell, question) pairs."
        ),
        (
            f"- Probe wall time per cell (two teacher-forced passes over the eval set): "
            f"{summary['probe_seconds']:.1f} s mean. Measured {summary['measured']} on {summary['machine']}."
        ),
        "",
        f"## `auto` at max over-refusal {sim['target']:.0%}: choose on one half, THS on the other",
        "",
        (
            f"**Primary** ({prim}): {fmt(sim['differences'][prim])} "
            "(mean over seeds of the two directions, 95% CI seeds→test-half questions)."
        ),
        "",
    ]
    rows = [
        [
            label,
            fmt(v["ths"]),
            f"{v['over_refusal']:.3f}",
            f"{v['unknown_refusal']:.3f}",
            ", ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in v["chosen"][:4])
            + (" …" if len(v["chosen"]) > 4 else ""),
        ]
        for label, v in sim["arms"].items()
    ]
    lines += [
        md_table(
            [
                "arm",
                "THS (test half)",
                "over-refusal (test)",
                "unknown refused (test)",
                "chosen (first 4)",
            ],
            rows,
        ),
        "",
        "Paired differences (bias − the same method's budget `auto`):",
        "",
        md_table(["difference", "THS"], [[k, fmt(v)] for k, v in sim["differences"].items()]),
        "",
        f"## Trade-off area up to {CAP:.0%} over-refusal: traced by bias vs by budget",
        "",
    ]
    rows = [[k, f"{v[0]:.3f} ± {v[1]:.3f}"] for k, v in summary["bias_areas"].items()]
    rows += [[f"{m} (budgets, study)", fmt([v[0], *v[1]])] for m, v in budget_areas.items()]
    lines += [md_table(["curve", "area (mean ± seed sd, or 95% CI)"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="tradeoff-craft", help="results folder of a tradeoff run")
    p.add_argument("--profile", default="topic", choices=list(PROFILES))
    p.add_argument("--cells", default=DEFAULT_CELLS, help="method:budget,...")
    p.add_argument("--name", default="refusal-bias-topic")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--base-model", default=None)
    p.add_argument("--primary", default=PRIMARY, help="method:budget of the primary difference")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--smoke", action="store_true", help="on `--setting tradeoff --smoke` output")
    p.add_argument(
        "--seeds", metavar="FIRST-LAST", help="only these of the study's seeds (default: all)"
    )
    p.add_argument(
        "--prefetch",
        metavar="FIRST-LAST",
        help="while the study runs: probe its seeds' cells as they finish, then exit (no report)",
    )
    args = p.parse_args(argv)

    from bench.quality.cli import DEFAULT_BASE_MODEL

    base_model = args.base_model or DEFAULT_BASE_MODEL
    teach = testbed.TeachSettings()
    if args.smoke:  # what `bench.quality --setting tradeoff --smoke` trains on
        from grait.testing import make_tiny_model

        base_model = args.base_model or str(
            make_tiny_model(args.results_dir / "cache" / "tiny-model")
        )
        teach = testbed.TeachSettings(epochs=1.0)
    wanted = [tuple(x.split(":")) for x in args.cells.split(",") if x]
    if args.prefetch:
        first, _, last = args.prefetch.partition("-")
        works = sorted(
            (args.results_dir / "work" / args.study).glob(f"{args.profile}-*"),
            key=lambda d: d.stat().st_mtime,
        )
        facts = testbed.make_facts(*PROFILES[args.profile], profile=args.profile)
        knowing = testbed.knowing_model_path(base_model, facts, args.results_dir / "cache", teach)
        if not works or not (knowing / "config.json").exists():
            p.error("no running study here to prefetch from")
        seeds = list(range(int(first), int(last or first) + 1))
        prefetch(args.profile, seeds, works[-1], knowing, wanted)  # type: ignore[arg-type]
        return 0
    folder = args.results_dir / args.study
    stored = json.loads((folder / "summary.json").read_text())
    study = next(r for r in stored["results"] if r["profile"] == args.profile)
    if args.seeds:
        first, _, last = args.seeds.partition("-")
        keep = set(range(int(first), int(last or first) + 1))
        study = {
            **study,
            "seeds": [s for s in study["seeds"] if s["seed"] in keep],
            "cells": [c for c in study["cells"] if c["seed"] in keep],
        }
    works = sorted(
        (args.results_dir / "work" / args.study).glob(f"{args.profile}-*"),
        key=lambda d: d.stat().st_mtime,
    )
    if not works:
        p.error(f"no run folders under {args.results_dir / 'work' / args.study}")
    knowing = testbed.knowing_model_path(
        base_model, study_facts(study), args.results_dir / "cache", teach
    )
    if not (knowing / "config.json").exists():
        p.error(f"the study's knowing model is not cached here ({knowing}); run the study first")
    if args.primary not in {f"{m}:{b}" for m, b in wanted}:
        p.error(f"--primary {args.primary} is not among --cells")
    facts = {f.id: f for f in study_facts(study)}
    cells, seconds = probe_cells(study, works[-1], knowing, wanted, facts)  # type: ignore[arg-type]
    summary = {
        "profile": args.profile,
        "primary": args.primary,
        "seeds": [s["seed"] for s in study["seeds"]],
        "cells": [f"{m} b={b}" for m, b in wanted],
        "agreement": agreement(study, cells),
        "probe_seconds": float(np.mean(list(seconds.values()))),
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "auto": simulate(study, cells, n_boot=args.bootstrap),
        "bias_areas": areas(study, cells),
    }
    study_summary = next(x for x in stored["summaries"] if x["profile"] == args.profile)
    budget_areas = study_summary["eval"]["id"]["area"]
    out = args.results_dir / args.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = render(summary, args.study, budget_areas)
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
