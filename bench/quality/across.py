"""Paired comparisons of cells from two trade-off studies (`python -m bench.quality.across`).

A study compares methods under one set of settings. Some questions change a setting that
every method shares (training length, learning rate, the prompt), and the cheapest honest
answer reruns only the changed cells on the *same* seeds, with the other study's cells as
the reference. That pairing holds only if both studies saw the same eval questions with
the same known/unknown labels, i.e. the same seed draws and an untuned knowing model that
answers every eval question exactly as before (it is taught again on each machine). This
module checks that per seed, refuses to compare where it fails, and then reports each cell's
rates, THS and separability d′ and the differences between two cells with the
seeds-then-questions bootstrap of `curves.hierarchical_ci`.

A cell is named `label=study:method:budget`, e.g. `steps32=tradeoff-steps32-topic:random-idk:24`
(`rtuning:all` for R-Tuning).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import md_table
from bench.quality.curves import SeedCurves, hierarchical_ci, rates, separability, ths_per_budget
from bench.quality.tradeoff_report import known_of

RESULTS = Path(__file__).resolve().parents[1] / "results"


@dataclass(frozen=True)
class CellRef:
    """One (study, method, budget) cell, shown under `label`."""

    label: str
    study: str
    method: str
    budget: str

    @classmethod
    def parse(cls, text: str) -> CellRef:
        label, sep, rest = text.partition("=")
        parts = rest.split(":")
        if not sep or len(parts) != 3 or not all(parts) or not label:
            raise ValueError(f"expected label=study:method:budget, got {text!r}")
        return cls(label, *parts)


class NotPaired(ValueError):
    """The two studies did not see the same questions with the same labels."""


def _run(results_dir: Path, study: str, profile: str) -> dict[str, Any]:
    path = results_dir / study / "summary.json"
    runs = {r["profile"]: r for r in json.loads(path.read_text()).get("results", [])}
    if profile not in runs:
        raise NotPaired(f"{study} has no {profile!r} testbed (has: {sorted(runs)})")
    return runs[profile]


def _outcomes(run: dict[str, Any], ref: CellRef, seed: int, eval_set: str) -> np.ndarray:
    for c in run["cells"]:
        if c["seed"] == seed and c["method"] == ref.method and str(c["budget"]) == ref.budget:
            return np.array(c["probe"][eval_set]["outcomes"])
    raise NotPaired(f"{ref.study} has no cell {ref.method}:{ref.budget} for seed {seed}")


def paired_seeds(
    refs: Sequence[CellRef], runs: dict[str, dict[str, Any]], eval_set: str
) -> tuple[list[int], list[SeedCurves]]:
    """The seeds every study ran and, per seed, its cells as one-row methods, after checks.

    Raises `NotPaired` when a shared seed's eval questions or the untuned model's outcomes
    on them differ between the studies: the labels known/unknown would then differ too.
    """
    by_seed = [{s["seed"]: s for s in run["seeds"]} for run in runs.values()]
    shared = sorted(set.intersection(*(set(b) for b in by_seed)))
    if not shared:
        raise NotPaired("the studies share no seed")
    out = []
    for seed in shared:
        first = by_seed[0][seed]
        for other in by_seed[1:]:
            s = other[seed]
            if s["eval_ids"] != first["eval_ids"]:
                raise NotPaired(f"seed {seed}: the eval questions differ")
            base_a = first["base"][eval_set]["outcomes"]
            base_b = s["base"][eval_set]["outcomes"]
            changed = sum(a != b for a, b in zip(base_a, base_b, strict=True))
            if changed:
                raise NotPaired(
                    f"seed {seed}: the untuned model's outcome differs on {changed} of "
                    f"{len(base_a)} eval questions (a different knowing model)"
                )
        base = np.array(first["base"][eval_set]["outcomes"])
        refused, correct = {}, {}
        for ref in refs:
            o = _outcomes(runs[ref.study], ref, seed, eval_set)
            refused[ref.label] = (o == "refused")[None, :]
            correct[ref.label] = (o == "correct")[None, :]
        out.append(
            SeedCurves(
                known_of(first, eval_set), refused, correct, base == "correct", base == "wrong"
            )
        )
    return shared, out


Statistic = Callable[[SeedCurves, np.ndarray], float]


def statistics(label: str) -> dict[str, Statistic]:
    """What one cell is measured by: its rates, THS, the known facts it still answers, d′."""

    def over(s: SeedCurves, i: np.ndarray) -> float:
        return float(rates(s.refused[label], s.known, i)[0][0])

    def unknown(s: SeedCurves, i: np.ndarray) -> float:
        return float(rates(s.refused[label], s.known, i)[1][0])

    def answered(s: SeedCurves, i: np.ndarray) -> float:
        return float(s.correct[label][0, i][s.known[i]].mean())

    def ths(s: SeedCurves, i: np.ndarray) -> float:
        return float(ths_per_budget(s, label, i)[0])

    def dprime(s: SeedCurves, i: np.ndarray) -> float:
        return separability(s.refused[label][0, i], s.known[i])

    return {
        "known refused": over,
        "unknown refused": unknown,
        "known answered": answered,
        "THS": ths,
        "d′": dprime,
    }


def compare(
    refs: Sequence[CellRef],
    pairs: Sequence[tuple[str, str]],
    *,
    profile: str,
    eval_set: str,
    results_dir: Path = RESULTS,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Every cell's statistics and every pair's differences, each with its 95% interval."""
    runs = {r.study: _run(results_dir, r.study, profile) for r in refs}
    seed_ids, seeds = paired_seeds(refs, runs, eval_set)
    cells = {
        r.label: {
            name: hierarchical_ci(seeds, f, n_boot=n_boot)
            for name, f in statistics(r.label).items()
        }
        for r in refs
    }
    diffs = {}
    for a, b in pairs:
        fa, fb = statistics(a), statistics(b)
        diffs[f"{a} - {b}"] = {
            name: hierarchical_ci(
                seeds, lambda s, i, x=fa[name], y=fb[name]: x(s, i) - y(s, i), n_boot=n_boot
            )
            for name in fa
        }
    return {
        "profile": profile,
        "eval_set": eval_set,
        "seeds": seed_ids,
        "cells": {
            r.label: {"study": r.study, "method": r.method, "budget": r.budget} for r in refs
        },
        "statistics": cells,
        "differences": diffs,
    }


def _fmt(value: tuple[float, tuple[float, float]], sign: str = "") -> str:
    point, (low, high) = value
    return f"{point:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def render(result: dict[str, Any]) -> str:
    names = list(next(iter(result["statistics"].values())))
    rows = [
        [label, f"`{c['study']}`", f"{c['method']} b={c['budget']}"]
        + [_fmt(result["statistics"][label][n]) for n in names]
        for label, c in result["cells"].items()
    ]
    seeds = ", ".join(map(str, result["seeds"]))
    intro = (
        f"Testbed `{result['profile']}`, eval `{result['eval_set']}`, seeds {seeds} (paired: "
        "same eval questions, same untuned outcomes on every one); mean over seeds, 95% "
        "interval seeds then questions."
    )
    lines = [
        intro,
        "",
        md_table(["cell", "study", "method", *names], rows),
    ]
    if result["differences"]:
        lines += [
            "",
            md_table(
                ["difference", *names],
                [[d] + [_fmt(v[n], "+") for n in names] for d, v in result["differences"].items()],
            ),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality.across", description=__doc__)
    p.add_argument("cells", nargs="+", help="label=study:method:budget")
    p.add_argument("--diff", action="append", default=[], help="labelA,labelB (repeatable)")
    p.add_argument("--profile", default="topic")
    p.add_argument("--eval-set", default="id")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    args = p.parse_args(argv)
    try:
        refs = [CellRef.parse(c) for c in args.cells]
        labels = {r.label for r in refs}
        pairs = [tuple(d.split(",")) for d in args.diff]
        for pair in pairs:
            if len(pair) != 2 or not set(pair) <= labels:
                raise ValueError(f"--diff needs two cell labels from {sorted(labels)}: {pair}")
        result = compare(
            refs,
            pairs,  # type: ignore[arg-type]
            profile=args.profile,
            eval_set=args.eval_set,
            results_dir=args.results_dir,
            n_boot=args.bootstrap,
        )
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    text = render(result)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
