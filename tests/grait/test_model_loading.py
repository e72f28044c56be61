"""`loading`: attention kernel, quantisation and gradient checkpointing of the base model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model

from grait.config import JobConfig, LoadingConfig, LoraConfigSpec
from grait.features import LoraGradientCapture, per_sample_lora_gradients
from grait.models import Runtime, count_parameters, load_base_model, loading_of, pick_runtime
from grait.pipeline import load_features, run_pipeline
from grait.prompts import collate, encode, per_sample_answer_loss
from grait.testing import tiny_hyperparameters
from grait.training import (
    TrainSettings,
    WeightedExample,
    activation_checkpointing,
    attached_lora,
    train_weighted,
)

CPU = pick_runtime("cpu", "float32")
CHECKPOINTING = LoadingConfig(gradient_checkpointing=True)


def _examples(tok) -> list[WeightedExample]:
    pairs = [
        ("Question: What is the capital of France?", "Paris"),
        ("Question: How many legs has a spider? Answer with a number.", "I don't know."),
        ("Question: a long prompt about rivers, seas and the mountains between them?", "B"),
        ("Question: short?", "I don't know."),
    ]
    return [
        WeightedExample(encode(tok, q, a, max_length=64), w)
        for (q, a), w in zip(pairs, [1, 2, 0.5, 1])
    ]


def _checkpointed_layers(model: torch.nn.Module) -> int:
    return sum(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules())


def _count_layer_runs(base: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    """Count runs of layer 0's first op: a checkpointed layer runs again in the backward pass.

    (The layer's own hooks stay outside the checkpoint; those of the modules inside it do not.)
    """
    norm = base.model.layers[0].input_layernorm
    return norm.register_forward_pre_hook(lambda *_: calls.append(1))


def _lora_grads(model: torch.nn.Module, tok, examples) -> dict[str, torch.Tensor]:
    batch = collate([e.encoded for e in examples], tok.pad_token_id)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    per_sample_answer_loss(logits, batch.labels).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


# ---- the spec ---------------------------------------------------------------------------------


def test_loading_settings_survive_a_yaml_round_trip(tmp_path):
    loading = {
        "quantization": "4bit",
        "quant_type": "fp4",
        "double_quant": False,
        "gradient_checkpointing": "auto",
        "attention": "eager",
    }
    spec = {"method": "grait", "train": {"path": "train.jsonl"}, "loading": loading}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    config = JobConfig.from_yaml(tmp_path / "job.yaml")
    assert config.loading.model_dump() == loading
    again = JobConfig.model_validate(config.model_dump(mode="json"))
    assert again.loading == config.loading
    assert again.loading.checkpointing  # auto: on because the base is quantised
    assert not JobConfig.model_validate({"train": {"path": "x"}}).loading.checkpointing


# ---- attention --------------------------------------------------------------------------------


def test_sdpa_and_eager_attention_give_the_same_logits(tiny_model_dir):
    sdpa, tok = load_base_model(
        str(tiny_model_dir), CPU, loading=LoadingConfig(attention="auto"), reuse=False
    )
    eager, _ = load_base_model(
        str(tiny_model_dir), CPU, loading=LoadingConfig(attention="eager"), reuse=False
    )
    assert sdpa.config._attn_implementation == "sdpa"
    assert eager.config._attn_implementation == "eager"
    # Rows of different lengths, so the padding mask takes part too.
    batch = collate([e.encoded for e in _examples(tok)], tok.pad_token_id)
    with torch.no_grad():
        a = sdpa(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        b = eager(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    assert torch.allclose(a[real], b[real], atol=1e-4, rtol=1e-4)


def test_the_cache_keeps_models_loaded_differently_apart(tiny_model_dir):
    plain, _ = load_base_model(str(tiny_model_dir), CPU)
    again, _ = load_base_model(str(tiny_model_dir), CPU, loading=LoadingConfig())
    eager, _ = load_base_model(str(tiny_model_dir), CPU, loading=LoadingConfig(attention="eager"))
    assert again is plain
    assert eager is not plain
    assert loading_of(eager).attention == "eager"
    load_base_model(str(tiny_model_dir), CPU, loading=CHECKPOINTING)  # leave no eager model cached


# ---- quantisation refused where it cannot run --------------------------------------------------


def test_quantisation_on_cpu_is_refused_before_anything_is_loaded():
    with pytest.raises(ValueError, match=r"loading\.quantization: 4bit needs a CUDA GPU.*cpu"):
        load_base_model("/no/such/model", CPU, loading=LoadingConfig(quantization="4bit"))
    with pytest.raises(ValueError, match=r"loading\.quantization: 8bit"):
        load_base_model("/no/such/model", CPU, loading=LoadingConfig(quantization="8bit"))


def test_quantisation_without_bitsandbytes_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    cuda = Runtime(torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match=r"4bit needs the bitsandbytes package.*pip install"):
        load_base_model("/no/such/model", cuda, loading=LoadingConfig(quantization="4bit"))


def test_flash_attention_on_cpu_is_refused():
    with pytest.raises(ValueError, match="flash_attention_2 needs a CUDA GPU"):
        load_base_model("/no/such/model", CPU, loading=LoadingConfig(attention="flash_attention_2"))


# ---- gradient checkpointing -------------------------------------------------------------------


def test_checkpointing_gives_the_same_lora_gradients_and_is_off_afterwards(tiny_model_dir):
    base, tok = load_base_model(str(tiny_model_dir), CPU, loading=CHECKPOINTING, reuse=False)
    examples = _examples(tok)
    torch.manual_seed(0)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    # B = 0 at init would make every lora_A gradient zero: give B values so both factors count.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    plain = _lora_grads(model, tok, examples)
    calls = []
    handle = _count_layer_runs(base, calls)
    with activation_checkpointing(model, enabled=True):
        assert _checkpointed_layers(base) > 0
        checkpointed = _lora_grads(model, tok, examples)
    handle.remove()
    assert len(calls) == 2  # the layer ran again in the backward pass: checkpointing was on
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-4), name
    assert _checkpointed_layers(base) == 0
    assert not base.get_input_embeddings()._forward_hooks  # the input-grad hook is gone
    assert base.config.use_cache


def test_per_sample_features_are_the_same_with_checkpointing_on(tiny_model_dir):
    """Recomputation runs the LoRA layers' forward hooks twice; the features must not change.

    The pipeline's features stage runs in eval mode with checkpointing off anyway (it is on
    only inside `train_weighted`); this pins that the capture would survive it regardless.
    """
    base, tok = load_base_model(str(tiny_model_dir), CPU, loading=CHECKPOINTING, reuse=False)
    examples = _examples(tok)
    with attached_lora(base, spec=LoraConfigSpec(r=4, dropout=0.0)) as model:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        model.train()  # checkpointing applies only in training mode
        capture = LoraGradientCapture(model)
        items = [e.encoded for e in examples]
        plain = per_sample_lora_gradients(model, capture, items, tok.pad_token_id)
        calls = []
        handle = _count_layer_runs(base, calls)
        with activation_checkpointing(model, enabled=True):
            checkpointed = per_sample_lora_gradients(model, capture, items, tok.pad_token_id)
        handle.remove()
        capture.close()
    assert len(calls) == 2  # recomputed, so the capture's hooks fired twice
    assert plain.abs().sum() > 0
    assert torch.allclose(plain, checkpointed, atol=1e-6, rtol=1e-4)


def _one_training_run(model_dir: Path, loading: LoadingConfig, work: Path):
    base, tok = load_base_model(str(model_dir), CPU, loading=loading, reuse=False)
    calls = []
    handle = _count_layer_runs(base, calls)
    torch.manual_seed(0)
    settings = TrainSettings(epochs=1, learning_rate=1e-2, batch_size=2, max_steps=2, seed=0)
    with attached_lora(base, spec=LoraConfigSpec(r=4, dropout=0.0)) as model:
        train_weighted(model, tok, _examples(tok), settings, work_dir=work)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    handle.remove()
    return base, weights, len(calls)


def test_a_training_step_with_checkpointing_matches_one_without(tiny_model_dir, tmp_path):
    _, plain, plain_calls = _one_training_run(tiny_model_dir, LoadingConfig(), tmp_path / "a")
    base, checkpointed, calls = _one_training_run(tiny_model_dir, CHECKPOINTING, tmp_path / "b")
    assert calls == 2 * plain_calls  # every step ran layer 0 twice: checkpointing was on
    assert plain.keys() == checkpointed.keys()
    assert any(w.abs().sum() > 0 for n, w in plain.items() if "lora_B" in n)  # it trained
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-5, rtol=1e-4), name
    assert _checkpointed_layers(base) == 0  # inference passes after training run without it
    assert not base.get_input_embeddings()._forward_hooks


def test_a_pipeline_with_checkpointing_gives_the_features_it_gives_without(
    tiny_model_dir, shared_data, tmp_path
):
    """Warm-up trains checkpointed, features run without it: the same features either way."""
    hp = tiny_hyperparameters()
    hp["knowledge"]["tau"] = 0.3  # a random model's cloze probabilities sit near 1/4
    spec = {
        "method": "grait",
        "base_model": str(tiny_model_dir),
        "train": {"path": str(shared_data / "arc_easy" / "dev.jsonl"), "limit": 12},
        **hp,
        "lora": {**hp["lora"], "target_modules": ["q_proj", "v_proj", "down_proj"]},
    }
    features = {}
    for checkpointing in (False, True):
        config = JobConfig.model_validate(
            {**spec, "loading": {"gradient_checkpointing": checkpointing}}
        )
        run_dir = tmp_path / f"checkpointing-{checkpointing}"
        run_pipeline(config, run_dir, until="gradient_features")
        features[checkpointing] = load_features(run_dir)
        base, _ = load_base_model(str(tiny_model_dir), CPU, loading=config.loading)
        assert loading_of(base).checkpointing is checkpointing
        assert _checkpointed_layers(base) == 0
        assert not base.get_input_embeddings()._forward_hooks
    for name in ("idk_pre", "idk_raw", "van_raw"):
        a = np.asarray(getattr(features[False], name), dtype=np.float32)
        b = np.asarray(getattr(features[True], name), dtype=np.float32)
        assert a.shape == b.shape
        assert np.allclose(a, b, atol=2e-3), name
    assert len(features[True].idk_raw) == 12  # (a random model may know none: van can be empty)


# ---- 4-bit on CPU (bitsandbytes >= 0.45 has a CPU path) ----------------------------------------


def _tiny_model_64(path: Path, tok) -> Path:
    """Like the shared tiny model but 64 wide: bitsandbytes' CPU kernels (AVX512-bf16, used in
    no-grad passes) need every quantised layer's input to fill one 64-value block."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed"
)
def test_a_4bit_base_loads_and_trains_a_lora(tiny_model_dir, tmp_path, monkeypatch):
    """The real QLoRA path on CPU: the CUDA-only rule is lifted for the test, nothing else.

    Training comes before any no-grad pass on purpose: on a CPU with AVX512-bf16,
    bitsandbytes 0.50 repacks 4-bit weights for its CPU kernel on the first no-grad forward,
    and backward through them is silently lost after that (a CPU-only limitation, one more
    reason quantisation is refused on CPU).
    """
    monkeypatch.setattr("grait.models.QUANTISATION_DEVICES", ("cuda", "cpu"))
    _, tok = load_base_model(str(tiny_model_dir), CPU)
    model_dir = str(_tiny_model_64(tmp_path / "tiny64", tok))
    loading = LoadingConfig(quantization="4bit")
    base, tok = load_base_model(model_dir, CPU, loading=loading, reuse=False)
    full, _ = load_base_model(model_dir, CPU, reuse=False)
    q_proj = base.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert base.is_loaded_in_4bit and loading_of(base).checkpointing  # auto: on for 4-bit
    assert count_parameters(base) == count_parameters(full)
    calls = []
    handle = _count_layer_runs(base, calls)
    settings = TrainSettings(epochs=1, learning_rate=1e-2, batch_size=2, max_steps=2, seed=0)
    with attached_lora(base, spec=LoraConfigSpec(r=4, dropout=0.0)) as model:
        train_weighted(model, tok, _examples(tok), settings, work_dir=tmp_path / "hf")
        lora = {n: p for n, p in model.named_parameters() if "lora_B" in n}
        assert lora and all(p.abs().sum() > 0 for p in lora.values()), "a LoRA factor never moved"
        model.save_pretrained(tmp_path / "adapter")
    handle.remove()
    assert len(calls) == 2 * 2  # two steps, each layer run twice: checkpointed
    assert _checkpointed_layers(base) == 0
    assert not any(p.requires_grad for p in base.parameters())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    batch = collate([e.encoded for e in _examples(tok)], tok.pad_token_id)
    with torch.no_grad():
        logits = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        reference = full(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    assert torch.isfinite(logits).all()
    # 4-bit rounding moves the logits a little, never to something unrelated.
    assert (
        torch.corrcoef(torch.stack([logits[real].flatten(), reference[real].flatten()]))[0, 1] > 0.9
    )
