import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from grait.data import mcqa
from grait.features import (
    AdamState,
    DenseProjection,
    FeatureStore,
    LoraGradientCapture,
    Preconditioner,
    SparseProjection,
    compute_features,
    l2_normalise,
    per_sample_lora_gradients,
)
from grait.models import load_tokenizer
from grait.prompts import collate, encode_training_pair, per_sample_answer_loss


@pytest.fixture()
def lora_model(tiny_model_dir):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    # LoRA starts with B = 0, which zeroes every lora_A gradient; randomise B like a warm-up would.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.eval()
    return model


@pytest.fixture()
def items(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    records = [
        mcqa("q1", "What is 2 + 2?", ["3", "4"], "B"),
        mcqa(
            "q2",
            "Which planet is known as the red planet, the fourth from the sun?",
            ["Mars", "Venus", "Earth"],
            "A",
        ),
        mcqa("q3", "Capital of France?", ["Paris", "Rome", "Berlin", "Madrid"], "A"),
    ]
    targets = ["B. 4", "I don't know.", "A. Paris, the largest city of France"]
    return tok, [
        encode_training_pair(tok, r, t, refusal="I don't know.", max_length=256)
        for r, t in zip(records, targets)
    ]


def _one_at_a_time(model, capture, item, pad_id):
    batch = collate([item], pad_id)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = per_sample_answer_loss(logits, batch.labels).sum()
    params = [m.weight for _, m in capture.modules]
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.flatten() for g in grads])


def test_batched_per_sample_gradients_equal_one_at_a_time(lora_model, items):
    tok, encoded = items
    capture = LoraGradientCapture(lora_model)
    batched = per_sample_lora_gradients(lora_model, capture, encoded, tok.pad_token_id)
    assert batched.shape == (3, capture.n_params)
    for i, item in enumerate(encoded):
        single = _one_at_a_time(lora_model, capture, item, tok.pad_token_id)
        capture.per_sample_gradients()  # drop what the single pass captured
        rel = (batched[i] - single).norm() / single.norm()
        assert rel < 1e-4, f"sample {i}: relative error {rel:.2e}"
        assert single.norm() > 0
    capture.close()


def test_capture_ignores_frozen_model_without_lora(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="no trainable LoRA"):
        LoraGradientCapture(base)


def test_adam_preconditioner_matches_the_update_formula():
    state = AdamState(
        torch.tensor([0.1, -0.2]),
        torch.tensor([0.01, 0.04]),
        step=3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
    )
    g = torch.tensor([[0.5, 0.5]])
    got = Preconditioner("adam", state, torch.device("cpu"), 1e-8)(g)
    m = (0.9 * state.exp_avg + 0.1 * g) / (1 - 0.9**4)
    v = (0.999 * state.exp_avg_sq + 0.001 * g * g) / (1 - 0.999**4)
    assert torch.allclose(got, m / (v.sqrt() + 1e-8))
    rms = Preconditioner("rms", state, torch.device("cpu"), 1e-8)(g)
    assert torch.allclose(rms, g / (v.sqrt() + 1e-8))
    assert torch.equal(Preconditioner("none", None, torch.device("cpu"), 1e-8)(g), g)


def test_sparse_projection_keeps_cosines_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(1, 5000, generator=gen)
    strength = torch.linspace(0.0, 2.0, 40)[:, None]  # pairwise cosines spread over [0, 0.8]
    x = strength * shared + torch.randn(40, 5000, generator=gen)
    proj = SparseProjection(5000, 1024, blocks=4, seed=3, device=torch.device("cpu"))
    before = l2_normalise(x) @ l2_normalise(x).T
    after = l2_normalise(proj(x)) @ l2_normalise(proj(x)).T
    iu = torch.triu_indices(40, 40, 1)
    r = np.corrcoef(before[iu[0], iu[1]].numpy(), after[iu[0], iu[1]].numpy())[0, 1]
    assert r > 0.9
    again = SparseProjection(5000, 1024, blocks=4, seed=3, device=torch.device("cpu"))
    assert torch.equal(proj(x), again(x))
    with pytest.raises(ValueError, match="multiple"):
        SparseProjection(10, 100, blocks=3, seed=0, device=torch.device("cpu"))


def test_compute_features_writes_unit_float16_rows(lora_model, items, tmp_path):
    tok, encoded = items
    capture = LoraGradientCapture(lora_model)
    store = FeatureStore(tmp_path)
    raw = store.create("raw", 3, 32, row_ids=[0, 1, 2])
    pre = store.create("pre", 3, 32, row_ids=[0, 1, 2])
    state = AdamState(
        torch.zeros(capture.n_params), torch.full((capture.n_params,), 1e-4), 2, 0.9, 0.999, 1e-8
    )
    stats = compute_features(
        lora_model,
        capture,
        encoded,
        pad_id=tok.pad_token_id,
        batch_size=2,
        projection=DenseProjection(capture.n_params, 32, seed=0, device=torch.device("cpu")),
        preconditioner=Preconditioner("adam", state, torch.device("cpu"), 1e-8),
        out_raw=raw,
        out_pre=pre,
    )
    raw.flush()
    pre.flush()
    back = store.open("raw")
    assert back.dtype == np.float16 and back.shape == (3, 32)
    assert np.allclose(np.linalg.norm(back.astype(np.float32), axis=1), 1.0, atol=1e-2)
    assert stats["zero_gradient_rows"] == 0
    assert store.row_ids("raw") == [0, 1, 2]
    # The batched rows must land on their own sample, whatever order batches ran in.
    single = _one_at_a_time(lora_model, capture, encoded[1], tok.pad_token_id)
    capture.per_sample_gradients()
    proj = DenseProjection(capture.n_params, 32, seed=0, device=torch.device("cpu"))
    expected = l2_normalise(proj(single[None]))[0].numpy()
    assert np.allclose(back[1].astype(np.float32), expected, atol=2e-3)
    capture.close()


def test_attached_lora_leaves_the_shared_base_model_as_it_was(tiny_model_dir, tmp_path):
    from pathlib import Path

    from grait.config import LoraConfigSpec
    from grait.models import load_base_model, pick_runtime
    from grait.prompts import encode
    from grait.training import TrainSettings, WeightedExample, attached_lora, train_weighted

    base, tok = load_base_model(str(tiny_model_dir), pick_runtime("cpu"), reuse=False)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    examples = [WeightedExample(encode(tok, "Q: hi", "I don't know.", max_length=64), 1.0)] * 4
    with attached_lora(base, spec=LoraConfigSpec(r=2)) as model:
        train_weighted(
            model,
            tok,
            examples,
            TrainSettings(epochs=1, learning_rate=1e-2, batch_size=2),
            work_dir=Path(tmp_path),
        )
    after = base.state_dict()
    assert after.keys() == before.keys()  # no lora_A / lora_B modules left behind
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert base.config.use_cache and not base.training
    assert not any(p.requires_grad for p in base.parameters())
