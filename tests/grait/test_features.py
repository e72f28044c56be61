import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from grait.data import mcqa
from grait.features import (
    AdamState,
    DenseProjection,
    FeatureStore,
    LoraGradientCapture,
    Preconditioner,
    ProjectionSums,
    SparseProjection,
    compute_features,
    l2_normalise,
    make_projection,
    per_sample_lora_gradients,
    project_captured_gradients,
    projected_lora_gradients,
)
from grait.models import load_tokenizer
from grait.prompts import answer_logits, collate, encode_training_pair, per_sample_answer_loss


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


def _project_whole(projection, x):
    """The projection applied to the whole [B, P] gradient at once, as before streaming."""
    if isinstance(projection, DenseProjection):
        return x @ projection.matrix
    out = torch.zeros(x.shape[0], projection.dim)
    for idx, sign in zip(projection.index, projection.sign):
        out.index_add_(1, idx, x * sign)
    return out * projection.scale


def _random_adam_state(n_params):
    gen = torch.Generator().manual_seed(1)
    # A non-zero first moment, so `adam` and `rms` give different features.
    exp_avg = torch.randn(n_params, generator=gen) * 1e-3
    exp_avg_sq = torch.rand(n_params, generator=gen) * 1e-5
    return AdamState(exp_avg, exp_avg_sq, 5, 0.9, 0.999, 1e-8)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("projection_kind", ["sparse", "dense"])
@pytest.mark.parametrize("pre_kind", ["none", "rms", "adam"])
def test_module_by_module_projection_equals_projecting_the_whole_gradient(
    lora_model, items, projection_kind, pre_kind
):
    tok, encoded = items
    cpu = torch.device("cpu")
    capture = LoraGradientCapture(lora_model)
    projection = make_projection(
        projection_kind, capture.n_params, 32, blocks=4, seed=0, device=cpu
    )
    state = None if pre_kind == "none" else _random_adam_state(capture.n_params)
    pre = Preconditioner(pre_kind, state, cpu, 1e-8)
    whole = per_sample_lora_gradients(lora_model, capture, encoded, tok.pad_token_id)
    streamed = projected_lora_gradients(
        lora_model, capture, encoded, tok.pad_token_id, projection=projection, preconditioner=pre
    )
    capture.close()
    assert _rel(streamed.raw, _project_whole(projection, whole)) < 1e-5
    assert _rel(streamed.pre, _project_whole(projection, pre(whole))) < 1e-5
    assert _rel(streamed.sq_norm.sqrt(), whole.norm(dim=1)) < 1e-5


def test_module_gradients_tile_the_flattened_gradient(lora_model, items):
    tok, encoded = items
    capture = LoraGradientCapture(lora_model)
    whole = per_sample_lora_gradients(lora_model, capture, encoded, tok.pad_token_id)
    batch = collate(encoded, tok.pad_token_id)
    logits = lora_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    per_sample_answer_loss(logits, batch.labels).sum().backward()
    lora_model.zero_grad(set_to_none=True)
    blocks = list(capture.module_gradients())
    capture.close()
    offsets = [offset for offset, _ in blocks]
    widths = [block.shape[1] for _, block in blocks]
    assert offsets == [sum(widths[:k]) for k in range(len(widths))]
    assert widths == [m.weight.numel() for _, m in capture.modules]
    assert _rel(torch.cat([block for _, block in blocks], dim=1), whole) < 1e-5


@pytest.mark.parametrize("projection_kind", ["sparse", "dense"])
def test_compute_features_equal_normalised_projections_of_the_whole_gradient(
    lora_model, items, projection_kind
):
    tok, encoded = items
    cpu = torch.device("cpu")
    capture = LoraGradientCapture(lora_model)
    projection = make_projection(
        projection_kind, capture.n_params, 32, blocks=4, seed=0, device=cpu
    )
    pre = Preconditioner("adam", _random_adam_state(capture.n_params), cpu, 1e-8)
    raw = np.zeros((3, 32), dtype=np.float16)
    pre_out = np.zeros((3, 32), dtype=np.float16)
    stats = compute_features(
        lora_model,
        capture,
        encoded,
        pad_id=tok.pad_token_id,
        batch_size=2,
        projection=projection,
        preconditioner=pre,
        out_raw=raw,
        out_pre=pre_out,
    )
    whole = per_sample_lora_gradients(lora_model, capture, encoded, tok.pad_token_id)
    capture.close()
    expected_raw = l2_normalise(_project_whole(projection, whole)).numpy()
    expected_pre = l2_normalise(_project_whole(projection, pre(whole))).numpy()
    assert np.allclose(raw.astype(np.float32), expected_raw, atol=2e-3)
    assert np.allclose(pre_out.astype(np.float32), expected_pre, atol=2e-3)
    assert stats["rows"] == 3 and stats["zero_gradient_rows"] == 0
    assert stats["gradient_norm_sum"] == pytest.approx(float(whole.norm(dim=1).sum()), rel=1e-4)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture()
def all_linear_lora_model(tiny_model_dir):
    """LoRA on every linear layer, as the 8B runs use it: gate/up/down are the widest."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, lora_dropout=0.0)
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.eval()
    return model


def _backward_keeping(model, encoded, pad_id):
    """The batch's forward+backward with the capture in its default (keep) mode."""
    batch = collate(encoded, pad_id)
    per_sample_answer_loss(*answer_logits(model, batch)).sum().backward()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("projection_kind", ["sparse", "dense"])
@pytest.mark.parametrize("pre_kind", ["none", "rms", "adam"])
def test_projecting_inside_the_hooks_equals_keeping_then_projecting(
    all_linear_lora_model, items, projection_kind, pre_kind
):
    tok, encoded = items
    model = all_linear_lora_model
    cpu = torch.device("cpu")
    capture = LoraGradientCapture(model)
    projection = make_projection(
        projection_kind, capture.n_params, 64, blocks=4, seed=0, device=cpu
    )
    state = None if pre_kind == "none" else _random_adam_state(capture.n_params)
    pre = Preconditioner(pre_kind, state, cpu, 1e-8)
    _backward_keeping(model, encoded, tok.pad_token_id)
    kept = project_captured_gradients(capture, projection, pre)
    hooked = projected_lora_gradients(
        model, capture, encoded, tok.pad_token_id, projection=projection, preconditioner=pre
    )
    capture.close()
    assert _rel(hooked.raw, kept.raw) < 1e-5
    assert _rel(hooked.pre, kept.pre) < 1e-5
    assert _rel(hooked.sq_norm, kept.sq_norm) < 1e-5


def test_projecting_holds_no_output_gradient_and_releases_each_input(
    all_linear_lora_model, items, monkeypatch
):
    tok, encoded = items
    model = all_linear_lora_model
    cpu = torch.device("cpu")
    capture = LoraGradientCapture(model)
    seen = []  # (dY held, inputs held) each time a factor's block is added
    add = ProjectionSums.add

    def spy(self, g, offset):
        seen.append((len(capture._grads), len(capture._inputs)))
        add(self, g, offset)

    monkeypatch.setattr(ProjectionSums, "add", spy)
    projected_lora_gradients(
        model,
        capture,
        encoded,
        tok.pad_token_id,
        projection=make_projection("sparse", capture.n_params, 64, blocks=4, seed=0, device=cpu),
        preconditioner=None,
    )
    capture.close()
    n = len(capture.modules)
    assert len(seen) == n  # every factor once
    assert all(grads == 0 for grads, _ in seen)
    # Each factor's input goes as its block is made: one fewer held at every step.
    assert [inputs for _, inputs in seen] == list(range(n - 1, -1, -1))
    assert capture._inputs == {} and capture._grads == {} and capture._projected == set()


class _ToyLora(nn.Module):
    """One LoRA pair named as peft names it (`<path>.lora_A.default`)."""

    def __init__(self, width: int):
        super().__init__()
        self.lora_A = nn.ModuleDict({"default": nn.Linear(width, 2, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, width, bias=False)})

    def forward(self, x):
        return self.lora_B["default"](self.lora_A["default"](x))


class _ToyModel(nn.Module):
    """Two LoRA pairs; `unused` runs but its output never reaches the loss."""

    def __init__(self, *, twice: bool = False):
        super().__init__()
        self.used = _ToyLora(6)
        self.unused = _ToyLora(6)
        self.twice = twice

    def forward(self, x):
        self.unused(x)
        y = self.used(x)
        return self.used(y) if self.twice else y


def _toy_setup(model):
    torch.manual_seed(0)
    capture = LoraGradientCapture(model)
    cpu = torch.device("cpu")
    projection = make_projection("dense", capture.n_params, 16, blocks=4, seed=0, device=cpu)
    pre = Preconditioner("adam", _random_adam_state(capture.n_params), cpu, 1e-8)
    return capture, projection, pre, torch.randn(3, 5, 6)


def test_a_factor_without_output_gradient_counts_as_a_zero_gradient():
    model = _ToyModel()
    capture, projection, pre, x = _toy_setup(model)
    model(x).square().sum().backward()
    whole = capture.per_sample_gradients()
    unused = slice(capture._offsets["unused.lora_A.default"], capture.n_params)
    assert whole[:, unused].abs().sum() == 0 and whole.abs().sum() > 0
    model(x).square().sum().backward()
    kept = project_captured_gradients(capture, projection, pre)
    with capture.projecting(projection, pre) as sums:
        model(x).square().sum().backward()
    hooked = sums.result()
    capture.close()
    # The zero block still has an Adam direction (m_hat / denom), as in the whole gradient.
    assert _rel(hooked.pre, projection(pre(whole))) < 1e-5
    assert _rel(hooked.pre, kept.pre) < 1e-5
    assert _rel(hooked.raw, kept.raw) < 1e-5


def test_a_factor_projected_twice_in_one_batch_is_an_error():
    model = _ToyModel(twice=True)
    capture, projection, pre, x = _toy_setup(model)
    with (
        pytest.raises(RuntimeError, match="second output gradient"),
        capture.projecting(projection, pre),
    ):
        model(x).square().sum().backward()
    assert capture._inputs == {} and capture._projected == set()
    capture.close()


def test_compact_sparse_index_projects_exactly_as_int64_and_float_arrays():
    n, dim, blocks, seed = 5000, 64, 4, 7
    proj = SparseProjection(n, dim, blocks=blocks, seed=seed, device=torch.device("cpu"))
    assert all(idx.dtype == torch.int32 for idx in proj.index)
    assert all(sign.dtype == torch.int8 for sign in proj.sign)
    # The arrays as they were stored before: the same generator calls, int64 and float32.
    gen = torch.Generator().manual_seed(seed)
    width = dim // blocks
    index = [torch.randint(0, width, (n,), generator=gen) + j * width for j in range(blocks)]
    sign = [torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1 for _ in range(blocks)]
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(0))

    def reference(x, offset):
        out = torch.zeros(3, dim)
        for idx, sgn in zip(index, sign):
            out.index_add_(
                1, idx[offset : offset + x.shape[1]], x * sgn[offset : offset + x.shape[1]]
            )
        return out * proj.scale

    assert torch.equal(proj(x), reference(x, 0))
    assert torch.equal(proj.project_block(x[:, 1000:1700], 1000), reference(x[:, 1000:1700], 1000))
