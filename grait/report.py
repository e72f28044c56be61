"""Evaluation reports: one JSON for machines, one Markdown for people, a P_w-P_c plot.

With an `auto` refusal budget the report also carries the tried operating points, and a
second plot shows them (unknown refusal against over-refusal, the target as a line).

A report is a plain dict so the CLI, the service and the benchmarks can build it without
sharing classes, and so `report.json` reads back as the same dict. Its shape::

    {
      "method": str,                  # e.g. "grait"
      "base_model": str,
      "evals": [                      # one entry per evaluation set (ID and OOD)
        {
          "name": str,
          "kind": "mcqa" | "oeqa",
          "refusal_bias": {...},      # optional: what each refusal bias would do (see
                                      # grait.refusal_bias.bias_curve)
          "models": [                 # the FIRST entry is the base model: the THS reference
            {"name": str, "n": int, "correct": float, "wrong": float, "refused": float,
             "ths": float | None,     # None when undefined (base P_w = 0); may be omitted
             "over_refusal": float | None,     # optional: refused where the base was right,
             "unknown_refusal": float | None,  # ... where it was not,
             "separability": float | None,     # ... and d′ between the two
             "ci": {metric: [low, high] | None}},   # optional bootstrap intervals
          ],
        },
      ],
      "timings": {stage: seconds},    # optional
      "notes": [str],                 # optional
      "operating_point": {            # optional: `knowledge.n_idk: auto` (operating_point.json)
        "budget": int, "rule": "auto" | "ratio", "reason": str,
        "target_max_over_refusal": float,
        "points": [{"budget_full": int, "over_refusal": float,
                    "unknown_refusal": float | None, ...}],
        "chosen": {...} | None,
      },
    }

Files are written to a temporary name and then renamed, so a reader (the service polling a
job folder) never sees half a report.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

KINDS = ("mcqa", "oeqa")
OPERATING_POINT_PLOT = "operating_point.png"
_REPORT_KEYS = ("method", "base_model", "evals")
_EVAL_KEYS = ("name", "kind", "models")
_MODEL_KEYS = ("name", "n", "correct", "wrong", "refused")
_RATES = (("P_c", "correct"), ("P_w", "wrong"), ("P_r", "refused"), ("THS", "ths"))


class ReportError(ValueError):
    """A report dict that does not have the documented shape; names the key at fault."""


def _require(obj: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(obj, dict):
        raise ReportError(f"{where}: expected an object, got {type(obj).__name__}")
    for key in keys:
        if key not in obj:
            raise ReportError(f"{where}: missing required key {key!r}")


def _check_fraction(value: Any, where: str) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok:
        raise ReportError(f"{where}: expected a number in [0, 1], got {value!r}")


def validate_report(report: dict[str, Any]) -> None:
    """Raise ReportError (a ValueError) naming the first missing key or bad value (see the module docstring)."""
    _require(report, _REPORT_KEYS, "report")
    if not isinstance(report["evals"], list):
        raise ReportError("report['evals']: expected a list of eval sets")
    for i, ev in enumerate(report["evals"]):
        where = f"report['evals'][{i}]"
        _require(ev, _EVAL_KEYS, where)
        if ev["kind"] not in KINDS:
            raise ReportError(f"{where}['kind']: {ev['kind']!r} is not one of {list(KINDS)}")
        if not isinstance(ev["models"], list) or not ev["models"]:
            raise ReportError(f"{where}['models']: expected a non-empty list (base model first)")
        for j, model in enumerate(ev["models"]):
            mwhere = f"{where}['models'][{j}]"
            _require(model, _MODEL_KEYS, mwhere)
            if not isinstance(model["n"], int) or isinstance(model["n"], bool) or model["n"] < 0:
                raise ReportError(f"{mwhere}['n']: expected a count >= 0, got {model['n']!r}")
            for key in ("correct", "wrong", "refused"):
                _check_fraction(model[key], f"{mwhere}[{key!r}]")
            score = model.get("ths")
            if score is not None and not (isinstance(score, int | float) and math.isfinite(score)):
                raise ReportError(
                    f"{mwhere}['ths']: expected a finite number or null, got {score!r}"
                )
            for key in ("over_refusal", "unknown_refusal"):
                if model.get(key) is not None:
                    _check_fraction(model[key], f"{mwhere}[{key!r}]")
            d = model.get("separability")
            if d is not None and not (isinstance(d, int | float) and math.isfinite(d)):
                raise ReportError(
                    f"{mwhere}['separability']: expected a finite number or null, got {d!r}"
                )
        if "refusal_bias" in ev:
            _validate_bias_curve(ev["refusal_bias"], f"{where}['refusal_bias']")
    if not isinstance(report.get("timings", {}), dict):
        raise ReportError("report['timings']: expected an object {stage: seconds}")
    if not isinstance(report.get("notes", []), list):
        raise ReportError("report['notes']: expected a list of strings")
    if "operating_point" in report:
        _validate_operating_point(report["operating_point"])
    warnings = report.get("warnings", [])
    if not isinstance(warnings, list) or not all(
        isinstance(w, dict) and isinstance(w.get("code"), str) and isinstance(w.get("message"), str)
        for w in warnings
    ):
        raise ReportError("report['warnings']: expected a list of {code, message} objects")


def _validate_operating_point(op: Any) -> None:
    where = "report['operating_point']"
    _require(op, ("budget", "rule", "reason", "target_max_over_refusal", "points"), where)
    _check_fraction(op["target_max_over_refusal"], f"{where}['target_max_over_refusal']")
    if not isinstance(op["points"], list):
        raise ReportError(f"{where}['points']: expected a list of tried budgets")
    for i, point in enumerate(op["points"]):
        pwhere = f"{where}['points'][{i}]"
        _require(point, ("budget_full", "over_refusal", "unknown_refusal"), pwhere)
        _check_fraction(point["over_refusal"], f"{pwhere}['over_refusal']")
        if point["unknown_refusal"] is not None:
            _check_fraction(point["unknown_refusal"], f"{pwhere}['unknown_refusal']")


def _validate_bias_curve(curve: Any, where: str) -> None:
    _require(curve, ("current_bias", "n_known", "n_unknown", "points"), where)
    if not isinstance(curve["points"], list) or not curve["points"]:
        raise ReportError(f"{where}['points']: expected a non-empty list")
    for i, point in enumerate(curve["points"]):
        pwhere = f"{where}['points'][{i}]"
        _require(point, ("level", "bias", "over_refusal", "unknown_refusal", "refused"), pwhere)
        for key in ("over_refusal", "unknown_refusal"):
            if point[key] is not None:
                _check_fraction(point[key], f"{pwhere}[{key!r}]")
        _check_fraction(point["refused"], f"{pwhere}['refused']")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a unique temporary file in the same folder, then rename over `path`."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp makes 0600; reports are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cell(model: dict[str, Any], key: str) -> str:
    text = _fmt(model.get(key))
    interval = (model.get("ci") or {}).get(key)
    if interval is not None and text != "n/a":
        text += f" ({interval[0]:.3f}–{interval[1]:.3f})"
    return text


_SPLIT_NOTE = (
    "Refused, base right: over-refusal, refusals of questions the base model answered "
    "correctly; base wrong: refusals of the rest. d′ = z(base wrong) − z(base right): how "
    "well the refusals pick out what the base did not know, whatever the amount refused "
    "(0 = blind)."
)


def _split_cells(model: dict[str, Any]) -> list[str]:
    d = model.get("separability")
    return [
        _pct(model.get("over_refusal")),
        _pct(model.get("unknown_refusal")),
        "n/a" if d is None else f"{d:.2f}",
    ]


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _has_intervals(report: dict[str, Any]) -> bool:
    return any(m.get("ci") for ev in report["evals"] for m in ev["models"])


def render_markdown(report: dict[str, Any]) -> str:
    """A readable summary: one table per eval set, then stage timings and notes."""
    lines = [
        f"# Evaluation report: {_md_escape(report['method'])}",
        "",
        f"- Method: `{report['method']}`",
        f"- Base model: `{report['base_model']}`",
        "",
        (
            "P_c, P_w, P_r: fractions correct, wrong, refused. THS = P_c − P_w·P_c0/P_w0 against "
            "the first row (the base model); n/a where P_w0 = 0."
            + (
                " Brackets: bootstrap 95% intervals over questions."
                if _has_intervals(report)
                else ""
            )
        ),
    ]
    warnings = report.get("warnings") or []
    if warnings:
        lines += ["", "## Warnings", ""]
        lines += [f"- **{_md_escape(w['code'])}**: {_md_escape(w['message'])}" for w in warnings]
    for ev in report["evals"]:
        lines += ["", f"## {_md_escape(ev['name'])} ({ev['kind'].upper()})", ""]
        split = any("over_refusal" in m for m in ev["models"][1:])
        head, align = "| model | n | P_c | P_w | P_r | THS |", "|---|---:|---:|---:|---:|---:|"
        if split:
            head += " refused, base right | refused, base wrong | d′ |"
            align += "---:|---:|---:|"
        lines += [head, align]
        for i, model in enumerate(ev["models"]):
            cells = [_md_escape(model["name"]), str(model["n"])]
            cells += [_cell(model, key) for _, key in _RATES]
            if split:
                # The first row is the base model itself: the split is of the others.
                cells += ["–"] * 3 if i == 0 else _split_cells(model)
            lines.append("| " + " | ".join(cells) + " |")
        if split:
            lines += ["", _SPLIT_NOTE]
        if ev.get("refusal_bias"):
            lines += _bias_curve_markdown(ev["refusal_bias"])
    if report.get("training"):
        lines += _training_markdown(report["training"])
    timings = report.get("timings") or {}
    if timings:
        lines += ["", "## Stage wall time", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {_md_escape(stage)} | {float(sec):.1f} |" for stage, sec in timings.items()]
        lines.append(f"| **total** | **{sum(float(s) for s in timings.values()):.1f}** |")
    if report.get("operating_point"):
        lines += _operating_point_markdown(report["operating_point"])
    notes = report.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _training_markdown(training: dict[str, Any]) -> list[str]:
    """How long the adapter trained and whether it gives its own training targets."""
    lines = ["", "## Training", ""]
    if "epochs" in training:
        lines.append(
            f"- {training.get('examples', '?')} examples ({training.get('refusal_examples', 0)} "
            f"refusals), {float(training['epochs']):g} epochs = "
            f"{training.get('optimizer_steps', '?')} optimizer steps."
        )
    fit = training.get("fit")
    if fit:
        lines.append(
            f"- Fit check (teacher-forced, greedy-equivalent): training refusals given "
            f"{_pct(fit.get('refusal_learned'))} of {fit.get('n_refusal', 0)}; known answers "
            f"given {_pct(fit.get('answers_kept'))} of {fit.get('n_answer', 0)}."
        )
    return lines


def _bias_curve_markdown(curve: dict[str, Any]) -> list[str]:
    """What other refusal biases would do on this eval set (grait/refusal_bias.py)."""
    lines = [
        "",
        (
            f"Refusal bias (`decoding.refusal_bias`, now {curve['current_bias']:g}): the logit "
            "added to the refusal's first token at the first step. Teacher-forced, exact refusal "
            f"and exact gold answer; known = the base model answered correctly ({curve['n_known']} "
            f"known, {curve['n_unknown']} unknown). Each level's bias is fitted on these questions, "
            "so the table shows the trade-off, not a held-out estimate."
        ),
        "",
        "| over-refusal level | bias | over-refusal | unknown refused | P_c | P_w | P_r | THS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in curve["points"]:
        level = "current" if p["level"] is None else f"≤ {_pct(p['level'])}"
        cells = [level, f"{p['bias']:+.2f}", _pct(p["over_refusal"]), _pct(p["unknown_refusal"])]
        cells += [_fmt(p.get(k)) for k in ("correct", "wrong", "refused", "ths")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _counts(point: dict[str, Any], side: str) -> str:
    refused, n = point.get(f"{side}_refused"), point.get(f"n_{side}")
    return f" ({refused}/{n})" if isinstance(refused, int) and isinstance(n, int) and n else ""


def _operating_point_markdown(op: dict[str, Any]) -> list[str]:
    """The `auto` budget: why this one, and every tried point (plot: operating_point.png)."""
    lines = ["", "## Refusal budget", "", f"{_md_escape(op['reason'])}."]
    if not op["points"]:
        return lines
    validation = op.get("validation") or {}
    target_line = (
        f"Target: over-refusal at most {_pct(op['target_max_over_refusal'])} of "
        f"{validation.get('known', '?')} held-out known questions "
        f"({validation.get('unknown', '?')} held-out unknown); each budget trained a trial "
        f"adapter on the rest (plot: `{OPERATING_POINT_PLOT}`)."
    )
    biased = any(p.get("refusal_bias") is not None for p in op["points"])
    header = "| budget (all data) | budget (after hold-out) | over-refusal | unknown refused |"
    rule = "|---:|---:|---:|---:|"
    if biased:
        header += " refusal bias | over-refusal, biased | unknown refused, biased |"
        rule += "---:|---:|---:|"
    lines += ["", target_line, "", header + " |", rule + "---|"]
    chosen = (op.get("chosen") or {}).get("budget_full")
    target = op["target_max_over_refusal"]
    for p in op["points"]:
        mark = "**chosen**" if p["budget_full"] == chosen else ""
        if not mark and not biased and p["over_refusal"] > target + 1e-9:
            mark = "over target"
        cells = [
            str(p["budget_full"]),
            str(p.get("budget", "")),
            _pct(p["over_refusal"]) + _counts(p, "known"),
            _pct(p["unknown_refusal"]) + _counts(p, "unknown"),
        ]
        if biased:
            bias = p.get("refusal_bias")
            cells += [
                "" if bias is None else f"{bias:+.2f}",
                _pct(p.get("biased_over_refusal")),
                _pct(p.get("biased_unknown_refusal")),
            ]
        lines.append("| " + " | ".join([*cells, mark]) + " |")
    return lines


def _draw_eval(ax: Any, ev: dict[str, Any]) -> None:
    models = ev["models"]
    base = models[0]
    for i, model in enumerate(models):
        x, y = model["wrong"], model["correct"]
        ax.scatter([x], [y], marker="s" if i == 0 else "o", zorder=3, clip_on=False)
        ax.annotate(
            str(model["name"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    title = f"{ev['name']} ({ev['kind'].upper()})"
    if base["wrong"] > 0:
        # THS = 0 exactly on this line; points above it beat the base model.
        slope = base["correct"] / base["wrong"]
        x_end = min(1.0, 1.0 / slope) if slope > 0 else 1.0
        ax.plot(
            [0.0, x_end], [0.0, x_end * slope], "--", color="grey", linewidth=1, label="THS = 0"
        )
        ax.legend(loc="lower right", fontsize=8)
    else:
        title += "\nTHS = 0 line undefined (base P_w = 0)"
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("P_w (wrong)")
    ax.set_ylabel("P_c (correct)")
    ax.grid(True, alpha=0.3)


def plot_pw_pc(path: Path, evals: list[dict[str, Any]]) -> None:
    """P_w against P_c per eval set, with the THS = 0 line through the base model's point.

    Uses a bare `Figure` (no pyplot) so it never touches a global backend or leaks figures
    in a long-running worker.
    """
    fig = Figure(figsize=(5 * max(1, len(evals)), 4.8), layout="constrained")
    if not evals:
        fig.text(0.5, 0.5, "no evaluation sets", ha="center", va="center")
    for i, ev in enumerate(evals):
        _draw_eval(fig.add_subplot(1, len(evals), i + 1), ev)
    _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot_operating_point(path: Path, op: dict[str, Any]) -> None:
    """Unknown refusal against over-refusal per tried budget, the chosen one marked.

    The target is a vertical line: points left of it were acceptable, and the chosen one is
    the rightmost (largest budget) of those, unless none was.
    """
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    points = [p for p in op["points"] if p["unknown_refusal"] is not None]
    target = op["target_max_over_refusal"]
    if not points:
        message = "no budgets measured:\nthe budget came from the ik:idk ratio rule"
        ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    else:
        xs = [p["over_refusal"] for p in points]
        ys = [p["unknown_refusal"] for p in points]
        ax.plot(xs, ys, "-o", color="tab:blue", zorder=2, label="tried budgets")
        for p in points:
            ax.annotate(
                str(p["budget_full"]),
                (p["over_refusal"], p["unknown_refusal"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        biased = [p for p in points if p.get("biased_unknown_refusal") is not None]
        if biased:
            ax.plot(
                [p["biased_over_refusal"] for p in biased],
                [p["biased_unknown_refusal"] for p in biased],
                "-s",
                color="tab:green",
                zorder=2,
                label="same budgets, refusal bias",
            )
        chosen = op.get("chosen")
        if chosen and chosen.get("biased_unknown_refusal") is not None:
            ax.scatter(
                [chosen["biased_over_refusal"]],
                [chosen["biased_unknown_refusal"]],
                marker="*",
                s=220,
                color="tab:orange",
                zorder=3,
                label=f"chosen: {chosen['budget_full']}, bias {chosen['refusal_bias']:+.2f}",
            )
        elif chosen and chosen.get("unknown_refusal") is not None:
            ax.scatter(
                [chosen["over_refusal"]],
                [chosen["unknown_refusal"]],
                marker="*",
                s=220,
                color="tab:orange",
                zorder=3,
                label=f"chosen: {chosen['budget_full']}",
            )
    ax.axvline(target, linestyle="--", color="grey", linewidth=1, label=f"target {_pct(target)}")
    right = max([target] + [p["over_refusal"] for p in points])
    ax.set_xlim(0.0, min(1.0, right * 1.2 + 0.02))
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("over-refusal (held-out known refused)")
    ax.set_ylabel("unknown refusal (held-out unknown refused)")
    ax.set_title("Refusal budget: tried operating points", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def write_report(out_dir: Path, report: dict[str, Any]) -> dict[str, Path]:
    """Validate the report, then write report.json, report.md and pw_pc.png into `out_dir`.

    A report with an `operating_point` also gets operating_point.png.
    """
    validate_report(report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "report.json",
        "md": out_dir / "report.md",
        "png": out_dir / "pw_pc.png",
    }
    text = json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    _atomic_write(paths["json"], lambda tmp: tmp.write_text(text, encoding="utf-8"))
    markdown = render_markdown(report)
    _atomic_write(paths["md"], lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    plot_pw_pc(paths["png"], report["evals"])
    if report.get("operating_point"):
        paths["operating_point_png"] = out_dir / OPERATING_POINT_PLOT
        plot_operating_point(paths["operating_point_png"], report["operating_point"])
    return paths
