"""The benchmarks' smoke modes (tiny random model, tiny sizes) run end to end and write their
tables and plots. CI runs these; the full benchmarks are run by hand (bench/README.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

QUALITY_ROWS = [
    "base, plain prompt (Init-Basic; THS ref.)",
    "base, may-refuse prompt (Init-Refuse)",
    "van (all data, real answers)",
    "rtuning (all ik + all idk)",
    "grait |",
    "grait-noweight (selection, no weights)",
    "random-idk (same count)",
]
METHODS = {"base", "base+refuse-prompt", "van", "rtuning", "grait", "grait-noweight", "random-idk"}


def _table_rows(markdown: str, section: str) -> list[str]:
    """Rows of the first table after the heading `## <section>`."""
    lines = markdown.split(f"## {section}", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append(line)
    return rows


@pytest.mark.parametrize("setting", ["real", "testbed"])
def test_quality_smoke_writes_every_method_table_and_plot(setting: str, tmp_path: Path) -> None:
    from bench.quality.cli import main

    assert main(["--setting", setting, "--smoke", "--results-dir", str(tmp_path)]) == 0
    out = tmp_path / f"smoke-{setting}"
    md = (out / "results.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "pw_pc.png").stat().st_size > 1000
    assert len(summary["evals"]) == 2
    for label, entry in summary["evals"].items():
        assert set(entry["methods"]) == METHODS
        rows = _table_rows(md, label)
        assert len(rows) == len(QUALITY_ROWS)
        for row, name in zip(rows, QUALITY_ROWS):
            assert row.startswith(f"| {name}"), row
        for stats in entry["methods"].values():
            assert {"P_c", "P_w", "P_r", "THS"} <= set(stats)
            rates = sum(stats[k]["value"] for k in ("P_c", "P_w", "P_r"))
            assert rates == pytest.approx(1.0)
        assert entry["methods"]["base"]["THS"]["value"] in (None, pytest.approx(0.0))
        if setting == "testbed":
            assert set(entry["known_unknown"]) == METHODS
    if setting == "testbed":
        assert "known: answered correctly" in md
    timing_rows = _table_rows(md, "Wall time per stage")
    assert len(timing_rows) == len(QUALITY_ROWS)
    grait_row = next(r for r in timing_rows if r.startswith("| grait |"))
    noweight_row = next(r for r in timing_rows if r.startswith("| grait-noweight"))
    assert "shared" not in grait_row and noweight_row.count("shared") == 3


def test_speed_smoke_writes_every_figure(tmp_path: Path) -> None:
    from bench.speed.cli import main

    assert (
        main(["--smoke", "--results-dir", str(tmp_path), "--scratch", str(tmp_path / "scratch")])
        == 0
    )
    out = tmp_path / "smoke-speed"
    md = (out / "results.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    for section in (
        "Per-sample gradient features",
        "Selection + weighting",
        "Knowledge query",
        "Service overhead",
        "Service: `GET /v1/jobs/{id}` under concurrent pollers",
        "Service: job reads during concurrent large uploads",
        "Each stage against the hardware's limit, and the planner checked on a second job",
        "Stage 2b in shards: two workers against one",
    ):
        assert f"## {section}" in md
    parts = summary["parts"]
    feat = parts["features"]["result"][0]
    assert feat["hook_vs_loop_rel_error"] < 1e-3
    assert feat["features_vs_floor"] > 0 and feat["naive_vs_floor"] > 0
    assert [r["candidates"] for r in parts["selection"]["result"]] == [1000, 4000]
    assert all(r["selected"] == r["budget"] for r in parts["selection"]["result"])
    assert parts["knowledge"]["result"]["q_per_s"]["batched"] > 0
    service = parts["service"]["result"]
    assert service["direct_seconds"] > 0 and service["api_seconds"] > 0
    pollers = parts["pollers"]["result"]
    assert [p["clients"] for p in pollers] == [10, 100]
    assert all(p["errors"] == 0 and p["requests_ok"] > 0 for p in pollers), pollers
    uploads = parts["uploads"]["result"]
    assert uploads["upload_status"] == [201] and uploads["read_failed_during"] == 0
    assert uploads["reads_alone"] > 0 and uploads["reads_during"] > 0
    limits = parts["limits"]["result"]
    assert limits["measured_peak_flops"] > 0 and limits["measured_bandwidth"] > 0
    # (a tiny random model knows nothing, so its training set, and FLOPs, may be empty)
    assert {r["stage"] for r in limits["calibration_job"]["ratios"]} >= {
        "knowledge_query",
        "evaluation",
    }
    assert all(0 < r["mfu"] for r in limits["calibration_job"]["ratios"])
    predicted = {s["stage"] for s in limits["validation_job"]["predicted"]["stages"]}
    assert predicted == set(limits["validation_job"]["measured"])  # every stage checked
    assert len(_table_rows(md, "Selection + weighting")) == 2
    sharding = parts["sharding"]["result"]
    assert sharding["shards"] >= 2 and sharding["ratio_wall"] > 0
    assert all(s["selection_equals_unsharded"] for s in sharding["same"].values())
    assert not list((tmp_path / "smoke-speed").glob("*.npy"))  # feature matrices stay in scratch

    # Remeasuring one part keeps the others and their dates.
    before = {k: v["measured_at"] for k, v in parts.items()}
    assert (
        main(
            [
                "--smoke",
                "--only",
                "pollers",
                "--results-dir",
                str(tmp_path),
                "--scratch",
                str(tmp_path / "scratch"),
            ]
        )
        == 0
    )
    again = json.loads((out / "summary.json").read_text())["parts"]
    assert set(again) == set(parts)
    assert {k: again[k]["measured_at"] for k in again if k != "pollers"} == {
        k: v for k, v in before.items() if k != "pollers"
    }
    assert "## Knowledge query" in (out / "results.md").read_text()


def test_tradeoff_smoke_writes_curves_areas_and_plots(tmp_path: Path) -> None:
    from bench.quality.cli import main

    argv = ["--setting", "tradeoff", "--smoke", "--seeds", "2", "--results-dir", str(tmp_path)]
    # One testbed per run (a long study spans sessions): the folder gathers both.
    assert main([*argv, "--profiles", "uniform", "--bootstrap", "50"]) == 0
    assert main([*argv, "--profiles", "topic", "--bootstrap", "50"]) == 0
    out = tmp_path / "smoke-tradeoff"
    md = (out / "results.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert [s["profile"] for s in summary["summaries"]] == ["topic", "uniform"]
    for profile in ("topic", "uniform"):
        assert (out / f"tradeoff_{profile}.png").stat().st_size > 1000
        assert f"## Testbed `{profile}`" in md
    for s in summary["summaries"]:
        for ev in ("id", "ood"):
            entry = s["eval"][ev]
            assert set(entry["area"]) == {"grait", "random-idk", "stratified-random"}
            for point, (lo, hi) in entry["area"].values():
                assert 0.0 <= lo <= point <= hi <= 1.0
            assert "grait - random-idk" in entry["area_diff"]
            curve = entry["curve"]["grait"]
            assert curve["budgets"] == [2, 4, "all"]
            # A random tiny model knows nothing, so over-refusal may be undefined (NaN) there.
            rates = curve["over_refusal"] + curve["unknown_refused"]
            assert all(math.isnan(x) or 0.0 <= x <= 1.0 for x in rates)
            assert not all(math.isnan(x) for x in curve["unknown_refused"])
            assert entry["curve"]["rtuning"]["budgets"] == ["all"]
    # Every (seed, method, budget) cell ran once: 2 seeds x (3 methods x 2 budgets + rtuning).
    for result in summary["results"]:
        assert 0.0 <= min(a["agreement"] for a in result["agreement"].values())
        assert set(result["agreement"]) == {"rtuning b=all", "grait b=4"}
        assert len(result["cells"]) == 2 * (3 * 2 + 1)
        for cell in result["cells"]:
            if cell["method"] != "rtuning":
                assert len(cell["picked"]) == cell["budget"]
    # A rerun resumes from the cached cells instead of training again.
    assert main([*argv, "--bootstrap", "20"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert [c["seconds"] for c in again["results"][0]["cells"]] == [
        c["seconds"] for c in summary["results"][0]["cells"]
    ]


def test_tradeoff_smoke_runs_craft_with_one_rehearsal_per_seed(tmp_path: Path) -> None:
    from bench.quality.cli import main

    argv = ["--setting", "tradeoff", "--smoke", "--seeds", "1", "--profiles", "topic"]
    argv += ["--methods", "craft,craft-nocert,random-idk", "--eval-sets", "id"]
    assert main([*argv, "--results-dir", str(tmp_path), "--bootstrap", "20"]) == 0
    summary = json.loads((tmp_path / "smoke-tradeoff" / "summary.json").read_text())
    entry = summary["summaries"][0]["eval"]["id"]
    assert {"craft - random-idk", "craft-nocert - random-idk"} <= set(entry["area_diff"])
    (result,) = summary["results"]
    craft_cells = [c for c in result["cells"] if c["method"].startswith("craft")]
    assert craft_cells and all(len(c["picked"]) <= c["budget"] for c in craft_cells)
    # The rehearsal ran once for the seed; every craft cell links it instead of training again.
    (profile_dir,) = (tmp_path / "work" / "smoke-tradeoff").glob("topic-*")
    seed_dir = profile_dir / "seed0"
    assert (seed_dir / "rehearsal" / "rehearsal" / "flow.jsonl").exists()
    for method in ("craft", "craft-nocert"):
        for cell_dir in (seed_dir / method).iterdir():
            manifest = json.loads((cell_dir / "manifest.json").read_text())
            assert "shared_from" in manifest["stages"]["rehearsal"]

    # The refusal-bias study probes that run's adapters again, without training.
    from bench.quality.bias import main as bias_main

    bias_argv = ["--smoke", "--study", "smoke-tradeoff", "--results-dir", str(tmp_path)]
    bias_argv += ["--cells", "rtuning:all,random-idk:4,craft:4", "--primary", "random-idk:4"]
    assert bias_main([*bias_argv, "--name", "smoke-bias", "--bootstrap", "20"]) == 0
    bias = json.loads((tmp_path / "smoke-bias" / "summary.json").read_text())
    assert bias["agreement"] == 1.0  # bias 0 is the study's own greedy-equivalent outcome
    arms = bias["auto"]["arms"]
    assert {"random-idk b=4 + bias", "random-idk budget auto", "rtuning budget auto"} <= set(arms)
    assert "random-idk b=4 + bias − random-idk budget auto" in bias["auto"]["differences"]
    assert set(bias["bias_areas"]) == {"rtuning b=all", "random-idk b=4", "craft b=4"}
    assert (seed_dir / "random-idk" / "b4" / "first_step.json").exists()
    assert "Primary" in (tmp_path / "smoke-bias" / "results.md").read_text()


def test_fit_smoke_reads_the_fit_check_at_every_checkpoint(tmp_path: Path) -> None:
    from bench.fit import main

    assert main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "smoke-fit" / "summary.json").read_text())
    (run,) = summary["runs"]
    assert [p["step"] for p in run["points"]] == [2, 4]
    assert run["n_refusal"] + run["n_answer"] == 12
    for point in run["points"]:
        for key in ("refusal_learned", "answers_kept"):
            value = point[key]
            assert value is None or 0.0 <= value <= 1.0
    md = (tmp_path / "smoke-fit" / "results.md").read_text()
    assert md.count("\n| 12 |") == 2
