"""Refusal trade-off study: every method at several refusal budgets over many paired seeds.

For each testbed profile (`topic`: knowledge follows the relation, 10%-90% taught;
`uniform`: half of every relation taught) and each seed:

1. The seed draws the eval facts (`--eval-known` taught + `--eval-unknown` untaught) and
   trains on the rest, so seeds vary the data as well as the training.
2. Stage 1 (the library's knowledge query) runs once over every fact and each seed's
   training set takes its rows from it; `grait.pipeline.run_pipeline(...,
   until="gradient_features")` then runs Stage 2 once per seed into `seed<k>/shared/`;
   every (method, budget) run links those stages and runs the
   library's own selection and training stages with `knowledge.n_idk = budget` and the same
   fixed number of optimizer steps at every budget (`training.max_steps`).
3. Each tuned adapter is probed on the ID (training paraphrase) and OOD (unseen paraphrase)
   questions with two teacher-forced passes (`grait.refusal_score`): greedy-equivalent
   outcomes and log p(refusal) − log p(gold).

Methods are paired within a seed: one training seed, one Stage 1 and one set of features;
random rankings draw from a seed of their own. The budget "all" is R-Tuning, shared by every
ranked method (at that budget every ranking picks the same set). Each cell is cached as JSON,
so a killed study resumes where it stopped.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.quality import testbed
from bench.quality.runner import link_stages
from grait.config import ALL_LINEAR, JobConfig
from grait.data import read_jsonl, write_jsonl
from grait.knowledge import KnowledgeResult, split_known_unknown
from grait.methods import method_spec
from grait.pipeline import FORMAT_VERSION, config_hash, run_pipeline

ALL = "all"  # the budget "every unknown" = R-Tuning
Log = Callable[[str], None]

PROFILES: dict[str, tuple[int, int]] = {"topic": (336, 168), "uniform": (330, 165)}

# RAIT hyperparameters for every method (the testbed's, with a fixed step count).
STUDY_HYPER: dict[str, Any] = {
    "knowledge": {"k_samples": 4, "max_new_tokens": 12, "batch_size": 16},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": list(ALL_LINEAR)},
    "warmup": {"fraction": 0.25, "min_samples": 16, "epochs": 2, "learning_rate": 1e-3},
    "features": {"batch_size": 16},
    "training": {"max_steps": 16, "learning_rate": 1e-3, "batch_size": 16, "max_length": 256},
}


@dataclass(frozen=True)
class SeedData:
    seed: int
    train: list[testbed.Fact]
    evals: list[testbed.Fact]  # sorted by id; `known` = taught
    folder: Path


def split_for_seed(
    facts: list[testbed.Fact], seed: int, n_known: int, n_unknown: int
) -> tuple[list[testbed.Fact], list[testbed.Fact]]:
    """The seed's eval facts (n_known taught + n_unknown untaught) and training facts."""
    rng = random.Random(10_000 + seed)
    taught = [f for f in facts if f.taught]
    untaught = [f for f in facts if not f.taught]
    if n_known >= len(taught) or n_unknown >= len(untaught):
        raise ValueError(
            f"{len(taught)} taught / {len(untaught)} untaught facts cannot give "
            f"{n_known} + {n_unknown} eval facts and leave some to train on"
        )
    evals = rng.sample(taught, n_known) + rng.sample(untaught, n_unknown)
    chosen = {f.id for f in evals}
    train = [f for f in facts if f.id not in chosen]
    rng.shuffle(train)
    return train, sorted(evals, key=lambda f: f.id)


def job_dict(base_model: str, train_path: Path, hyper: dict[str, Any]) -> dict[str, Any]:
    return {
        "base_model": base_model,
        "train": {"path": str(train_path), "format": "canonical", "shuffle": False},
        **hyper,
    }


def config_for(job: dict[str, Any], method: str, seed: int, budget: int | str) -> JobConfig:
    cfg = json.loads(json.dumps(job))
    if budget != ALL:
        cfg.setdefault("knowledge", {})["n_idk"] = int(budget)
    return JobConfig.model_validate({**cfg, "method": method, "seed": seed, "evals": []})


def stage1_all_facts(
    job: dict[str, Any], facts: list[testbed.Fact], folder: Path, log: Log
) -> dict[str, Any]:
    """The knowledge query over every fact once (the library's own stage, sampling seed 0).

    Stage 1 labels the user's data; it is not what the methods differ in, and on this testbed
    it costs more than a seed's features. Each seed's training set takes its rows from here.
    """
    path = folder / "all_facts.jsonl"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, (f.record(0).to_json() for f in facts))
    hyper = {k: v for k, v in job.items() if k not in ("base_model", "train")}
    config = config_for(job_dict(job["base_model"], path, hyper), "rtuning", 0, ALL)
    started = time.perf_counter()
    run_pipeline(config, folder / "stage1", until="knowledge_query")
    log(f"stage 1 on {len(facts)} facts ready ({time.perf_counter() - started:.0f}s)")
    rows = read_jsonl(folder / "stage1" / "knowledge_query" / "knowledge.jsonl")
    return {row["id"]: row for row in rows}


def write_seed_stage1(
    config: JobConfig, run_dir: Path, train: list[testbed.Fact], stage1: dict[str, Any]
) -> None:
    """Give `run_dir` a finished knowledge_query stage cut from the all-facts Stage 1."""
    if (run_dir / "manifest.json").exists():
        return
    out = run_dir / "knowledge_query"
    out.mkdir(parents=True, exist_ok=True)
    results = [KnowledgeResult(**stage1[f.record(0).id]) for f in train]
    split = split_known_unknown(results, config.knowledge)
    write_jsonl(out / "knowledge.jsonl", (r.to_json() for r in results))
    (out / "split.json").write_text(json.dumps(split.__dict__))
    manifest = {
        "version": FORMAT_VERSION,
        "config_hash": config_hash(config),
        "config": config.model_dump(mode="json"),
        "stages": {
            "knowledge_query": {
                "seconds": 0.0,
                "metrics": {"n_ik": len(split.ik_all), "n_idk": len(split.idk_all)},
                "shared_from": "stage1 over all facts",
            }
        },
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))


def prepare_seed(
    job: dict[str, Any], data: SeedData, stage1: dict[str, Any], log: Log
) -> tuple[dict[str, Any], Path]:
    """Stage 2 once per seed (resumable); returns the seed's job dict and shared run dir."""
    train_path = data.folder / "train.jsonl"
    if not train_path.exists():
        data.folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(train_path, (f.record(0).to_json() for f in data.train))
    hyper = {k: v for k, v in job.items() if k not in ("base_model", "train")}
    seed_job = job_dict(job["base_model"], train_path, hyper)
    shared = data.folder / "shared"
    write_seed_stage1(config_for(seed_job, "grait", data.seed, ALL), shared, data.train, stage1)
    started = time.perf_counter()
    run_pipeline(config_for(seed_job, "grait", data.seed, ALL), shared, until="gradient_features")
    log(f"seed {data.seed}: stages 1-2 ready ({time.perf_counter() - started:.0f}s)")
    return seed_job, shared


def train_cell(
    seed_job: dict[str, Any], shared: Path, run_dir: Path, method: str, seed: int, budget: int | str
) -> dict[str, Any]:
    """One (method, budget) run through the library's selection and training stages."""
    config = config_for(seed_job, method, seed, budget)
    wanted = tuple(
        s
        for s in ("knowledge_query", "warmup", "gradient_features")
        if s in method_spec(method).stages
    )
    link_stages(shared, run_dir, config, wanted)
    if "rehearsal" in method_spec(method).stages:
        # CRaFT's rehearsal depends on Stage 1 only: once per seed, shared by every budget
        # and by craft and craft-nocert.
        flow_dir = shared.parent / "rehearsal"
        flow_config = config_for(seed_job, "craft", seed, ALL)
        link_stages(shared, flow_dir, flow_config, ("knowledge_query",))
        run_pipeline(flow_config, flow_dir, until="rehearsal")
        link_stages(flow_dir, run_dir, config, ("rehearsal",))
    run_pipeline(config, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {s: e["seconds"] for s, e in manifest["stages"].items() if "shared_from" not in e}


def ranked_budgets(budgets: list[int], n_idk: int) -> list[int | str]:
    """The budgets below the number of unknowns, then "all" (R-Tuning)."""
    return [b for b in budgets if b < n_idk] + [ALL]


def probe_cell(
    model: Any, tok: Any, adapter: Path | None, sets: dict[str, list], refusal: str
) -> dict[str, Any]:
    """Greedy-equivalent outcomes and refusal scores of one model on every eval set."""
    from grait.refusal_score import probe_refusals
    from grait.training import attached_lora

    def run(m: Any) -> dict[str, Any]:
        out = {}
        for label, records in sets.items():
            probe = probe_refusals(m, tok, records, refusal=refusal)
            out[label] = {
                "outcomes": probe.outcomes,
                "scores": [round(float(x), 4) for x in probe.scores],
            }
        return out

    if adapter is None:
        return run(model)
    with attached_lora(model, adapter_dir=adapter, trainable=False) as tuned:
        return run(tuned)


def base_cell(model: Any, tok: Any, sets: dict[str, list], refusal: str) -> dict[str, Any]:
    """The base model with the plain prompt (THS reference): it never refuses."""
    from grait.prompts import question_message, render_prompt
    from grait.refusal_score import score_targets

    out = {}
    for label, records in sets.items():
        prompts = [
            render_prompt(tok, question_message(r, allow_refusal=False, refusal=refusal))
            for r in records
        ]
        gold = score_targets(model, tok, prompts, [r.answer_text for r in records])
        out[label] = {"outcomes": ["correct" if g.greedy else "wrong" for g in gold]}
    return out


def run_cell(
    model: Any,
    tok: Any,
    seed_job: dict[str, Any],
    shared: Path,
    run_dir: Path,
    data: SeedData,
    method: str,
    budget: int | str,
    sets: dict[str, list],
    refusal: str,
    *,
    log: Log,
) -> dict[str, Any]:
    """Train one (method, budget) on one seed and probe it; what `cell.json` holds."""
    started = time.perf_counter()
    seconds = train_cell(seed_job, shared, run_dir, method, data.seed, budget)
    probe_started = time.perf_counter()
    probes = probe_cell(model, tok, run_dir / "training" / "adapter", sets, refusal)
    seconds["probe"] = round(time.perf_counter() - probe_started, 2)
    picked: list[str] = []
    weights: list[float] = []
    selected = run_dir / "selection" / "selected.json"
    if selected.exists():
        sel = json.loads(selected.read_text())
        picked = [data.train[i].id for i in sel["rows"]]
        weights = sel["weights"]
    log(f"seed {data.seed}: {method} b={budget} in {time.perf_counter() - started:.0f}s")
    return {"picked": picked, "weights": weights, "seconds": seconds, "probe": probes}


def probe_agreement(
    model: Any,
    tok: Any,
    cells: list[dict[str, Any]],
    seed_dir: Path,
    evals: list[testbed.Fact],
    refusal: str,
) -> dict[str, Any]:
    """How often the teacher-forced outcome equals greedy generation scored as usual.

    The probe counts only the exact refusal and the exact gold answer; generation is scored
    with the refusal patterns and alias matching. Checked on the ID questions of a few cells.
    """
    from grait.evaluation import answer_and_score
    from grait.training import attached_lora

    records = [f.record(0) for f in evals]
    per_cell = {}
    for cell in cells:
        adapter = seed_dir / cell["method"] / f"b{cell['budget']}" / "training" / "adapter"
        with attached_lora(model, adapter_dir=adapter, trainable=False) as tuned:
            run = answer_and_score(
                tuned,
                tok,
                records,
                allow_refusal=True,
                refusal=refusal,
                max_new_tokens=12,
                batch_size=16,
            )
        probe = cell["probe"]["id"]["outcomes"]
        same = [a == b for a, b in zip(run.outcomes, probe)]
        per_cell[f"{cell['method']} b={cell['budget']}"] = {
            "agreement": sum(same) / len(same),
            "generated": dict(Counter(run.outcomes)),
            "probed": dict(Counter(probe)),
        }
    return per_cell


def _cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result


def run_profile(
    profile: str,
    *,
    base_model: str,
    cache: Path,
    work: Path,
    seeds: list[int],
    methods: list[str],
    budgets: list[int],
    hyper: dict[str, Any],
    n_eval_known: int,
    n_eval_unknown: int,
    teach: testbed.TeachSettings,
    eval_sets: tuple[str, ...] = ("id", "ood"),
    n_facts: int | None = None,
    n_taught: int | None = None,
    log: Log,
) -> dict[str, Any]:
    """Every (seed, method, budget) cell of one testbed; returns the raw cells for the report."""
    from grait.models import load_base_model, pick_runtime

    nf, nt = PROFILES[profile]
    facts = testbed.make_facts(n_facts or nf, n_taught or nt, profile=profile)
    knowing, teaching = testbed.knowing_model(base_model, facts, cache, teach, log=log)
    job = job_dict(str(knowing), Path("-"), hyper)
    refusal = JobConfig.model_validate({**job, "method": "grait"}).refusal
    model, tok = load_base_model(str(knowing), pick_runtime())
    stage1 = stage1_all_facts(job, facts, work, log)
    cells: list[dict[str, Any]] = []
    seeds_out: list[dict[str, Any]] = []
    # Stages 1-2 of every seed first: selection variants can be screened offline
    # (bench.quality.screen) while the training cells run.
    prepared = []
    for seed in seeds:
        train, evals = split_for_seed(facts, seed, n_eval_known, n_eval_unknown)
        data = SeedData(seed, train, evals, work / f"seed{seed}")
        paraphrase = {"id": 0, "ood": 2}
        sets = {ev: [f.record(paraphrase[ev]) for f in evals] for ev in eval_sets}
        seed_job, shared = prepare_seed({**job}, data, stage1, log)
        prepared.append((seed, train, evals, data, sets, seed_job, shared))
    for seed, train, evals, data, sets, seed_job, shared in prepared:
        split = json.loads((shared / "knowledge_query" / "split.json").read_text())
        base = _cached(data.folder / "base.json", partial(base_cell, model, tok, sets, refusal))
        seeds_out.append(
            {
                "seed": seed,
                "eval_ids": [f.id for f in evals],
                "known": [f.taught for f in evals],
                "train_ids": [f.id for f in train],
                "train_taught": [f.taught for f in train],
                "ik": split["ik_all"],
                "idk": split["idk_all"],
                "base": base,
            }
        )
        plan = [("rtuning", ALL)] + [
            (m, b)
            for m in methods
            for b in ranked_budgets(budgets, len(split["idk_all"]))
            if b != ALL
        ]
        for method, budget in plan:
            run_dir = data.folder / method / f"b{budget}"
            cell = _cached(
                run_dir / "cell.json",
                partial(
                    run_cell,
                    model,
                    tok,
                    seed_job,
                    shared,
                    run_dir,
                    data,
                    method,
                    budget,
                    sets,
                    refusal,
                    log=lambda m: log(f"{profile} {m}"),
                ),
            )
            cells.append({"seed": seed, "method": method, "budget": budget, **cell})
    first = seeds[0]
    agreement = _cached(
        work / f"seed{first}" / "agreement.json",
        partial(
            probe_agreement,
            model,
            tok,
            [
                c
                for c in cells
                if c["seed"] == first
                and (
                    c["method"] == "rtuning"
                    or (c["method"], c["budget"]) == (methods[0], max(budgets))
                )
            ],
            work / f"seed{first}",
            split_for_seed(facts, first, n_eval_known, n_eval_unknown)[1],
            refusal,
        ),
    )
    return {
        "profile": profile,
        "teaching": teaching,
        "agreement": agreement,
        "facts": [{"id": f.id, "taught": f.taught} for f in facts],
        "seeds": seeds_out,
        "cells": cells,
        "hyper": hyper,
        "budgets": budgets,
        "methods": methods,
        "eval_sets": list(eval_sets),
    }
