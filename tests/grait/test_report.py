import copy
import json

import pytest

from grait.report import ReportError, plot_pw_pc, render_markdown, validate_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report() -> dict:
    return {
        "method": "grait",
        "base_model": "smollm2-135m-instruct",
        "evals": [
            {
                "name": "mmlu-val",
                "kind": "mcqa",
                "models": [
                    {
                        "name": "base",
                        "n": 200,
                        "correct": 0.4,
                        "wrong": 0.6,
                        "refused": 0.0,
                        "ths": 0.0,
                    },
                    {
                        "name": "grait",
                        "n": 200,
                        "correct": 0.375,
                        "wrong": 0.25,
                        "refused": 0.375,
                        "ths": 0.20833,
                        "ci": {"ths": [0.101, 0.312]},
                    },
                ],
            },
            {
                "name": "nq",
                "kind": "oeqa",
                "models": [
                    {
                        "name": "base",
                        "n": 50,
                        "correct": 0.9,
                        "wrong": 0.0,
                        "refused": 0.1,
                        "ths": None,
                    },
                    {
                        "name": "van",
                        "n": 50,
                        "correct": 0.5,
                        "wrong": 0.5,
                        "refused": 0.0,
                        "ths": None,
                    },
                ],
            },
        ],
        "timings": {"knowledge": 12.5, "training": 30.25},
        "notes": ["toy numbers for a test"],
    }


def test_write_report_creates_json_markdown_and_png(tmp_path):
    paths = write_report(tmp_path / "out", _report())
    assert set(paths) == {"json", "md", "png"}
    for path in paths.values():
        assert path.exists() and path.parent == tmp_path / "out"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "pw_pc.png",
        "report.json",
        "report.md",
    ]


def test_report_json_round_trips(tmp_path):
    report = _report()
    paths = write_report(tmp_path, report)
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == report


def test_report_markdown_holds_every_model_row(tmp_path):
    md = write_report(tmp_path, _report())["md"].read_text(encoding="utf-8")
    assert "grait" in md and "smollm2-135m-instruct" in md
    assert "| base | 200 | 0.400 | 0.600 | 0.000 | 0.000 |" in md
    assert "| grait | 200 | 0.375 | 0.250 | 0.375 | 0.208 (0.101–0.312) |" in md
    assert "| base | 50 | 0.900 | 0.000 | 0.100 | n/a |" in md
    assert "| van | 50 | 0.500 | 0.500 | 0.000 | n/a |" in md
    assert "| knowledge | 12.5 |" in md and "**42.8**" in md
    assert "- toy numbers for a test" in md


def test_markdown_leaves_out_absent_timings_and_notes():
    report = _report()
    del report["timings"], report["notes"]
    md = render_markdown(report)
    assert "wall time" not in md and "Notes" not in md


def test_report_png_is_a_real_image(tmp_path):
    png = write_report(tmp_path, _report())["png"].read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert len(png) > 1024


def test_plot_handles_base_that_is_never_wrong(tmp_path):
    evals = [_report()["evals"][1]]
    plot_pw_pc(tmp_path / "p.png", evals)
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    "path, key",
    [
        ((), "method"),
        ((), "evals"),
        (("evals", 0), "kind"),
        (("evals", 1, "models", 1), "wrong"),
    ],
)
def test_missing_required_key_is_named(tmp_path, path, key):
    report = copy.deepcopy(_report())
    target = report
    for step in path:
        target = target[step]
    del target[key]
    with pytest.raises(ValueError, match=f"missing required key '{key}'"):
        write_report(tmp_path, report)
    assert not (tmp_path / "report.json").exists()


def test_bad_values_are_rejected(tmp_path):
    report = _report()
    report["evals"][0]["kind"] = "essay"
    with pytest.raises(ValueError, match="kind"):
        write_report(tmp_path, report)
    report = _report()
    report["evals"][0]["models"][0]["correct"] = 1.5
    with pytest.raises(ValueError, match="correct"):
        write_report(tmp_path, report)


def test_rewriting_a_report_leaves_no_temporary_files(tmp_path):
    write_report(tmp_path, _report())
    write_report(tmp_path, _report())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pw_pc.png", "report.json", "report.md"]


def test_model_entry_carries_paired_bootstrap_intervals():
    from grait.evaluation import EvalRun, model_entry

    base = EvalRun(["x"] * 40, ["correct"] * 10 + ["wrong"] * 30)
    tuned = EvalRun(["x"] * 40, ["correct"] * 10 + ["refused"] * 25 + ["wrong"] * 5)
    entry = model_entry("tuned", tuned, base)
    assert entry["ths"] == pytest.approx(0.25 - 0.125 * (0.25 / 0.75))
    for key in ("correct", "wrong", "refused", "ths"):
        low, high = entry["ci"][key]
        assert low <= entry[key] <= high and high > low
    assert model_entry("base", base, base)["ci"]["ths"] == pytest.approx(
        [0.0, 0.0]
    )  # paired: base vs itself is 0


def test_model_entry_splits_refusals_by_what_the_base_got_right(tmp_path):
    from grait.evaluation import EvalRun, model_entry

    # The base answers 10 of 40; the tuned model refuses 2 of those and 24 of the other 30.
    base = EvalRun(["x"] * 40, ["correct"] * 10 + ["wrong"] * 30)
    tuned = EvalRun(
        ["x"] * 40, ["refused"] * 2 + ["correct"] * 8 + ["refused"] * 24 + ["wrong"] * 6
    )
    entry = model_entry("tuned", tuned, base)
    assert entry["over_refusal"] == pytest.approx(0.2)
    assert entry["unknown_refusal"] == pytest.approx(0.8)
    assert entry["separability"] > 1.0
    # Refusing at random, as often on both sides, separates nothing.
    blind = EvalRun(
        ["x"] * 40, ["refused"] * 5 + ["correct"] * 5 + ["refused"] * 15 + ["wrong"] * 15
    )
    assert model_entry("blind", blind, base)["separability"] == pytest.approx(0.0, abs=0.05)

    report = _report()
    report["evals"][0]["models"] = [model_entry("base", base, base), entry]
    text = render_markdown(report)
    assert "refused, base right | refused, base wrong | d′ |" in text
    assert "| 20.0% | 80.0% |" in text
    report["evals"][0]["models"][1]["over_refusal"] = 1.2
    with pytest.raises(ValueError, match="over_refusal"):
        write_report(tmp_path, report)


def test_a_refusal_bias_curve_is_validated_and_rendered(tmp_path):
    from grait.refusal_bias import FirstStep, bias_curve

    # Four known questions (the base answered them), four unknown; margins spread so each
    # over-refusal level needs its own bias.
    probes = [FirstStep(m, True, "top_other", True) for m in (-4.0, -3.0, -2.0, -1.0)]
    probes += [FirstStep(m, True, "not_top", True) for m in (-2.5, -1.5, -0.5, 0.5)]
    base = ["correct"] * 4 + ["wrong"] * 4
    curve = bias_curve(probes, base, current=0.0, levels=(0.0, 0.25, 1.0))
    current, none_over, quarter, everything = curve["points"]
    assert (curve["n_known"], curve["n_unknown"]) == (4, 4)
    assert current["level"] is None and current["unknown_refusal"] == 0.25
    assert none_over["over_refusal"] == 0.0 and quarter["over_refusal"] == 0.25
    assert everything["over_refusal"] == 1.0 and everything["unknown_refusal"] == 1.0
    assert none_over["unknown_refusal"] <= quarter["unknown_refusal"]
    report = _report()
    report["evals"][0]["refusal_bias"] = curve
    write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    assert "Refusal bias (`decoding.refusal_bias`, now 0)" in md and "≤ 25.0%" in md
    report["evals"][0]["refusal_bias"]["points"][1]["over_refusal"] = 1.5
    with pytest.raises(ReportError, match=r"refusal_bias'\]\['points'\]\[1\]\['over_refusal'\]"):
        validate_report(report)
