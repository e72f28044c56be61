"""The quality benchmark's outputs: results.md (tables), summary.json, pw_pc.png."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import md_table, write_json
from bench.quality.runner import BASE_ROWS, MethodRun
from bench.quality.stats import METRICS, cell, summarise
from grait.events import STAGES
from grait.pipeline import MANIFEST
from grait.report import plot_pw_pc

ROW_ORDER = (
    "base",
    "base+refuse-prompt",
    "van",
    "rtuning",
    "grait",
    "grait-noweight",
    "random-idk",
)
ROW_LABEL = {
    "base": "base, plain prompt (Init-Basic; THS ref.)",
    "base+refuse-prompt": "base, may-refuse prompt (Init-Refuse)",
    "van": "van (all data, real answers)",
    "rtuning": "rtuning (all ik + all idk)",
    "grait": "grait",
    "grait-noweight": "grait-noweight (selection, no weights)",
    "random-idk": "random-idk (same count)",
}


def _per_seed(rows: dict[str, list[list[str]]], name: str) -> list[list[str]]:
    return rows[name]


def write_results(
    out_dir: Path,
    *,
    setting: str,
    smoke: bool,
    base_model: str,
    description: str,
    machine: str,
    seeds: list[int],
    hyper: dict[str, Any],
    runs: list[MethodRun],
    base: dict[str, dict[str, dict[str, Any]]],
    base_seconds: dict[str, float],
    evals: list[Any],
    timings: dict[str, float],
    extra: dict[str, Any],
    n_boot: int,
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in ROW_ORDER if m in BASE_ROWS or any(r.method == m for r in runs)]
    outcomes: dict[str, dict[str, list[list[str]]]] = {}
    for ev in evals:
        rows: dict[str, list[list[str]]] = {b: [base[b][ev.label]["outcomes"]] for b in BASE_ROWS}
        for r in sorted(runs, key=lambda r: r.seed):
            rows.setdefault(r.method, []).append(r.outcomes[ev.label])
        outcomes[ev.label] = rows

    summary: dict[str, Any] = {
        "setting": setting,
        "smoke": smoke,
        "base_model": base_model,
        "description": description,
        "machine": machine,
        "seeds": seeds,
        "hyperparameters": hyper,
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "timings": timings,
        "evals": {},
        **extra,
    }
    md = [
        f"# Quality benchmark: {setting}{' (smoke)' if smoke else ''}",
        "",
        f"- Measured {summary['measured_at']} on {machine}.",
        f"- Base model: `{base_model}`.",
        f"- Data: {description}.",
        (
            f"- Seeds: {len(seeds)} ({', '.join(map(str, seeds))}); every method shares each seed's Stage 1 and gradient features; "
            "the base model is evaluated once (greedy, seed-independent)."
        ),
        (
            f"- Cells: mean over seeds, with a paired bootstrap 95% interval over questions ({n_boot} resamples). "
            "THS = P_c − P_w·P_c0/P_w0 against the base model with the plain prompt."
        ),
        f"- Hyperparameters (all methods): `{json.dumps(hyper, separators=(',', ':'))}`.",
    ]
    if "teaching" in extra:
        t = extra["teaching"]
        md.append(
            f"- Knowing model: taught facts answered exactly {t.get('taught_correct', 0):.2f}, untaught "
            f"{t.get('untaught_correct', 0):.2f} (greedy, plain prompt, training paraphrase)."
        )
    plot_evals = []
    for ev in evals:
        rows = outcomes[ev.label]
        base_outcomes = rows["base"][0]
        entry: dict[str, Any] = {"n": len(ev.records), "methods": {}}
        table = []
        models = []
        for m in methods:
            s = summarise(rows[m], base_outcomes, n_boot=n_boot)
            entry["methods"][m] = s
            table.append([ROW_LABEL[m]] + [cell(s[k]) for k in METRICS])
            models.append({"name": m, "correct": s["P_c"]["value"], "wrong": s["P_w"]["value"]})
        md += ["", f"## {ev.label} ({len(ev.records)} questions)", ""]
        md.append(md_table(["method", "P_c", "P_w", "P_r", "THS"], table))
        if ev.known is not None:
            known = [i for i, k in enumerate(ev.known) if k]
            unknown = [i for i, k in enumerate(ev.known) if not k]
            kt = []
            entry["known_unknown"] = {}
            for m in methods:
                sk = summarise(rows[m], base_outcomes, columns=known, n_boot=n_boot)
                su = summarise(rows[m], base_outcomes, columns=unknown, n_boot=n_boot)
                entry["known_unknown"][m] = {"known": sk, "unknown": su}
                kt.append(
                    [
                        ROW_LABEL[m],
                        cell(sk["P_c"]),
                        cell(sk["P_r"]),
                        cell(su["P_r"]),
                        cell(su["P_w"]),
                    ]
                )
            md += [
                "",
                f"Known (taught, n={len(known)}) vs unknown (never taught, n={len(unknown)}) facts:",
                "",
                md_table(
                    [
                        "method",
                        "known: answered correctly",
                        "known: refused (over-refusal)",
                        "unknown: refused",
                        "unknown: hallucinated",
                    ],
                    kt,
                ),
            ]
        summary["evals"][ev.label] = entry
        plot_evals.append({"name": ev.label, "kind": ev.records[0].kind, "models": models})

    md += ["", "## Knowledge split and training sets (per seed)", ""]
    split_rows = []
    for r in sorted(runs, key=lambda r: (r.seed, ROW_ORDER.index(r.method))):
        manifest = json.loads((r.run_dir / MANIFEST).read_text())["stages"]
        kq = manifest.get("knowledge_query", {}).get("metrics", {})
        tr = manifest.get("training", {}).get("metrics", {})
        sel = manifest.get("selection", {}).get("metrics", {})
        split_rows.append(
            [
                r.seed,
                r.method,
                kq.get("n_ik", "–"),
                kq.get("n_idk", "–"),
                tr.get("examples"),
                tr.get("refusal_examples"),
                f"{sel['weight_min']:.2f}–{sel['weight_max']:.2f}"
                if "weight_min" in sel and r.method == "grait"
                else "–",
                _fmt(tr.get("final_loss")),
            ]
        )
    md.append(
        md_table(
            [
                "seed",
                "method",
                "ik",
                "idk",
                "train examples",
                "of which refusals",
                "idk weights",
                "final loss",
            ],
            split_rows,
        )
    )

    md += ["", "## Wall time per stage (seconds, mean over seeds)", ""]
    md.append(
        "Shared stages are computed once per seed by `grait` and linked into the others (shown as *shared*). "
        "Evaluation = this method's answers on all eval sets."
    )
    md.append("")
    time_rows = []
    for m in methods:
        if m in BASE_ROWS:
            time_rows.append(
                [ROW_LABEL[m]]
                + ["–"] * (len(STAGES) - 1)
                + [f"{base_seconds.get(m, 0):.1f}", f"{base_seconds.get(m, 0):.1f}"]
            )
            continue
        mine = [r for r in runs if r.method == m]
        cells, total = [], 0.0
        for stage in STAGES:
            if stage not in mine[0].timings:
                cells.append("–")
            elif stage in mine[0].shared:
                cells.append("shared")
            else:
                sec = float(
                    np.mean(
                        [
                            r.timings[stage]
                            for r in mine
                            if stage in r.timings and stage not in r.shared
                        ]
                    )
                )
                total += sec
                cells.append(f"{sec:.1f}")
        time_rows.append([ROW_LABEL[m]] + cells + [f"{total:.1f}"])
    md.append(md_table(["method", *STAGES, "total"], time_rows))
    md += ["", md_table(["phase", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()])]
    summary["stage_seconds"] = {
        f"{r.method}/seed{r.seed}": {**r.timings, "shared": sorted(r.shared)} for r in runs
    }
    summary["base_eval_seconds"] = base_seconds

    plot = out_dir / "pw_pc.png"
    plot_pw_pc(plot, plot_evals)
    md += [
        "",
        "## P_w–P_c plane",
        "",
        "![P_w vs P_c, every method, THS = 0 line through the base model](pw_pc.png)",
        "",
    ]
    paths = {"md": out_dir / "results.md", "json": out_dir / "summary.json", "png": plot}
    paths["md"].write_text("\n".join(md) + "\n")
    summary["outcomes"] = {ev: {m: rows for m, rows in per.items()} for ev, per in outcomes.items()}
    write_json(paths["json"], summary)
    return paths


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"
