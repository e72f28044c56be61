"""Every trade-off comparison measured so far, in one table (`python -m bench.quality.ledger`).

Each trade-off study leaves its own folder under `bench/results/` with a `summary.json`. A
reader deciding whether a ranking works needs all of them side by side: six variants each
"not above random" means more together than any one does apart. The ledger reads every
study's paired area differences (method − baseline, up to 30% over-refusal) and states each
by the one rule the studies were registered with: *above* or *below* when the 95% interval
excludes 0, else *neither*. Beside it, the same pair's difference in separability d′
(`curves.separability`, post hoc): whether the method separates unknown from known facts
better anywhere on the curve, not only at the budgets the area happens to sample.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from bench.common import md_table
from bench.quality.curves import hierarchical_ci, separability_difference
from bench.quality.tradeoff_report import curves_for


@dataclass(frozen=True)
class Comparison:
    """One paired area difference of one study on one testbed and eval set."""

    study: str
    profile: str
    eval_set: str
    difference: str
    point: float
    low: float
    high: float
    seeds: tuple[int, ...]
    settings: str
    registered: bool
    measured: str
    separability: tuple[float, float, float] | None = None  # d′ difference, low, high

    @property
    def reading(self) -> str:
        if self.low > 0:
            return "above"
        if self.high < 0:
            return "below"
        return "neither"


def _measured(header: list[str], folder: Path) -> str:
    """When the study was measured: its header, or (older studies) its `results.md`."""
    report = folder / "results.md"
    lines = header or (report.read_text().splitlines() if report.exists() else [])
    for line in lines:
        found = re.search(r"Measured (\d{4}-\d{2}-\d{2})", line)
        if found:
            return found.group(1)
    return ""


_VARIANT_SECTIONS = ("selection", "features", "weighting", "craft", "decoding")
PROTOCOL_STEPS = 16  # the optimizer steps of `tradeoff.STUDY_HYPER` (not imported: torch-free)


def _settings(hyper: dict) -> str:
    """The method settings a study changed from the shipped defaults (its variant)."""
    changed = [
        f"{section}.{key}={value}"
        for section in _VARIANT_SECTIONS
        for key, value in sorted(hyper.get(section, {}).items())
        if (section, key) != ("features", "batch_size")
    ]
    steps = hyper.get("training", {}).get("max_steps", PROTOCOL_STEPS)
    if steps != PROTOCOL_STEPS:  # training length is a variant too, shared by every method
        changed.append(f"training.max_steps={steps}")
    return ", ".join(changed) or "defaults"


def _separability(
    run: dict, eval_set: str, difference: str, n_boot: int
) -> tuple[float, float, float] | None:
    """The pair's d′ difference with its seeds-then-questions interval, from the stored cells."""
    if not run.get("cells") or n_boot <= 0:
        return None
    a, b = (m.strip() for m in difference.split(" - "))
    seeds, _ = curves_for(run, eval_set)
    point, (low, high) = hierarchical_ci(seeds, separability_difference(a, b), n_boot=n_boot)
    return point, low, high


def comparisons(results_dir: Path, n_boot: int = 1000) -> list[Comparison]:
    """Every area difference in every trade-off study folder under `results_dir`."""
    found: list[Comparison] = []
    for path in sorted(results_dir.glob("*/summary.json")):
        data = json.loads(path.read_text())
        summaries = data.get("summaries")
        if not isinstance(summaries, list):
            continue  # another kind of benchmark
        runs = {r["profile"]: r for r in data.get("results", [])}
        for summary in summaries:
            run = runs.get(summary["profile"], {})
            seeds = tuple(s["seed"] for s in run.get("seeds", []))
            for eval_set, tables in summary["eval"].items():
                for name, (point, (low, high)) in tables.get("area_diff", {}).items():
                    found.append(
                        Comparison(
                            study=path.parent.name,
                            profile=summary["profile"],
                            eval_set=eval_set,
                            difference=name,
                            point=point,
                            low=low,
                            high=high,
                            seeds=seeds,
                            settings=_settings(run.get("hyper", {})),
                            registered=(path.parent / "PREREGISTERED.md").exists(),
                            measured=_measured(run.get("header", []), path.parent),
                            separability=_separability(run, eval_set, name, n_boot),
                        )
                    )
    return found


def _seed_range(seeds: tuple[int, ...]) -> str:
    if not seeds:
        return "?"
    if list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 1:
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _interval(value: tuple[float, float, float] | None) -> str:
    if value is None:
        return "–"
    point, low, high = value
    return f"{point:+.2f} [{low:+.2f}, {high:+.2f}]"


def render(found: list[Comparison]) -> str:
    """The ledger as Markdown, with a count of readings per baseline."""
    rows = [
        [
            f"`{c.study}`",
            c.profile,
            c.eval_set,
            c.difference,
            f"{c.point:+.3f} [{c.low:+.3f}, {c.high:+.3f}]",
            c.reading,
            _interval(c.separability),
            _seed_range(c.seeds),
            c.settings,
            "yes" if c.registered else "no",
            c.measured,
        ]
        for c in found
    ]
    table = md_table(
        [
            "study",
            "testbed",
            "eval",
            "difference",
            "area diff [95% CI]",
            "reading",
            "d′ diff [95% CI]",
            "seeds",
            "settings",
            "pre-registered",
            "measured",
        ],
        rows,
        align="lllllllllll",
    )
    tally: dict[str, int] = {"above": 0, "below": 0, "neither": 0}
    for c in found:
        tally[c.reading] += 1
    return (
        "# Every trade-off comparison so far\n\n"
        "Paired difference of the trade-off area up to 30% over-refusal (method − baseline;"
        " 95% interval by a seeds-then-questions bootstrap). *above* / *below*: the interval"
        " excludes 0. d′ diff: the same pair's difference in separability"
        " z(unknown refused) − z(known refused), mean over the method's own budgets (post hoc:"
        " equal d′ means both lie on one ROC, and the area differs only by where the budgets"
        " land on it). Folders without `PREREGISTERED.md` are pilots or secondary reports"
        " (the CRaFT ablations are registered in `tradeoff-craft/`).\n\n"
        f"{table}\n\n"
        f"Readings: {tally['above']} above, {tally['below']} below, {tally['neither']} neither."
        "\n\nWritten by `python -m bench.quality.ledger --write`.\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality.ledger", description=__doc__)
    p.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--write", action="store_true", help="also write <results-dir>/LEDGER.md")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws for d′ (0: skip)")
    args = p.parse_args(argv)
    text = render(comparisons(args.results_dir, n_boot=args.n_boot))
    print(text)
    if args.write:
        (args.results_dir / "LEDGER.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
