"""Tables and plots of the trade-off study (`bench.quality --setting tradeoff`).

Reads what `tradeoff.run_profile` returns and writes `results.md`, `summary.json` and one
curve plot per testbed. The primary metric was fixed before any result was seen: the ID
trade-off area up to 30% over-refusal (`curves.tradeoff_area`), as the difference
grait − random-idk with a seeds-then-questions bootstrap 95% interval.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import md_table, write_json
from bench.quality.curves import (
    CAP,
    SeedCurves,
    area_difference,
    area_of,
    hierarchical_ci,
    rates,
    separability,
    separability_difference,
    separability_of,
    ths_per_budget,
)
from bench.quality.testbed import relation_of
from bench.quality.tradeoff import ALL
from grait.refusal_score import auroc

EVAL_SETS = {"id": "ID (training paraphrase)", "ood": "OOD (unseen paraphrase)"}


def _budget_key(b: int | str) -> float:
    return float("inf") if b == ALL else float(b)


def known_of(seed: dict[str, Any], eval_set: str) -> np.ndarray:
    """Known = the untuned (knowing) model answers the question correctly, plain prompt.

    Not "taught": teaching does not take for every fact (the topic testbed's model answers
    74% of its taught facts), and refusing a taught fact the model never learned is right,
    not over-refusal. Per eval set, since a paraphrase can be known where another is not.
    """
    return np.array(seed["base"][eval_set]["outcomes"]) == "correct"


def curves_for(result: dict[str, Any], eval_set: str) -> tuple[list[SeedCurves], dict[str, list]]:
    """Per seed: refused/correct matrices [budgets, questions] per method (rtuning row last)."""
    by = {(c["seed"], c["method"], c["budget"]): c for c in result["cells"]}
    methods = result["methods"]
    seeds, budgets_of = [], {}
    for s in result["seeds"]:
        known = known_of(s, eval_set)
        base = np.array(s["base"][eval_set]["outcomes"])
        refused, correct = {}, {}
        for m in methods + ["rtuning"]:
            keys = sorted(
                (b for (seed, mm, b) in by if seed == s["seed"] and mm == m), key=_budget_key
            )
            rows = keys if m == "rtuning" else keys + [ALL]
            outs = [
                np.array(
                    by[(s["seed"], "rtuning" if b == ALL else m, b)]["probe"][eval_set]["outcomes"]
                )
                for b in rows
            ]
            refused[m] = np.stack([o == "refused" for o in outs])
            correct[m] = np.stack([o == "correct" for o in outs])
            budgets_of.setdefault(m, []).append(rows)
        seeds.append(SeedCurves(known, refused, correct, base == "correct", base == "wrong"))
    return seeds, budgets_of


def _fmt(point: float, ci: tuple[float, float] | None = None) -> str:
    if ci is None:
        return f"{point:.3f}"
    return f"{point:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def summarise_profile(result: dict[str, Any], n_boot: int) -> dict[str, Any]:
    """Every number the report shows, for one testbed."""
    methods = result["methods"]
    out: dict[str, Any] = {"profile": result["profile"], "eval": {}}
    for ev in result["eval_sets"]:
        seeds, budgets_of = curves_for(result, ev)
        entry: dict[str, Any] = {"area": {}, "area_diff": {}, "curve": {}, "ths_best": {}}
        for m in methods:
            entry["area"][m] = hierarchical_ci(seeds, area_of(m), n_boot=n_boot)
        for m in methods:
            for other in methods:
                # grait against everything; every other ranked method against random-idk.
                if m != other and (m.startswith("grait") or other == "random-idk"):
                    entry["area_diff"][f"{m} - {other}"] = hierarchical_ci(
                        seeds, area_difference(m, other), n_boot=n_boot
                    )
        full = [np.arange(len(s.known)) for s in seeds]
        for m in methods + ["rtuning"]:
            rows = budgets_of[m][0]
            if any(r != rows for r in budgets_of[m]):
                rows = None  # budgets differ by seed (few unknowns): report by position
            over = np.array([rates(s.refused[m], s.known, i)[0] for s, i in zip(seeds, full)])
            rec = np.array([rates(s.refused[m], s.known, i)[1] for s, i in zip(seeds, full)])
            th = np.array([ths_per_budget(s, m, i) for s, i in zip(seeds, full)])
            dp = np.array([[separability(row, s.known) for row in s.refused[m]] for s in seeds])
            entry["curve"][m] = {
                "budgets": rows or budgets_of[m][0],
                "over_refusal": over.mean(axis=0).tolist(),
                "unknown_refused": rec.mean(axis=0).tolist(),
                "ths": np.nanmean(th, axis=0).tolist(),
                "ths_seed_sd": np.nanstd(th, axis=0).tolist(),
                "separability": dp.mean(axis=0).tolist(),
            }
        # Separability d′ (post hoc, exploratory): does a method separate better at all?
        entry["separability"] = {
            m: hierarchical_ci(seeds, separability_of(m), n_boot=n_boot)
            for m in methods + ["rtuning"]
        }
        entry["separability_diff"] = {
            f"{m} - random-idk": hierarchical_ci(
                seeds, separability_difference(m, "random-idk"), n_boot=n_boot
            )
            for m in methods
            if m != "random-idk" and "random-idk" in methods
        }
        # AUROC of the refusal score (unknown vs known), per method and budget, mean over seeds.
        entry["auroc"] = _aurocs(result, ev)
        # THS at each method's best budget (by the seed mean), with its interval.
        for m in methods + ["rtuning"]:
            th = np.array(entry["curve"][m]["ths"])
            best = int(np.nanargmax(th))
            stat = lambda s, i, m=m, best=best: float(ths_per_budget(s, m, i)[best])
            entry["ths_best"][m] = {
                "budget": entry["curve"][m]["budgets"][best],
                "value": hierarchical_ci(seeds, stat, n_boot=n_boot),
            }
        out["eval"][ev] = entry
    out["relations"] = _per_relation(result)
    out["auto"] = _auto_simulation(result)
    out["seconds"] = _seconds(result)
    return out


def _aurocs(result: dict[str, Any], ev: str) -> dict[str, dict[str, float]]:
    known = {s["seed"]: known_of(s, ev) for s in result["seeds"]}
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in result["cells"]:
        scores = np.array(c["probe"][ev]["scores"])
        acc[c["method"]][str(c["budget"])].append(auroc(scores, ~known[c["seed"]]))
    return {m: {b: float(np.mean(v)) for b, v in d.items()} for m, d in acc.items()}


def _per_relation(result: dict[str, Any]) -> dict[str, Any]:
    """Per relation: taught share, picks per method (all budgets' largest common prefix),
    and ID refusal of known / unknown facts at the middle budget."""
    taught = defaultdict(list)
    for f in result["facts"]:
        taught[relation_of(f["id"])].append(f["taught"])
    budgets = sorted(result["budgets"])
    mid = budgets[len(budgets) // 2] if budgets else ALL
    rel: dict[str, Any] = {
        r: {
            "taught_share": float(np.mean(v)),
            "picks": {},
            "known_refused": {},
            "unknown_refused": {},
        }
        for r, v in sorted(taught.items())
    }
    seeds = {s["seed"]: s for s in result["seeds"]}
    for m in result["methods"] + ["rtuning"]:
        cells = [
            c
            for c in result["cells"]
            if c["method"] == m and (c["budget"] == mid or m == "rtuning")
        ]
        for r in rel:
            picks = [sum(relation_of(p) == r for p in c["picked"]) for c in cells]
            kr, ur = [], []
            for c in cells:
                s = seeds[c["seed"]]
                outs = c["probe"]["id"]["outcomes"]
                for fid, known, o in zip(s["eval_ids"], known_of(s, "id"), outs):
                    if relation_of(fid) == r:
                        (kr if known else ur).append(o == "refused")
            rel[r]["picks"][m] = float(np.mean(picks)) if picks else 0.0
            rel[r]["known_refused"][m] = float(np.mean(kr)) if kr else None
            rel[r]["unknown_refused"][m] = float(np.mean(ur)) if ur else None
    return {"budget": mid, "relations": rel}


def _auto_simulation(result: dict[str, Any], target: float = 0.05) -> dict[str, Any]:
    """Choose the budget on one half of the eval questions, report THS on the other half.

    What `auto` does for a user (the largest budget whose over-refusal on held-out known
    questions stays within the target), with the eval set's halves standing in for the
    user's validation slice and test set; both halves are swapped and averaged.
    """
    out: dict[str, Any] = {"target": target}
    seeds, _ = curves_for(result, "id")
    rng = np.random.default_rng(0)
    for m in result["methods"] + ["rtuning"]:
        vals, chosen = [], []
        for s in seeds:
            idx = rng.permutation(len(s.known))
            halves = (idx[: len(idx) // 2], idx[len(idx) // 2 :])
            for a, b in (halves, halves[::-1]):
                over, _ = rates(s.refused[m], s.known, a)
                ok = np.flatnonzero(over <= target)
                pick = int(ok.max()) if len(ok) else None
                th = ths_per_budget(s, m, b)
                vals.append(0.0 if pick is None else float(th[pick]))  # refuse nothing: THS of ~0
                chosen.append(pick)
        out[m] = {"ths": float(np.mean(vals)), "ths_sd": float(np.std(vals)), "n": len(vals)}
    return out


def _seconds(result: dict[str, Any]) -> dict[str, float]:
    tot: dict[str, list[float]] = defaultdict(list)
    for c in result["cells"]:
        for k, v in c["seconds"].items():
            tot[k].append(v)
    return {k: float(np.mean(v)) for k, v in tot.items()}


def render(summary: dict[str, Any], result: dict[str, Any], header: list[str]) -> str:
    """The Markdown section of one testbed."""
    p = summary["profile"]
    methods = result["methods"]
    lines = [f"## Testbed `{p}`", ""]
    t = result["teaching"]
    lines.append(
        f"- Knowing model: taught facts answered exactly {t.get('taught_correct', float('nan')):.2f}, "
        f"untaught {t.get('untaught_correct', float('nan')):.2f}."
    )
    n_known = [int(known_of(s, "id").sum()) for s in result["seeds"]]
    n_ik = [len(s["ik"]) for s in result["seeds"]]
    n_idk = [len(s["idk"]) for s in result["seeds"]]
    lines.append(
        f"- Per seed: {len(result['seeds'][0]['train_ids'])} training facts, Stage 1 known "
        f"{min(n_ik)}–{max(n_ik)}, unknown {min(n_idk)}–{max(n_idk)}; eval "
        f"{len(result['seeds'][0]['known'])} facts (half taught), of which the untuned model "
        f"answers {min(n_known)}–{max(n_known)} correctly (ID): those are the *known* ones below."
    )
    agree = result.get("agreement") or {}
    if agree:
        lines.append(
            "- Teacher-forced outcomes vs greedy generation scored with the refusal patterns "
            "(ID, first seed): "
            + "; ".join(f"{k}: {v['agreement']:.1%} agree" for k, v in agree.items())
            + "."
        )
    lines += header + [""]
    for ev, e in summary["eval"].items():
        title = EVAL_SETS[ev]
        lines += [f"### {title}", ""]
        rows = [[m, _fmt(*e["area"][m])] for m in methods]
        lines.append(
            f"Trade-off area up to {CAP:.0%} over-refusal (mean over seeds, 95% CI seeds→questions):"
        )
        lines += ["", md_table(["method", "area"], rows), ""]
        if e["area_diff"]:
            rows = [[k, _fmt(*v)] for k, v in e["area_diff"].items()]
            lines += ["Paired differences:", "", md_table(["difference", "area"], rows), ""]
        rows = []
        for m in methods + ["rtuning"]:
            c = e["curve"][m]
            for i, b in enumerate(c["budgets"]):
                if m != "rtuning" and b == ALL:
                    continue
                au = e["auroc"].get("rtuning" if b == ALL else m, {}).get(str(b))
                rows.append(
                    [
                        m,
                        b,
                        f"{c['over_refusal'][i]:.3f}",
                        f"{c['unknown_refused'][i]:.3f}",
                        f"{c['ths'][i]:.3f} ± {c['ths_seed_sd'][i]:.3f}",
                        "–" if au is None else f"{au:.3f}",
                        f"{c['separability'][i]:.2f}" if "separability" in c else "–",
                    ]
                )
        lines += [
            (
                "Curve points (mean over seeds; THS ± seed sd; AUROC of log p(refusal) − log p(gold), "
                "unknown vs known; d′ = z(unknown refused) − z(known refused)):"
            ),
            "",
            md_table(
                ["method", "budget", "known refused", "unknown refused", "THS", "AUROC", "d′"],
                rows,
            ),
            "",
        ]
        if e.get("separability"):
            rows = [[m, _fmt(*v)] for m, v in e["separability"].items()]
            rows += [[k, _fmt(*v)] for k, v in e.get("separability_diff", {}).items()]
            lines += [
                (
                    "Separability d′ of the greedy refusals, mean over a method's own budgets "
                    "(exploratory, not the registered metric; 95% CI seeds→questions):"
                ),
                "",
                md_table(["method", "d′"], rows),
                "",
            ]
        rows = [[m, v["budget"], _fmt(*v["value"])] for m, v in e["ths_best"].items()]
        lines += [
            "THS at each method's best budget:",
            "",
            md_table(["method", "budget", "THS"], rows),
            "",
        ]
    a = summary["auto"]
    rows = [[m, f"{v['ths']:.3f} ± {v['ths_sd']:.3f}"] for m, v in a.items() if m != "target"]
    lines += [
        f"### `auto` operating point (max over-refusal {a['target']:.0%}), ID",
        "",
        "Budget chosen on one half of the eval questions, THS measured on the other half (both ways, every seed; ± sd):",
        "",
        md_table(["method", "THS"], rows),
        "",
    ]
    rel = summary["relations"]
    heads = (
        ["relation", "taught"]
        + [f"{m} picks" for m in methods]
        + [f"{m} known / unknown refused" for m in methods + ["rtuning"]]
    )
    rows = []
    for r, v in rel["relations"].items():
        row = [r, f"{v['taught_share']:.2f}"] + [f"{v['picks'][m]:.1f}" for m in methods]
        for m in methods + ["rtuning"]:
            k, u = v["known_refused"][m], v["unknown_refused"][m]
            row.append(f"{'–' if k is None else f'{k:.2f}'} / {'–' if u is None else f'{u:.2f}'}")
        rows.append(row)
    lines += [
        f"### Per relation (budget {rel['budget']}, ID, mean over seeds)",
        "",
        md_table(heads, rows),
        "",
        "Mean wall time per (method, budget) run, seconds: "
        + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()),
        "",
    ]
    return "\n".join(lines)


def plot(summary: dict[str, Any], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = list(summary["eval"])
    fig, axes = plt.subplots(1, len(evals), figsize=(5 * len(evals), 4.2), squeeze=False)
    for ax, ev in zip(axes[0], evals):
        title = EVAL_SETS[ev]
        curve = summary["eval"][ev]["curve"]
        for m in methods:
            c = curve[m]
            ax.plot(c["over_refusal"], c["unknown_refused"], marker="o", label=m)
            for x, y, b in zip(c["over_refusal"], c["unknown_refused"], c["budgets"]):
                ax.annotate(str(b), (x, y), fontsize=7, xytext=(3, -8), textcoords="offset points")
        r = curve["rtuning"]
        ax.scatter(
            r["over_refusal"], r["unknown_refused"], marker="*", s=120, c="k", label="rtuning"
        )
        ax.axvline(CAP, color="grey", lw=0.8, ls="--")
        ax.set(
            xlabel="known facts refused (over-refusal)",
            ylabel="unknown facts refused",
            title=f"{summary['profile']}: {title}",
            xlim=(-0.02, 1.0),
            ylim=(-0.02, 1.02),
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_study(
    out_dir: Path, results: list[dict[str, Any]], *, header: list[str], n_boot: int
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    sections, summaries = [], []
    for result in results:
        summary = summarise_profile(result, n_boot)
        summaries.append(summary)
        # A testbed run in an earlier session keeps the header of its own run.
        sections.append(render(summary, result, result.get("header", header)))
        plot(summary, result["methods"], out_dir / f"tradeoff_{result['profile']}.png")
    md = out_dir / "results.md"
    md.write_text("# Refusal trade-off study\n\n" + "\n".join(sections))
    write_json(out_dir / "summary.json", {"summaries": summaries, "results": results})
    return {"md": md, "json": out_dir / "summary.json"}
