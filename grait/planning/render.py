"""A plan as Markdown: what `grait plan` prints and the job report shows beside the measurement."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from grait.planning.estimate import Plan

GB = 1e9


def _gb(value: float) -> str:
    return f"{value / GB:.2f}"


def render_plan(
    plan: Plan | Mapping[str, Any], measured: Mapping[str, Mapping[str, float]] | None = None
) -> str:
    """One row per stage; with `measured` ({stage: {seconds, peak_memory_bytes}}) beside it.

    Takes the plan object or its JSON (as stored with a job or in a run folder).
    """
    p = plan.to_json() if isinstance(plan, Plan) else plan
    head = (
        f"Plan on `{p['compute_class']}` ({p['dtype']}"
        + (f", {p['quantization']}" if p["quantization"] != "none" else "")
        + f"): {p['params'] / 1e6:,.0f}M parameters, {p['lora_params'] / 1e6:,.2f}M LoRA, "
        f"weights {_gb(p['weights_bytes'])} GB. "
        + ("Fits" if p["fits"] else "**Does not fit**")
        + f": peak {_gb(p['peak_memory_bytes'])} GB of {_gb(p['memory_limit_bytes'])} GB "
        f"usable; about {p['seconds'] / 60:.1f} min."
    )
    cols = ["stage", "tokens", "TFLOP", "predicted s", "predicted peak GB", "bound"]
    if measured is not None:
        cols += ["measured s", "measured peak GB"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in p["stages"]:
        row = [
            s["stage"],
            f"{s['tokens']:,}",
            f"{s['flops'] / 1e12:.2f}",
            f"{s['seconds']:.1f}",
            _gb(s["peak_memory_bytes"]),
            s["bound"],
        ]
        if measured is not None:
            m = measured.get(s["stage"], {})
            row += [
                f"{m['seconds']:.1f}" if "seconds" in m else "",
                _gb(m["peak_memory_bytes"]) if m.get("peak_memory_bytes") else "",
            ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Assumptions: " + "; ".join(p["assumptions"]) + "."]
    if p.get("calibration"):
        lines.append(f"Efficiencies measured: {p['calibration']}.")
    return "\n".join(lines)
