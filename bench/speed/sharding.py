"""Stage 2b on one worker against two: the wall time of the shards, and the same selection.

Stage 1 and the warm-up run once. Then each "worker" is a fresh process that loads the
base model and computes its shards (`grait.pipeline.feature_shard_computer`) from its own
copy of the run folder, as a worker restoring the stored warm-up would:
- one worker: every shard, with all of this machine's cores;
- two workers: shards i mod 2, at once, with half the cores each.
Both sets of shards are merged and selected; the selections are compared with each
other and with the unsharded stage. The ratio compares like with like (the same shards,
the same process start and model load per worker); on 2 cores two workers only split the
same cores, so expect little gain here: the figure to watch on this machine is the cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from grait.config import JobConfig


def _worker_main(argv: list[str]) -> None:
    """`python -m bench.speed.sharding CONFIG RUN_DIR OUT SHARDS THREADS`: print timings."""
    started = time.perf_counter()
    config_path, run_dir, out, shard_list, threads = argv
    import torch

    torch.set_num_threads(int(threads))
    from grait.feature_shards import FeatureShard
    from grait.models import load_base_model, pick_runtime
    from grait.pipeline import feature_shard_computer

    config = JobConfig.model_validate_json(Path(config_path).read_text())
    load_base_model(config.base_model, pick_runtime(config.device, config.dtype))  # cached
    loaded = time.perf_counter()
    with feature_shard_computer(config, run_dir) as compute:  # as a worker: set up once
        for raw in json.loads(shard_list):
            shard = FeatureShard.from_json(raw)
            compute(shard, Path(out) / str(shard.index))
    done = time.perf_counter()
    print(json.dumps({"load_s": loaded - started, "compute_s": done - loaded}))


def _workers(
    config_file: Path, run_dirs: list[Path], out: Path, groups: list[list[Any]], threads: int
) -> dict[str, Any]:
    """Start one process per group at once; wall time until the last one finished."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.speed.sharding",
                str(config_file),
                str(run_dir),
                str(out),
                json.dumps([s.to_json() for s in group]),
                str(threads),
            ],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for run_dir, group in zip(run_dirs, groups, strict=True)
    ]
    reports = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"a shard worker failed ({proc.returncode})")
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "compute_s": max(r["compute_s"] for r in reports),
        "load_s": max(r["load_s"] for r in reports),
        "workers": reports,
    }


def _selected(run_dir: Path) -> list[tuple[int, bool]]:
    from grait.data import read_jsonl

    return [
        (r["row"], r["selected"]) for r in read_jsonl(run_dir / "selection" / "selection.jsonl")
    ]


def bench_sharding(
    base_model: str,
    data: str,
    *,
    scratch: Path,
    n: int,
    batch_size: int,
    dim: int,
    rows_per_shard: int,
    log: Callable[[str], None],
    hyper: dict[str, Any] | None = None,
) -> dict[str, Any]:
    import shutil

    from grait.pipeline import (
        copy_completed_stages,
        feature_shard_plan,
        merge_feature_shards,
        run_pipeline,
    )

    work = scratch / "sharding"
    shutil.rmtree(work, ignore_errors=True)
    hp: dict[str, Any] = {**(hyper or {})}
    hp["features"] = {**hp.get("features", {}), "batch_size": batch_size, "dim": dim}
    config = JobConfig.model_validate(
        {
            "method": "grait",
            "base_model": base_model,
            "train": {"path": data, "limit": n, "shuffle": True},
            **hp,
        }
    )
    config_file = work / "config.json"
    work.mkdir(parents=True)
    config_file.write_text(config.model_dump_json())
    base = work / "base"
    log(f"sharding: Stage 1 and the warm-up on {n} questions")
    run_pipeline(config, base, until="warmup")
    shards, rows = feature_shard_plan(config, base, rows_per_shard)
    cores = os.cpu_count() or 1

    whole = work / "unsharded"
    copy_completed_stages(base, whole)
    log("sharding: the unsharded stage")
    run_pipeline(config, whole, until="selection")
    stages = json.loads((whole / "manifest.json").read_text())["stages"]
    unsharded_s = stages["gradient_features"]["seconds"]

    results: dict[str, Any] = {}
    for name, groups in (
        ("one_worker", [shards]),
        ("two_workers", [shards[0::2], shards[1::2]]),
    ):
        threads = max(1, cores // len(groups))
        folders = [work / name / f"worker-{k}" for k in range(len(groups))]
        for folder in folders:
            copy_completed_stages(base, folder)
        out = work / name / "shards"
        log(f"sharding: {name} ({len(groups)} processes × {threads} threads, {len(shards)} shards)")
        results[name] = _workers(config_file, folders, out, groups, threads)
        merged = work / name / "merged"
        copy_completed_stages(base, merged)
        merge_feature_shards(
            config,
            merged,
            [out / str(s.index) for s in shards],
            shards,
            seconds=results[name]["wall_s"],
        )
        run_pipeline(config, merged, until="selection")
        results[name]["selection"] = _selected(merged)
        results[name]["features"] = np.load(merged / "gradient_features" / "idk_pre.npy")
    reference = np.load(whole / "gradient_features" / "idk_pre.npy")
    same = {
        name: {
            "selection_equals_unsharded": r["selection"] == _selected(whole),
            "max_abs_feature_diff": float(
                np.abs(r.pop("features").astype(np.float32) - reference.astype(np.float32)).max()
            ),
        }
        for name, r in results.items()
    }
    for r in results.values():
        r.pop("selection")
    one, two = results["one_worker"], results["two_workers"]
    return {
        "questions": n,
        "feature_rows": rows,
        "shards": len(shards),
        "rows_per_shard": rows_per_shard,
        "batch_size": batch_size,
        "dim": dim,
        "cores": cores,
        "unsharded_stage_s": unsharded_s,
        "one_worker": one,
        "two_workers": two,
        "ratio_wall": two["wall_s"] / one["wall_s"],
        "ratio_compute": two["compute_s"] / one["compute_s"],
        "same": same,
    }


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
