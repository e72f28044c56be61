"""Evaluation reports: one JSON for machines, one Markdown for people, one P_w-P_c plot.

A report is a plain dict so the CLI, the service and the benchmarks can build it without
sharing classes, and so `report.json` reads back as the same dict. Its shape::

    {
      "method": str,                  # e.g. "grait"
      "base_model": str,
      "evals": [                      # one entry per evaluation set (ID and OOD)
        {
          "name": str,
          "kind": "mcqa" | "oeqa",
          "models": [                 # the FIRST entry is the base model: the THS reference
            {"name": str, "n": int, "correct": float, "wrong": float, "refused": float,
             "ths": float | None,     # None when undefined (base P_w = 0); may be omitted
             "ci": {metric: [low, high] | None}},   # optional bootstrap intervals
          ],
        },
      ],
      "timings": {stage: seconds},    # optional
      "notes": [str],                 # optional
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
    if not isinstance(report.get("timings", {}), dict):
        raise ReportError("report['timings']: expected an object {stage: seconds}")
    if not isinstance(report.get("notes", []), list):
        raise ReportError("report['notes']: expected a list of strings")


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
    for ev in report["evals"]:
        lines += ["", f"## {_md_escape(ev['name'])} ({ev['kind'].upper()})", ""]
        lines += ["| model | n | P_c | P_w | P_r | THS |", "|---|---:|---:|---:|---:|---:|"]
        for model in ev["models"]:
            cells = [_md_escape(model["name"]), str(model["n"])]
            cells += [_cell(model, key) for _, key in _RATES]
            lines.append("| " + " | ".join(cells) + " |")
    timings = report.get("timings") or {}
    if timings:
        lines += ["", "## Stage wall time", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {_md_escape(stage)} | {float(sec):.1f} |" for stage, sec in timings.items()]
        lines.append(f"| **total** | **{sum(float(s) for s in timings.values()):.1f}** |")
    notes = report.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


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


def write_report(out_dir: Path, report: dict[str, Any]) -> dict[str, Path]:
    """Validate the report, then write report.json, report.md and pw_pc.png into `out_dir`."""
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
    return paths
