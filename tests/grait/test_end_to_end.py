"""The whole method on real data with the packaged SmolLM2-135M-Instruct (a few minutes on CPU)."""

import json

import pytest
import torch
from peft import PeftModel

from grait.config import JobConfig
from grait.models import load_base_model, pick_runtime
from grait.pipeline import run_pipeline


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~1 min alone; generous for a loaded 2-core machine
def test_grait_on_forty_arc_easy_questions(shared_data, tmp_path):
    cfg = JobConfig.model_validate(
        {
            "method": "grait",
            "train": {"path": str(shared_data / "arc_easy" / "test.jsonl"), "limit": 40},
            "evals": [
                {
                    "path": str(shared_data / "arc_easy" / "dev.jsonl"),
                    "limit": 12,
                    "name": "arc_easy-dev",
                },
                {"path": str(shared_data / "mmlu" / "val"), "limit": 8, "name": "mmlu-val"},
            ],
            "knowledge": {"scorer": "cloze"},
            "training": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3},
            "evaluation": {"max_new_tokens": 8, "eval_base_refuse_prompt": False},
        }
    )
    result = run_pipeline(cfg, tmp_path / "run")
    report = json.loads(result.artifacts["report_json"].read_text())
    assert report["base_model"] == "smollm2-135m-instruct"
    for ev in report["evals"]:
        base, tuned = ev["models"][0], ev["models"][-1]
        assert ev["kind"] == "mcqa" and tuned["name"] == "grait"
        for m in (base, tuned):
            assert m["correct"] + m["wrong"] + m["refused"] == pytest.approx(1.0)
        assert base["n"] == tuned["n"] == {"arc_easy-dev": 12, "mmlu-val": 8}[ev["name"]]
        if base["wrong"] > 0:
            assert base["ths"] == pytest.approx(0.0)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    knowledge = manifest["stages"]["knowledge_query"]["metrics"]
    assert knowledge["n_ik"] + knowledge["n_idk"] == 40
    assert (
        manifest["stages"]["gradient_features"]["metrics"]["n_params"] == 460_800
    )  # q,v LoRA r=8 on SmolLM2
    assert manifest["stages"]["gradient_features"]["metrics"]["zero_gradient_rows"] == 0
    base, _ = load_base_model("smollm2-135m-instruct", pick_runtime("cpu"))
    tuned = PeftModel.from_pretrained(base, str(result.adapter_dir))
    try:
        lora = [p for n, p in tuned.named_parameters() if "lora_B" in n]
        assert lora and any(torch.count_nonzero(p) > 0 for p in lora)  # training moved B off zero
    finally:
        tuned.unload()
