"""scripts/gpu_8b.py, checked on CPU with a tiny model: it must work before the GPU time is spent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from grait.methods import method_spec

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_8b.py"
GRAIT_STAGES = method_spec("grait").stages  # what the script runs: every stage


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_8b", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_8b_script_measures_every_stage_of_each_mode(shared_data, tmp_path):
    script = _load_script()
    out = tmp_path / "out"
    argv = ["--data", str(shared_data), "--out", str(out), "--work", str(tmp_path / "work")]
    argv += ["--tiny", "--allow-cpu", "--n-train", "16", "--n-eval", "8"]
    assert script.main(argv) == 0  # ~15-25 s on 2 shared cores

    summary = json.loads((out / "gpu_8b.json").read_text())
    assert "RANDOM weights" in summary["weights"]
    assert [run["mode"] for run in summary["runs"]] == ["4bit", "bf16"]
    for run in summary["runs"]:
        assert run["quantization"] == "none"  # forced off on CPU
        assert list(run["stages"]) == list(GRAIT_STAGES)
        for stage, entry in run["stages"].items():
            assert entry["seconds"] > 0, stage
        assert run["stages"]["training"]["forward_tokens"] > 0
        assert all(run["checks"].values()), run["checks"]
        # The plan, made before the run on this machine's class, sits beside each stage.
        assert run["plan"]["class"] == "cpu"
        assert set(run["plan"]["stages"]) == set(run["stages"])
    table = (out / "gpu_8b.md").read_text()
    assert "RANDOM weights" in table and "| gradient_features |" in table
    assert "| MFU | bandwidth share |" in table
    # The model and the run directories stay out of what is copied back.
    assert sorted(p.name for p in out.iterdir()) == ["gpu_8b.json", "gpu_8b.md"]
