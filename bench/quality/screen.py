"""Screen ranking variants without training: where do their first picks come from?

`python -m bench.quality.screen WORK_DIR [--budgets 8,16]` reads the Stage 1-2 outputs that
`--setting tradeoff` left in `WORK_DIR/seed*/shared/` and, for every variant (strategy,
centring, candidate features, λ, μ), tabulates the picks per relation together with each
relation's taught share. Seconds per seed; only variants whose picks differ are worth a
training run (quality-study.md, "Measuring").
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import md_table
from bench.quality.testbed import relation_of
from grait.config import SelectionConfig
from grait.data import load_records
from grait.pipeline import load_features
from grait.ranking import rank_candidates

VARIANTS: dict[str, tuple[str, dict]] = {
    "coverage raw centred λ1 (default)": ("gradient", {}),
    "coverage raw centred λ0": ("gradient", {"lam": 0.0}),
    "coverage raw centred λ2": ("gradient", {"lam": 2.0}),
    "coverage raw uncentred λ1": ("gradient", {"centre": False}),
    "coverage adam centred λ1": ("gradient", {"candidate_features": "preconditioned"}),
    "score λ1 μ1 (paper)": ("gradient", {"strategy": "score"}),
    "score λ1 μ0": ("gradient", {"strategy": "score", "mu": 0.0}),
    "score λ2 μ-1": ("gradient", {"strategy": "score", "lam": 2.0, "mu": -1.0}),
    "neighbourhood tilt 1": ("gradient", {"strategy": "neighbourhood"}),
    "neighbourhood tilt 2": ("gradient", {"strategy": "neighbourhood", "tilt": 2.0}),
    "share λ1": ("gradient", {"strategy": "share"}),
    "share λ0.5": ("gradient", {"strategy": "share", "lam": 0.5}),
    "stratified random": ("stratified", {}),
    "random": ("random", {}),
}


def screen(work: Path, budgets: list[int]) -> str:
    rows: dict[tuple[str, int], list[float]] = {}
    spread: dict[tuple[str, int], list[int]] = {}
    for seed_dir in sorted(work.glob("seed*")):
        shared = seed_dir / "shared"
        if not (shared / "gradient_features").exists():
            continue
        seed = int(seed_dir.name[4:])
        train = load_records(seed_dir / "train.jsonl", "canonical")
        split = json.loads((shared / "knowledge_query" / "split.json").read_text())
        idk, ik = split["idk_all"], split["ik_all"]
        features = load_features(shared)
        for name, (kind, over) in VARIANTS.items():
            cfg = SelectionConfig(**over)
            order = rank_candidates(
                kind, idk_rows=idk, ik_rows=ik, features=features, cfg=cfg, seed=10_000 + seed
            ).order
            for b in budgets:
                rels = [relation_of(train[idk[c]].id) for c in order[:b]]
                # Stage-1 known share of each pick's relation in this seed's training set.
                known_share = [np.mean(known_in_relation(train, split, r)) for r in rels]
                rows.setdefault((name, b), []).append(float(np.mean(known_share)))
                spread.setdefault((name, b), []).append(len(Counter(rels)))
    lines = []
    for b in budgets:
        table = [
            [name, f"{np.mean(rows[(name, b)]):.3f}", f"{np.mean(spread[(name, b)]):.1f}"]
            for name in VARIANTS
            if (name, b) in rows
        ]
        lines += [
            f"### First {b} picks (mean over seeds)",
            "",
            md_table(
                ["variant", "known share of the picks' relations", "relations covered"], table
            ),
            "",
        ]
    return "\n".join(lines)


def known_in_relation(train: list, split: dict, relation: str) -> list[bool]:
    """Stage-1 known flags of the training questions of one relation."""
    ik = set(split["ik_all"])
    return [i in ik for i, r in enumerate(train) if relation_of(r.id) == relation]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality.screen", description=__doc__)
    p.add_argument("work", type=Path, help="a profile's work folder of --setting tradeoff")
    p.add_argument("--budgets", default="8,16")
    args = p.parse_args(argv)
    print(screen(args.work, [int(b) for b in args.budgets.split(",")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
