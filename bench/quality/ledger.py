"""Every trade-off comparison measured so far, in one table (`python -m bench.quality.ledger`).

Each trade-off study leaves its own folder under `bench/results/` with a `summary.json`. A
reader deciding whether a ranking works needs all of them side by side: six variants each
"not above random" means more together than any one does apart. The ledger reads every
study's paired area differences (method − baseline, up to 30% over-refusal) and states each
by the one rule the studies were registered with: *above* or *below* when the 95% interval
excludes 0, else *neither*.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from bench.common import md_table


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


def _settings(hyper: dict) -> str:
    """The method settings a study changed from the shipped defaults (its variant)."""
    changed = [
        f"{section}.{key}={value}"
        for section in _VARIANT_SECTIONS
        for key, value in sorted(hyper.get(section, {}).items())
        if (section, key) != ("features", "batch_size")
    ]
    return ", ".join(changed) or "defaults"


def comparisons(results_dir: Path) -> list[Comparison]:
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
                        )
                    )
    return found


def _seed_range(seeds: tuple[int, ...]) -> str:
    if not seeds:
        return "?"
    if list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 1:
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


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
            "seeds",
            "settings",
            "pre-registered",
            "measured",
        ],
        rows,
        align="llllllllll",
    )
    tally: dict[str, int] = {"above": 0, "below": 0, "neither": 0}
    for c in found:
        tally[c.reading] += 1
    return (
        "# Every trade-off comparison so far\n\n"
        "Paired difference of the trade-off area up to 30% over-refusal (method − baseline;"
        " 95% interval by a seeds-then-questions bootstrap). *above* / *below*: the interval"
        " excludes 0. Folders without `PREREGISTERED.md` are pilots or secondary reports"
        " (the CRaFT ablations are registered in `tradeoff-craft/`).\n\n"
        f"{table}\n\n"
        f"Readings: {tally['above']} above, {tally['below']} below, {tally['neither']} neither."
        "\n\nWritten by `python -m bench.quality.ledger --write`.\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality.ledger", description=__doc__)
    p.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--write", action="store_true", help="also write <results-dir>/LEDGER.md")
    args = p.parse_args(argv)
    text = render(comparisons(args.results_dir))
    print(text)
    if args.write:
        (args.results_dir / "LEDGER.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
