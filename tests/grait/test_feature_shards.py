"""Stage 2b in shards: the plan, and shards computed apart then merged equal the unsharded stage."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from grait.config import JobConfig
from grait.feature_shards import FeatureShard, plan_shards
from grait.pipeline import (
    compute_feature_shard,
    copy_completed_stages,
    feature_shard_plan,
    merge_feature_shards,
    run_pipeline,
)
from grait.testing import tiny_hyperparameters


def test_the_plan_covers_every_batch_of_both_lists_once():
    shards = plan_shards(5, 3, 3)
    assert shards == [
        FeatureShard(0, refusals=(0, 3), answers=(0, 0)),
        FeatureShard(1, refusals=(3, 5), answers=(0, 1)),  # straddles the two lists
        FeatureShard(2, refusals=(5, 5), answers=(1, 3)),
    ]
    for n_ref, n_ans, per in [(1, 0, 1), (7, 2, 2), (4, 4, 100), (0, 3, 1)]:
        shards = plan_shards(n_ref, n_ans, per)
        refusal = [b for s in shards for b in s.batches("refusals")]
        answer = [b for s in shards for b in s.batches("answers")]
        assert refusal == list(range(n_ref)) and answer == list(range(n_ans))
        assert all(
            0 < len(s.batches("refusals")) + len(s.batches("answers")) <= per for s in shards
        )
    with pytest.raises(ValueError):
        plan_shards(3, 3, 0)


def _config(model_dir: Path, data: Path) -> JobConfig:
    hp = tiny_hyperparameters()
    hp["knowledge"]["tau"] = 0.3  # a random model's cloze probabilities sit near 1/4
    hp["features"]["batch_size"] = 4
    return JobConfig.model_validate(
        {
            "method": "grait",
            "base_model": str(model_dir),
            "train": {"path": str(data / "arc_easy" / "dev.jsonl"), "limit": 30},
            **hp,
        }
    )


def test_shards_on_separate_folders_merge_into_the_unsharded_features_and_selection(
    tiny_model_dir, shared_data, tmp_path
):
    cfg = _config(tiny_model_dir, shared_data)
    whole = tmp_path / "whole"
    run_pipeline(cfg, whole, until="selection")

    sharded = tmp_path / "sharded"
    run_pipeline(cfg, sharded, until="warmup")
    shards, rows = feature_shard_plan(cfg, sharded, rows_per_shard=6)  # 2 batches of 4 each
    answers = len(json.loads((sharded / "knowledge_query" / "split.json").read_text())["ik_kept"])
    assert rows == 30 + answers
    batches = -(-30 // 4) + -(-answers // 4)
    assert len(shards) == -(-batches // 2) and len(shards) >= 4
    # Each shard on its own "machine": a copy of the run folder up to the warm-up.
    shard_dirs = []
    for shard in reversed(shards):  # the order shards finish in does not matter
        machine = tmp_path / f"machine-{shard.index}"
        copy_completed_stages(sharded, machine)
        compute_feature_shard(cfg, machine, shard, machine / "out")
        shard_dirs.append(machine / "out")
    with pytest.raises(ValueError, match="missing"):
        merge_feature_shards(cfg, sharded, shard_dirs[1:], shards, seconds=1.0)
    metrics = merge_feature_shards(cfg, sharded, shard_dirs, shards, seconds=1.0)
    assert metrics["shards"] == len(shards) and metrics["refusal_rows"] == 30
    for name in ("idk_raw", "idk_pre", "van_raw"):
        a = np.load(whole / "gradient_features" / f"{name}.npy")
        b = np.load(sharded / "gradient_features" / f"{name}.npy")
        assert a.shape == b.shape and np.array_equal(a, b), name
    run_pipeline(cfg, sharded, until="selection")  # skips the merged stage, selects
    picks = [
        (json.loads(line)["row"], json.loads(line)["selected"])
        for line in (whole / "selection" / "selection.jsonl").read_text().splitlines()
    ]
    assert picks == [
        (json.loads(line)["row"], json.loads(line)["selected"])
        for line in (sharded / "selection" / "selection.jsonl").read_text().splitlines()
    ]
    shutil.rmtree(tmp_path / "machine-0")


def test_a_shard_needs_the_warmup_and_the_merge_refuses_a_foreign_shard(
    tiny_model_dir, shared_data, tmp_path
):
    cfg = _config(tiny_model_dir, shared_data)
    run_dir = tmp_path / "run"
    run_pipeline(cfg, run_dir, until="knowledge_query")
    shards, _ = feature_shard_plan(cfg, run_dir, rows_per_shard=100)
    assert len(shards) == 1
    with pytest.raises(ValueError, match="warmup"):
        compute_feature_shard(cfg, run_dir, shards[0], tmp_path / "out")
    run_pipeline(cfg, run_dir, until="warmup")
    compute_feature_shard(cfg, run_dir, shards[0], tmp_path / "out")
    other, _ = feature_shard_plan(cfg, run_dir, rows_per_shard=4)
    with pytest.raises(ValueError, match="not part of this plan"):
        merge_feature_shards(cfg, run_dir, [tmp_path / "out"], other, seconds=1.0)


def test_a_stage_completed_elsewhere_is_not_run_again_and_a_refusal_runs_it_here(
    tiny_model_dir, shared_data, tmp_path
):
    cfg = _config(tiny_model_dir, shared_data)
    calls: list[str] = []

    def in_shards(run_dir: Path) -> bool:
        calls.append("sharded")
        shards, _ = feature_shard_plan(cfg, run_dir, rows_per_shard=16)
        for shard in shards:
            compute_feature_shard(cfg, run_dir, shard, run_dir / "shards" / str(shard.index))
        dirs = [run_dir / "shards" / str(s.index) for s in shards]
        merge_feature_shards(cfg, run_dir, dirs, shards, seconds=2.5)
        return True

    events: list = []
    sharded = tmp_path / "sharded"
    run_pipeline(
        cfg,
        sharded,
        until="selection",
        progress=events.append,
        elsewhere={"gradient_features": lambda: in_shards(sharded)},
    )
    assert calls == ["sharded"]
    started = [e.stage for e in events if e.kind == "stage_started"]
    assert "gradient_features" not in started and "selection" in started
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert manifest["stages"]["gradient_features"]["seconds"] == 2.5
    assert "selection" in manifest["stages"]  # written over the merged stage, not without it

    declined = tmp_path / "declined"
    run_pipeline(
        cfg, declined, until="gradient_features", elsewhere={"gradient_features": lambda: False}
    )
    assert np.array_equal(
        np.load(declined / "gradient_features" / "idk_raw.npy"),
        np.load(sharded / "gradient_features" / "idk_raw.npy"),
    )
