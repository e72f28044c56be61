"""The planner's arithmetic against the real thing: parameter counts of built models, token
counts of rendered prompts, and how predictions move with the knobs that matter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from grait.config import ALL_LINEAR, JobConfig
from grait.data import load_records
from grait.models import load_tokenizer
from grait.planning import (
    Architecture,
    TokenCounter,
    count_tokens,
    load_compute_class,
    plan_config,
    plan_job,
)
from grait.planning.architecture import LLAMA3_8B
from grait.planning.hardware import apply_calibration
from grait.prompts import encode_training_pair, question_message, render_prompt
from grait.training import lora_config


def _llama3_8b_shape(tmp_path: Path, tokenizer_from: Path) -> Path:
    """A model folder with Llama-3-8B's config.json and a tokenizer, no weights."""
    big = tmp_path / "llama3-8b"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(LLAMA3_8B))
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            (big / f.name).write_bytes(f.read_bytes())
    return big


def _config(model: Path | str, data: Path, limit: int = 32, **over) -> JobConfig:
    spec = {
        "method": "grait",
        "base_model": str(model),
        "train": {"path": str(data / "arc_easy" / "dev.jsonl"), "limit": limit},
        "evals": [{"path": str(data / "arc_easy" / "test.jsonl"), "limit": 8}],
        **over,
    }
    return JobConfig.model_validate(spec)


def test_parameter_counts_match_the_built_model_and_its_lora(tiny_model_dir: Path) -> None:
    arch = Architecture.from_dir(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert arch.params == sum(p.numel() for p in model.parameters())

    from grait.config import LoraConfigSpec

    spec = LoraConfigSpec(r=4, target_modules=list(ALL_LINEAR))
    peft = get_peft_model(model, lora_config(spec))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert arch.lora_params(4, ALL_LINEAR) == trainable


def test_llama3_8b_shape_counts_8b_parameters() -> None:
    arch = Architecture.from_config(LLAMA3_8B)
    assert arch.params == pytest.approx(8.03e9, rel=0.005)
    assert arch.lora_params(64, ALL_LINEAR) == pytest.approx(167.8e6, rel=0.005)
    # 2 FLOPs per block weight per token, plus the head where logits are taken.
    flops = arch.forward_flops(1000, 0, logit_tokens=0)
    assert flops == pytest.approx(2 * arch.block_linear_params * 1000)


def test_token_counts_equal_the_tokenizer_on_rendered_prompts(
    tiny_model_dir: Path, shared_data: Path
) -> None:
    records = load_records(shared_data / "arc_easy" / "dev.jsonl")[:12]
    counted = count_tokens(
        records, TokenCounter.for_model_dir(tiny_model_dir), refusal="I don't know."
    )
    tok = load_tokenizer(str(tiny_model_dir))
    for i, record in enumerate(records):
        prompt = render_prompt(
            tok, question_message(record, allow_refusal=True, refusal="I don't know.")
        )
        assert counted.rait_prompt[i] == len(tok(prompt, add_special_tokens=False)["input_ids"])
        pair = encode_training_pair(
            tok, record, record.answer_text, refusal="I don't know.", max_length=4096
        )
        assert counted.answer[i] == pair.n_target
    assert counted.exact


def test_predictions_move_with_data_size_quantisation_and_checkpointing(
    tiny_model_dir: Path, shared_data: Path, tmp_path: Path
) -> None:
    cpu = load_compute_class("cpu")
    small = plan_config(_config(tiny_model_dir, shared_data, 32), "cpu")
    large = plan_config(_config(tiny_model_dir, shared_data, 128), "cpu")
    assert large.stage("knowledge_query").tokens == pytest.approx(
        4 * small.stage("knowledge_query").tokens, rel=0.25
    )
    assert large.stage("knowledge_query").seconds > small.stage("knowledge_query").seconds

    big = _llama3_8b_shape(tmp_path, tiny_model_dir)
    h100 = load_compute_class("gpu-h100-80g")
    lora = {"r": 64, "target_modules": list(ALL_LINEAR)}
    no_probe = {"fit_check": {"enabled": False}}  # compare the training passes alone
    bf16 = plan_config(_config(big, shared_data, lora=lora, training=no_probe), "gpu-h100-80g")
    q4 = plan_config(
        _config(big, shared_data, lora=lora, training=no_probe, loading={"quantization": "4bit"}),
        "gpu-h100-80g",
    )
    q4_nockpt = plan_config(
        _config(
            big,
            shared_data,
            lora=lora,
            training=no_probe,
            loading={"quantization": "4bit", "gradient_checkpointing": False},
        ),
        "gpu-h100-80g",
    )
    assert bf16.weights_bytes == pytest.approx(2 * 8.03e9, rel=0.01)
    assert q4.weights_bytes < bf16.weights_bytes / 2.5  # embeddings stay 16 bit
    assert q4.stage("training").peak_memory_bytes < q4_nockpt.stage("training").peak_memory_bytes
    assert q4.stage("training").flops == pytest.approx(1.5 * q4_nockpt.stage("training").flops)
    assert bf16.memory_limit_bytes == pytest.approx(0.92 * h100.memory_bytes)
    assert cpu.device == "cpu"


def test_training_steps_follow_the_auto_epochs_rule(
    tiny_model_dir: Path, shared_data: Path
) -> None:
    from grait.pipeline import resolved_epochs

    config = _config(tiny_model_dir, shared_data, 40, method="rtuning")
    plan = plan_config(config, "cpu", known_share=0.5)
    epochs = resolved_epochs(config, 40)  # rtuning trains every question
    assert "40 examples" in plan.stage("training").detail
    assert f"({epochs:g} epochs)" in plan.stage("training").detail


def test_a_calibration_overrides_the_class_and_is_named_in_the_plan(
    tiny_model_dir: Path, shared_data: Path
) -> None:
    config = _config(tiny_model_dir, shared_data, training={"fit_check": {"enabled": False}})
    base = load_compute_class("cpu")
    eff = base.efficiency.training
    slow = apply_calibration(base, {"efficiency": {"training": eff / 10}, "source": "test rig"})
    arch = Architecture.from_dir(tiny_model_dir)
    counter = TokenCounter.for_model_dir(tiny_model_dir)
    records = load_records(shared_data / "arc_easy" / "dev.jsonl")[:32]
    tokens = count_tokens(records, counter, refusal=config.refusal)
    fast_plan = plan_job(config, arch, tokens, [], base)
    slow_plan = plan_job(config, arch, tokens, [], slow)
    training = fast_plan.stage("training")
    # Only the compute term scales with the efficiency; the fixed costs stay.
    extra = 9 * training.flops / (base.peak(fast_plan.dtype) * eff)
    assert slow_plan.stage("training").seconds - training.seconds == pytest.approx(extra)
    assert slow_plan.calibration == "test rig" and fast_plan.calibration == base.calibration


def test_cli_plan_exits_3_when_the_job_does_not_fit(
    tmp_path: Path, shared_data: Path, tiny_model_dir: Path
) -> None:
    big = _llama3_8b_shape(tmp_path, tiny_model_dir)
    train = str(shared_data / "arc_easy" / "dev.jsonl")
    args = [sys.executable, "-m", "grait.cli", "plan", "--train", train, "--model", str(big)]
    too_big = subprocess.run(
        args + ["--compute-class", "gpu-l4-24g"], check=False, capture_output=True, text=True
    )
    fits = subprocess.run(
        args + ["--compute-class", "gpu-h100-80g", "--set", "loading.quantization=4bit", "--json"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert too_big.returncode == 3, too_big.stderr
    assert "Does not fit" in too_big.stdout
    assert fits.returncode == 0, fits.stderr
    assert json.loads(fits.stdout)["fits"] is True
