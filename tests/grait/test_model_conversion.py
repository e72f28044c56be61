"""The packaged model's one-time conversion is safe when two processes start it at once
(two workers on a fresh machine): both succeed, one copy lands whole, nothing is left over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grait.config import DEFAULT_BASE_MODEL

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]


def test_two_concurrent_first_conversions_both_succeed(tmp_path: Path) -> None:
    env = {**os.environ, "GRAIT_MODEL_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    code = f"from grait.models import prepare_model\nprint(prepare_model({DEFAULT_BASE_MODEL!r}))\n"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=540) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    target = tmp_path / DEFAULT_BASE_MODEL
    assert {out.strip() for out, _ in outs} == {str(target)}
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEFAULT_BASE_MODEL]  # no .tmp left
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "llama"
    weights = list(target.glob("*.safetensors"))
    assert weights and all(w.stat().st_size > 1_000_000 for w in weights)
    assert (target / "tokenizer_config.json").exists()
