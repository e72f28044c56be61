"""The `grait` command as a user runs it: a real subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from grait.testing import tiny_hyperparameters


def grait(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grait.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        check=False,
    )


def test_data_validate_counts_a_good_file(shared_data):
    out = grait("data", "validate", str(shared_data / "arc_easy" / "dev.jsonl"))
    assert out.returncode == 0, out.stderr
    assert "valid: 570 records (mcqa 570)" in out.stdout


def test_data_validate_names_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "question": "Q?", "answers": ["x"]}\n{"id": "2", "question": ""}\n')
    out = grait("data", "validate", str(bad))
    assert out.returncode == 1
    assert f"{bad}, line 2: field 'question': empty" in out.stderr


def test_config_defaults_lists_every_group():
    out = grait("config", "defaults")
    assert out.returncode == 0
    defaults = yaml.safe_load(out.stdout)
    assert defaults["knowledge"]["tau"] == 0.5
    assert defaults["weighting"] == {
        "temperature_scale": "relative",
        "relative_temperature": 1.0,
        "temperature": 0.05,
        "w_min": 0.1,
        "w_max": 5.0,
    }
    assert defaults["selection"]["strategy"] == "coverage"
    assert defaults["knowledge"]["auto"]["max_over_refusal"] == 0.05
    assert defaults["features"]["dim"] == 8192


def test_run_from_a_yaml_spec_prints_adapter_and_report(tiny_model_dir, shared_data, tmp_path):
    spec = {
        "method": "grait",
        "base_model": str(tiny_model_dir),
        "train": {"path": str(shared_data / "arc_easy" / "dev.jsonl"), "limit": 16},
        "evals": [
            {"path": str(shared_data / "arc_easy" / "test.jsonl"), "limit": 8, "name": "arc"}
        ],
        **tiny_hyperparameters(),
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    out = grait("run", "job.yaml", "--run-dir", "out", "--set", "knowledge.tau=0.3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "adapter: out/training/adapter" in out.stdout
    assert "report md: out/evaluation/report.md" in out.stdout
    assert "arc: P_c=" in out.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["knowledge"]["tau"] == 0.3
    assert "gradient_features" in out.stderr  # progress bars name each stage


def test_run_rejects_an_unknown_knob(tmp_path, shared_data):
    out = grait(
        "run", "--train", str(shared_data / "arc_easy" / "dev.jsonl"), "--set", "training.epoch=2"
    )
    assert out.returncode == 2
    assert "training.epoch" in out.stderr and "Extra inputs are not permitted" in out.stderr
