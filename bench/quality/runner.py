"""Train every method on one base model and training set, sharing Stage 1 and the features.

Per seed, `grait` runs first and computes the stages every gradient method shares
(knowledge_query, warmup, gradient_features); each other method gets a run directory whose
manifest already lists those stages, with the folders linked to grait's, so the library's
own resume logic skips them. Stage 1 is also shared across seeds when it is deterministic
(MCQA scoring; OEQA sampling depends on the seed, so it is rerun per seed).

The library's evaluation stage is not used: it would re-evaluate the base model for every
method. Here the base model answers each eval set once (plain prompt and may-refuse prompt),
then every tuned adapter answers the same questions; outcomes are cached per run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grait.config import JobConfig
from grait.data import QARecord, load_records
from grait.evaluation import answer_and_score
from grait.pipeline import FORMAT_VERSION, MANIFEST, config_hash, run_pipeline, stages_for

METHODS = ("grait", "grait-noweight", "random-idk", "rtuning", "van")
SHARED_STAGES = ("knowledge_query", "warmup", "gradient_features")
BASE_ROWS = ("base", "base+refuse-prompt")
Log = Callable[[str], None]


@dataclass
class EvalSet:
    label: str
    path: Path
    records: list[QARecord] = field(default_factory=list)
    known: list[bool] | None = None  # testbed only: ground truth per question

    def __post_init__(self) -> None:
        if not self.records:
            self.records = load_records(self.path, "canonical")


@dataclass
class MethodRun:
    method: str
    seed: int
    run_dir: Path
    timings: dict[str, float]
    shared: set[str]
    outcomes: dict[str, list[str]] = field(default_factory=dict)  # eval label -> outcomes
    responses: dict[str, list[str]] = field(default_factory=dict)


def _manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / MANIFEST).read_text())


def link_stages(
    src_dir: Path, dst_dir: Path, config: JobConfig, stages: tuple[str, ...]
) -> set[str]:
    """Give `dst_dir` finished copies (symlinks) of `stages` from `src_dir`; return those linked."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    src = _manifest(src_dir)
    path = dst_dir / MANIFEST
    manifest = (
        json.loads(path.read_text())
        if path.exists()
        else {
            "version": FORMAT_VERSION,
            "config_hash": config_hash(config),
            "config": config.model_dump(mode="json"),
            "stages": {},
        }
    )
    linked = set()
    for stage in stages:
        if stage in manifest["stages"] or stage not in src["stages"]:
            continue
        target = dst_dir / stage
        if target.is_symlink():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)  # an unfinished attempt's leftovers
        target.symlink_to(os.path.relpath((src_dir / stage).resolve(), dst_dir.resolve()))
        manifest["stages"][stage] = {**src["stages"][stage], "shared_from": str(src_dir)}
        linked.add(stage)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)
    return linked


def shared_in(run_dir: Path) -> set[str]:
    return {s for s, e in _manifest(run_dir)["stages"].items() if "shared_from" in e}


def train_all(
    job: dict[str, Any],
    *,
    seeds: list[int],
    methods: tuple[str, ...],
    work_dir: Path,
    share_stage1_across_seeds: bool,
    log: Log,
) -> list[MethodRun]:
    """Run the training side of every method for every seed; resumable per run directory."""
    runs: list[MethodRun] = []
    first_grait: Path | None = None
    order = ["grait"] + [m for m in methods if m != "grait"]
    for seed in seeds:
        grait_dir = work_dir / f"seed{seed}" / "grait"
        for method in order:
            config = JobConfig.model_validate({**job, "method": method, "seed": seed, "evals": []})
            run_dir = work_dir / f"seed{seed}" / method
            wanted = tuple(s for s in SHARED_STAGES if s in stages_for(method))
            if method == "grait":
                if share_stage1_across_seeds and first_grait is not None:
                    link_stages(first_grait, run_dir, config, ("knowledge_query",))
            elif wanted:
                link_stages(grait_dir, run_dir, config, wanted)
            started = time.perf_counter()
            log(f"seed {seed}: {method} ...")
            run_pipeline(config, run_dir)
            log(f"seed {seed}: {method} trained in {time.perf_counter() - started:.0f}s")
            timings = {s: e["seconds"] for s, e in _manifest(run_dir)["stages"].items()}
            if method in methods:
                runs.append(MethodRun(method, seed, run_dir, timings, shared_in(run_dir)))
        if first_grait is None:
            first_grait = grait_dir
    return runs


def _cached_eval(path: Path, compute: Callable[[], Any]) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    started = time.perf_counter()
    result = compute()
    out = {
        "responses": result.responses,
        "outcomes": list(result.outcomes),
        "seconds": round(time.perf_counter() - started, 2),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def evaluate_all(
    base_model: str,
    runs: list[MethodRun],
    evals: list[EvalSet],
    *,
    refusal: str,
    max_new_tokens: int,
    batch_size: int,
    work_dir: Path,
    log: Log,
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, float]]:
    """Base rows once per eval set, then every adapter; returns base outcomes and base seconds."""
    from grait.models import load_base_model, pick_runtime
    from grait.training import attached_lora

    model, tok = load_base_model(base_model, pick_runtime())
    kw: dict[str, Any] = {
        "refusal": refusal,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
    }
    base: dict[str, dict[str, dict[str, Any]]] = {}
    base_seconds: dict[str, float] = {}
    for row, allow in zip(BASE_ROWS, (False, True)):
        for ev in evals:
            log(f"eval: {row} on {ev.label}")
            res = _cached_eval(
                work_dir / "base_eval" / f"{row}__{ev.label}.json",
                lambda ev=ev, allow=allow: answer_and_score(
                    model, tok, ev.records, allow_refusal=allow, **kw
                ),
            )
            base.setdefault(row, {})[ev.label] = res
            base_seconds[row] = base_seconds.get(row, 0.0) + res["seconds"]
    for run in runs:
        seconds = 0.0
        with attached_lora(
            model, adapter_dir=run.run_dir / "training" / "adapter", trainable=False
        ) as tuned:
            for ev in evals:
                log(f"eval: seed {run.seed} {run.method} on {ev.label}")
                res = _cached_eval(
                    run.run_dir / "bench_eval" / f"{ev.label}.json",
                    lambda ev=ev: answer_and_score(
                        tuned, tok, ev.records, allow_refusal=True, **kw
                    ),
                )
                run.outcomes[ev.label] = res["outcomes"]
                run.responses[ev.label] = res["responses"]
                seconds += res["seconds"]
        run.timings["evaluation"] = round(seconds, 2)
    return base, base_seconds
