"""Paired comparisons across two trade-off studies, on hand-built study folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.quality.across import CellRef, NotPaired, compare, main
from bench.quality.curves import separability

KNOWN = 10
UNKNOWN = 10
BASE = ["correct"] * KNOWN + ["wrong"] * UNKNOWN


def _outcomes(known_refused: int, unknown_refused: int) -> list[str]:
    k = ["refused"] * known_refused + ["correct"] * (KNOWN - known_refused)
    u = ["refused"] * unknown_refused + ["wrong"] * (UNKNOWN - unknown_refused)
    return k + u


def _study(
    root: Path,
    name: str,
    cells: dict[tuple[int, str, str], list[str]],
    *,
    base: list[str] = BASE,
    seeds: tuple[int, ...] = (10, 11),
) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    result = {
        "profile": "topic",
        "seeds": [
            {
                "seed": s,
                "eval_ids": [f"f{i}" for i in range(len(BASE))],
                "base": {"id": {"outcomes": base}},
            }
            for s in seeds
        ],
        "cells": [
            {
                "seed": s,
                "method": m,
                "budget": int(b) if b.isdigit() else b,
                "probe": {"id": {"outcomes": o}},
            }
            for (s, m, b), o in cells.items()
        ],
    }
    (folder / "summary.json").write_text(json.dumps({"summaries": [], "results": [result]}))


def test_cells_of_two_studies_are_compared_question_by_question(tmp_path: Path) -> None:
    _study(tmp_path, "short", {(s, "random-idk", "24"): _outcomes(3, 5) for s in (10, 11)})
    _study(
        tmp_path,
        "long",
        {(10, "random-idk", "24"): _outcomes(1, 6), (11, "random-idk", "24"): _outcomes(1, 8)},
        seeds=(10, 11, 12),  # a seed the other study lacks is left out, not an error
    )
    refs = [
        CellRef.parse("long=long:random-idk:24"),
        CellRef.parse("short=short:random-idk:24"),
    ]

    result = compare(
        refs, [("long", "short")], profile="topic", eval_set="id", results_dir=tmp_path, n_boot=200
    )

    assert result["seeds"] == [10, 11]
    stats = result["statistics"]
    assert stats["short"]["known refused"][0] == pytest.approx(0.3)
    assert stats["long"]["unknown refused"][0] == pytest.approx(0.7)
    assert stats["long"]["known answered"][0] == pytest.approx(0.9)
    d_long = (separability_of_counts(6, 1) + separability_of_counts(8, 1)) / 2
    d_short = separability_of_counts(5, 3)
    diff, (low, high) = result["differences"]["long - short"]["d′"]
    assert diff == pytest.approx(d_long - d_short)
    assert low <= diff <= high


def separability_of_counts(unknown_refused: int, known_refused: int) -> float:
    outcomes = np.array(_outcomes(known_refused, unknown_refused)) == "refused"
    return separability(outcomes, np.array(BASE) == "correct")


def test_studies_whose_untuned_model_answers_differently_are_not_compared(tmp_path: Path) -> None:
    _study(tmp_path, "a", {(10, "rtuning", "all"): _outcomes(5, 9)}, seeds=(10,))
    changed = ["wrong"] + BASE[1:]  # the other machine's knowing model misses one known fact
    _study(tmp_path, "b", {(10, "rtuning", "all"): _outcomes(5, 9)}, base=changed, seeds=(10,))
    refs = [CellRef.parse("a=a:rtuning:all"), CellRef.parse("b=b:rtuning:all")]

    with pytest.raises(NotPaired, match="differs on 1 of 20"):
        compare(refs, [("a", "b")], profile="topic", eval_set="id", results_dir=tmp_path)


def test_the_command_line_names_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _study(tmp_path, "a", {(10, "rtuning", "all"): _outcomes(5, 9)}, seeds=(10,))
    with pytest.raises(SystemExit):
        main(["a:rtuning:all", "--results-dir", str(tmp_path)])
    assert "label=study:method:budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["x=a:random-idk:8", "--results-dir", str(tmp_path)])
    assert "no cell random-idk:8 for seed 10" in capsys.readouterr().err

    out = tmp_path / "table.md"
    assert (
        main(
            [
                "x=a:rtuning:all",
                "--results-dir",
                str(tmp_path),
                "--out",
                str(out),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    assert "| x | `a` | rtuning b=all | 0.500" in out.read_text()
