"""Per-sample gradient features vs the floor (one plain batched fwd+bwd) vs a batch-1 loop.

The three are interleaved batch by batch over the same samples in the same order, so a
neighbour's load on a shared machine hits all three alike and the ratios hold.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from grait.config import LoraConfigSpec
from grait.data import load_records, take
from grait.features import (
    AdamState,
    LoraGradientCapture,
    Preconditioner,
    compute_features,
    l2_normalise,
    make_projection,
)
from grait.models import load_base_model, pick_runtime
from grait.prompts import answer_logits, collate, encode_training_pair, per_sample_answer_loss
from grait.training import attached_lora

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _floor(model: torch.nn.Module, items: list[Any], pad_id: int) -> None:
    device = next(model.parameters()).device
    batch = collate(items, pad_id).to(device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    per_sample_answer_loss(logits, batch.labels).sum().backward()
    model.zero_grad(set_to_none=True)


def _floor_answer_only(model: torch.nn.Module, items: list[Any], pad_id: int) -> None:
    device = next(model.parameters()).device
    batch = collate(items, pad_id).to(device)
    per_sample_answer_loss(*answer_logits(model, batch)).sum().backward()
    model.zero_grad(set_to_none=True)


def _naive(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    items: list[Any],
    pad_id: int,
    post: Any,
) -> torch.Tensor:
    """The naive way: one fwd+bwd per sample, read .grad, same post-processing per sample."""
    rows = []
    for item in items:
        _floor_keep = collate([item], pad_id).to(next(model.parameters()).device)
        logits = model(
            input_ids=_floor_keep.input_ids, attention_mask=_floor_keep.attention_mask
        ).logits
        per_sample_answer_loss(logits, _floor_keep.labels).sum().backward()
        g = torch.cat([p.grad.detach().flatten() for p in params])[None]
        model.zero_grad(set_to_none=True)
        post(g)
        rows.append(g)
    return torch.cat(rows)


def bench_features(
    base_model: str,
    data_path: str,
    *,
    n: int,
    batch_size: int,
    dim: int,
    targets: list[str],
    log: Any,
) -> dict[str, Any]:
    runtime = pick_runtime()
    model, tok = load_base_model(base_model, runtime)

    def clock() -> float:
        """perf_counter once the GPU's queued work is done (CUDA calls return early)."""
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    records = take(load_records(data_path), seed=0, shuffle=True, offset=0, limit=n)
    items = [
        encode_training_pair(tok, r, r.answer_text, refusal="I don't know.", max_length=512)
        for r in records
    ]
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    batches = [
        [items[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)
    ]
    spec = LoraConfigSpec(r=8, alpha=16, dropout=0.0, target_modules=targets)
    times = {"floor": 0.0, "floor_answer_only": 0.0, "features": 0.0, "naive": 0.0}
    with attached_lora(model, spec=spec) as peft_model:
        peft_model.eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a warmed-up adapter: B != 0, so lora_A gradients are not all zero
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        params = [p for _, p in peft_model.named_parameters() if p.requires_grad]
        capture = LoraGradientCapture(peft_model)
        n_params = capture.n_params
        state = AdamState(
            torch.randn(n_params) * 1e-4, torch.rand(n_params) * 1e-7, 10, 0.9, 0.999, 1e-8
        )
        projection = make_projection(
            "sparse", n_params, dim, blocks=4, seed=0, device=runtime.device
        )
        pre = Preconditioner("adam", state, runtime.device, 1e-8)

        def post(g: torch.Tensor) -> None:
            l2_normalise(projection(g))
            l2_normalise(projection(pre(g)))

        out_raw = np.zeros((batch_size, dim), dtype=np.float16)
        out_pre = np.zeros((batch_size, dim), dtype=np.float16)
        # Correctness: hook gradients of the first batch against the batch-1 loop.
        first = batches[0][: min(4, len(batches[0]))]
        from grait.features import per_sample_lora_gradients

        hooked = per_sample_lora_gradients(peft_model, capture, first, tok.pad_token_id)
        capture.close()
        looped = _naive(peft_model, params, first, tok.pad_token_id, lambda g: None)
        capture = LoraGradientCapture(peft_model)
        # capture order == named_parameters order of the lora factors
        rel_err = float((hooked - looped).norm() / looped.norm().clamp(min=1e-30))
        # one untimed warm-up pass of each path
        _floor(peft_model, batches[0], tok.pad_token_id)
        for i, batch in enumerate(batches):
            t = clock()
            _floor(peft_model, batch, tok.pad_token_id)
            times["floor"] += clock() - t
            t = clock()
            _floor_answer_only(peft_model, batch, tok.pad_token_id)
            times["floor_answer_only"] += clock() - t
            t = clock()
            compute_features(
                peft_model,
                capture,
                batch,
                pad_id=tok.pad_token_id,
                batch_size=batch_size,
                projection=projection,
                preconditioner=pre,
                out_raw=out_raw[: len(batch)],
                out_pre=out_pre[: len(batch)],
            )
            times["features"] += clock() - t
            capture.close()
            t = clock()
            _naive(peft_model, params, batch, tok.pad_token_id, post)
            times["naive"] += clock() - t
            capture = LoraGradientCapture(peft_model)
            log(
                f"features [{','.join(targets) if len(targets) < 3 else 'all linear'}]: batch {i + 1}/{len(batches)}"
            )
        capture.close()
    tokens = sum(len(it.ids) for it in items)
    return {
        "targets": "q,v"
        if targets == ["q_proj", "v_proj"]
        else "all linear"
        if targets == ALL_LINEAR
        else ",".join(targets),
        "n_samples": len(items),
        "batch_size": batch_size,
        "mean_tokens": tokens / len(items),
        "lora_params": n_params,
        "dim": dim,
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "features_vs_floor": times["features"] / times["floor"],
        "features_vs_floor_answer_only": times["features"] / times["floor_answer_only"],
        "naive_vs_floor": times["naive"] / times["floor"],
        "naive_vs_features": times["naive"] / times["features"],
        "hook_vs_loop_rel_error": rel_err,
    }
