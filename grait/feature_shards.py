"""Stage 2b in shards: which batches each shard computes, its files, and the merge.

For 100k candidates on an 8B model the gradient features are the longest stage, and each
row's feature depends only on its own sample (and the shared warm-up, projection seed and
preconditioner). So the stage splits into shards that run anywhere the warm-up's
checkpoint can be read, and a merge that writes the same matrices as the unsharded stage.

A shard is a run of whole batches of the unsharded order (`features.feature_batches`):
every row is computed in the same batch, with the same padding, as without shards, so the
merged matrices are bit-identical on the same hardware and the selection is the same.
The shard plan depends only on the two lists' lengths, the batch size and the rows per
shard, so every worker derives the same plan from the job.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The two lists of Stage 2b: every training question with the refusal as target (both
# preconditioned and raw features), and the kept known questions with their answers (raw).
REFUSALS, ANSWERS = "refusals", "answers"
# Which FeatureStore matrices each list fills: (raw, preconditioned or None)
MATRICES = {REFUSALS: ("idk_raw", "idk_pre"), ANSWERS: ("van_raw", None)}
SHARD_META = "shard.json"


@dataclass(frozen=True)
class FeatureShard:
    """Batches [start, stop) of each list's batch order."""

    index: int
    refusals: tuple[int, int]
    answers: tuple[int, int]

    def batches(self, name: str) -> range:
        start, stop = getattr(self, name)
        return range(start, stop)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureShard:
        return cls(data["index"], tuple(data["refusals"]), tuple(data["answers"]))  # type: ignore[arg-type]


def plan_shards(
    refusal_batches: int, answer_batches: int, batches_per_shard: int
) -> list[FeatureShard]:
    """Cut the refusal batches, then the answer batches, into shards of up to that many.

    A shard may straddle the two lists (the last refusal batches and the first answer ones).
    """
    if batches_per_shard < 1:
        raise ValueError("batches_per_shard must be at least 1")
    total = refusal_batches + answer_batches
    shards = []
    for index, start in enumerate(range(0, total, batches_per_shard)):
        stop = min(start + batches_per_shard, total)
        shards.append(
            FeatureShard(
                index,
                refusals=(min(start, refusal_batches), min(stop, refusal_batches)),
                answers=(max(start - refusal_batches, 0), max(stop - refusal_batches, 0)),
            )
        )
    return shards


def batches_per_shard(rows_per_shard: int, batch_size: int) -> int:
    """Whole batches only: a shard never splits the unsharded run's batches."""
    return max(1, math.ceil(rows_per_shard / batch_size))


class CompactRows:
    """An output matrix for some rows of a list: `out[positions] = values` stores them densely.

    `compute_features` writes by item position; a shard holds only its own rows, in the
    order their batches ran.
    """

    def __init__(self, positions: Sequence[int], dim: int):
        self.positions = list(positions)
        self._slot = {p: k for k, p in enumerate(self.positions)}
        self.values = np.zeros((len(self.positions), dim), dtype=np.float16)

    def __setitem__(self, positions: Sequence[int], values: np.ndarray) -> None:
        self.values[[self._slot[p] for p in positions]] = values


def write_shard(
    out: Path,
    shard: FeatureShard,
    rows: dict[str, dict[str, CompactRows]],
    stats: dict[str, dict[str, Any]],
    *,
    n_params: int,
) -> None:
    """A shard's folder: one .npy per matrix, its positions and statistics in shard.json.

    shard.json goes last (through a rename), so a folder with it is a complete shard.
    """
    out.mkdir(parents=True, exist_ok=True)
    positions: dict[str, list[int]] = {}
    for name, matrices in rows.items():
        for matrix, compact in matrices.items():
            np.save(out / f"{matrix}.npy", compact.values)
            positions[name] = compact.positions  # the same for both matrices of a list
    tmp = out / (SHARD_META + ".tmp")
    meta = {"shard": shard.to_json(), "positions": positions, "stats": stats, "n_params": n_params}
    tmp.write_text(json.dumps(meta))
    tmp.replace(out / SHARD_META)


def read_shard_meta(folder: Path) -> dict[str, Any] | None:
    """The shard's metadata, or None if the folder does not hold a complete shard."""
    path = folder / SHARD_META
    return json.loads(path.read_text()) if path.exists() else None


def merge_into(
    targets: dict[str, np.ndarray], shard_dirs: Sequence[Path], expected: list[FeatureShard]
) -> tuple[dict[str, dict[str, Any]], int]:
    """Copy every shard's rows into the full matrices; the summed statistics and LoRA size.

    Refuses a set of shards that is not exactly the plan (a missing or foreign shard would
    leave rows of zeros that look like real features).
    """
    seen: dict[int, dict[str, Any]] = {}
    for folder in shard_dirs:
        meta = read_shard_meta(folder)
        if meta is None:
            raise ValueError(f"{folder.name}: not a complete feature shard")
        shard = FeatureShard.from_json(meta["shard"])
        if shard not in expected:
            raise ValueError(f"shard {shard.index} is not part of this plan")
        seen[shard.index] = meta
        for name, positions in meta["positions"].items():
            for matrix in MATRICES[name]:
                if matrix is not None:
                    targets[matrix][positions] = np.load(folder / f"{matrix}.npy")
    missing = sorted({s.index for s in expected} - set(seen))
    if missing:
        raise ValueError(f"feature shards missing: {missing}")
    if len({meta["n_params"] for meta in seen.values()}) != 1:
        raise ValueError("feature shards of different LoRA sizes")
    totals: dict[str, dict[str, Any]] = {}
    for meta in seen.values():
        for name, values in meta["stats"].items():
            bucket = totals.setdefault(name, {})
            for key, value in values.items():
                bucket[key] = bucket.get(key, 0) + value
    return totals, next(iter(seen.values()))["n_params"]


def remove_shards(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
