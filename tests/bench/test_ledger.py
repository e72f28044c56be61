"""The ledger of trade-off comparisons, on hand-built study folders."""

from __future__ import annotations

import json
from pathlib import Path

from bench.quality.ledger import comparisons, main, render


def _study(
    root: Path,
    name: str,
    diffs: dict[str, tuple[float, tuple[float, float]]],
    *,
    hyper: dict,
    seeds: list[int],
    registered: bool,
) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    summary = {
        "summaries": [
            {"profile": "topic", "eval": {"id": {"area": {}, "area_diff": diffs}}},
        ],
        "results": [
            {
                "profile": "topic",
                "seeds": [{"seed": s} for s in seeds],
                "hyper": hyper,
                "header": ["- Measured 2026-12-01 07:21 on 2 CPU cores."],
            }
        ],
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    if registered:
        (folder / "PREREGISTERED.md").write_text("rules")


def test_every_difference_is_read_by_whether_its_interval_excludes_zero(tmp_path: Path) -> None:
    _study(
        tmp_path,
        "a-study",
        {
            "grait - random-idk": (0.05, (0.01, 0.09)),
            "craft - random-idk": (-0.07, (-0.12, -0.02)),
            "x - random-idk": (0.03, (-0.05, 0.13)),
        },
        hyper={"features": {"batch_size": 16}, "selection": {"strategy": "share"}},
        seeds=[10, 11, 12],
        registered=True,
    )
    # Another benchmark's summary (no list of trade-off summaries) is not a study.
    (tmp_path / "speed").mkdir()
    (tmp_path / "speed" / "summary.json").write_text(json.dumps({"parts": {}}))

    found = comparisons(tmp_path)

    assert [(c.difference, c.reading) for c in found] == [
        ("grait - random-idk", "above"),
        ("craft - random-idk", "below"),
        ("x - random-idk", "neither"),
    ]
    assert {c.settings for c in found} == {"selection.strategy=share"}
    assert all(c.registered and c.seeds == (10, 11, 12) for c in found)
    assert {c.measured for c in found} == {"2026-12-01"}
    text = render(found)
    assert "1 above, 1 below, 1 neither" in text
    assert (
        "| `a-study` | topic | id | craft - random-idk | -0.070 [-0.120, -0.020] | below |" in text
    )


def test_a_study_without_a_registration_or_variant_says_so(tmp_path: Path) -> None:
    _study(
        tmp_path,
        "pilot",
        {"grait - random-idk": (-0.01, (-0.1, 0.08))},
        hyper={"features": {"batch_size": 16}},
        seeds=[3, 5],
        registered=False,
    )
    (found,) = comparisons(tmp_path)
    assert (found.settings, found.registered) == ("defaults", False)
    assert "| 3, 5 | defaults | no |" in render([found])


def test_a_study_trained_longer_than_the_protocol_names_its_steps(tmp_path: Path) -> None:
    for name, steps in (("steps16", 16), ("steps32", 32)):
        _study(
            tmp_path,
            name,
            {"grait - random-idk": (0.01, (-0.1, 0.1))},
            hyper={"training": {"max_steps": steps}},
            seeds=[25],
            registered=True,
        )
    found = {c.study: c.settings for c in comparisons(tmp_path)}
    assert found == {"steps16": "defaults", "steps32": "training.max_steps=32"}


def test_the_command_writes_the_ledger_beside_the_studies(tmp_path: Path, capsys) -> None:
    _study(
        tmp_path,
        "s",
        {"grait - random-idk": (0.0, (-0.1, 0.1))},
        hyper={},
        seeds=[0, 1, 2, 3, 4],
        registered=True,
    )
    assert main(["--results-dir", str(tmp_path), "--write"]) == 0
    written = (tmp_path / "LEDGER.md").read_text()
    assert "| 0–4 |" in written
    assert written.strip() in capsys.readouterr().out
