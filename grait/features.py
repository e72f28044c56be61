"""Stage 2b — per-sample LoRA gradient features (LESS), at about the cost of one batched pass.

grait.md, "Stage 2": for every sample and target, the gradient of its answer-token loss
w.r.t. the LoRA weights, (a) Adam-preconditioned (candidate side) and (b) raw (reference
side), each randomly projected to d dims and L2-normalised, stored as float16 memmaps.

Per-sample gradients come from one batched forward+backward: every LoRA factor is an
`nn.Linear`, so its weight gradient is sum_t dY_t^T X_t; keeping X (forward hook) and dY
(tensor hook) per sample gives each sample's gradient without a loop of batch size 1. The
batch loss is the *sum* of per-sample losses so no sample is scaled by 1/B.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from grait.events import Cancelled
from grait.prompts import Encoded, answer_logits, collate, per_sample_answer_loss

_LORA_FACTOR = re.compile(r"\.lora_[AB]\.[^.]+$")


class LoraGradientCapture:
    """Hooks every LoRA factor to keep its inputs and output gradients for one batch."""

    def __init__(self, model: nn.Module):
        self.modules: list[tuple[str, nn.Linear]] = [
            (name, mod)
            for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and _LORA_FACTOR.search(name) and mod.weight.requires_grad
        ]
        if not self.modules:
            raise ValueError("model has no trainable LoRA factors (lora_A/lora_B Linear layers)")
        self.n_params = sum(m.weight.numel() for _, m in self.modules)
        self._inputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._handles = [
            mod.register_forward_hook(self._forward_hook(name)) for name, mod in self.modules
        ]

    @property
    def param_names(self) -> list[str]:
        return [f"{name}.weight" for name, _ in self.modules]

    def _forward_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self._inputs[name] = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda grad: self._grads.__setitem__(name, grad.detach()))

        return hook

    def per_sample_gradients(self) -> torch.Tensor:
        """[B, P] float32: each sample's gradient, flattened in module order."""
        parts = []
        for name, _ in self.modules:
            x = self._inputs[name].float()
            g = self._grads[name].float()
            parts.append(torch.einsum("bto,bti->boi", g, x).flatten(1))
        self._inputs.clear()
        self._grads.clear()
        return torch.cat(parts, dim=1)

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def per_sample_lora_gradients(
    model: nn.Module, capture: LoraGradientCapture, items: Sequence[Encoded], pad_id: int
) -> torch.Tensor:
    """One forward+backward over the batch; returns [B, P] per-sample gradients."""
    device = next(model.parameters()).device
    batch = collate(items, pad_id).to(device)
    # Logits only where answers are predicted: the LM head over the prompt is wasted work.
    loss = per_sample_answer_loss(*answer_logits(model, batch)).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return capture.per_sample_gradients()


@dataclass
class AdamState:
    """Flattened AdamW moments of the LoRA weights after the warm-up."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int
    beta1: float
    beta2: float
    eps: float

    def save(self, path: Path) -> None:
        torch.save(
            {
                "exp_avg": self.exp_avg,
                "exp_avg_sq": self.exp_avg_sq,
                "step": self.step,
                "betas": (self.beta1, self.beta2),
                "eps": self.eps,
            },
            path,
        )

    @classmethod
    def load(cls, path: Path) -> AdamState:
        raw = torch.load(path, weights_only=True)
        return cls(raw["exp_avg"], raw["exp_avg_sq"], int(raw["step"]), *raw["betas"], raw["eps"])

    @classmethod
    def from_optimizer(cls, optimizer: Any, params: Sequence[nn.Parameter]) -> AdamState:
        """Gather each parameter's moments in the given (capture) order."""
        state = optimizer.state
        group = optimizer.param_groups[0]
        m, v, steps = [], [], []
        for p in params:
            s = state.get(p, {})
            if "exp_avg" not in s:
                m.append(torch.zeros(p.numel()))
                v.append(torch.zeros(p.numel()))
                continue
            m.append(s["exp_avg"].detach().float().flatten().cpu())
            v.append(s["exp_avg_sq"].detach().float().flatten().cpu())
            steps.append(int(s["step"]))
        beta1, beta2 = group["betas"]
        return cls(torch.cat(m), torch.cat(v), max(steps, default=0), beta1, beta2, group["eps"])


class Preconditioner:
    """Turns a raw gradient into the optimizer's update direction for that sample (LESS).

    `adam`: moments updated with g, then m_hat / (sqrt(v_hat) + eps).
    `rms`:  g / (sqrt(v_hat) + eps), without the first moment (grait.md: the shared beta1*m
            term otherwise dominates every feature).
    `none`: g itself.
    """

    def __init__(self, kind: str, state: AdamState | None, device: torch.device, eps: float):
        self.kind = kind
        self.eps = eps
        if kind != "none":
            if state is None:
                raise ValueError(f"preconditioner {kind!r} needs the warm-up's Adam state")
            t = state.step + 1
            self.b1, self.b2 = state.beta1, state.beta2
            self.m = state.exp_avg.to(device)
            self.v = state.exp_avg_sq.to(device)
            self.c1 = 1 - self.b1**t
            self.c2 = 1 - self.b2**t

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return g
        v_hat = (self.b2 * self.v + (1 - self.b2) * g * g) / self.c2
        denom = v_hat.sqrt() + self.eps
        if self.kind == "rms":
            return g / denom
        m_hat = (self.b1 * self.m + (1 - self.b1) * g) / self.c1
        return m_hat / denom


class SparseProjection:
    """Sparse JL projection: each coordinate hashed once into each of s blocks with a sign.

    Needs an index of s*P ints instead of a dense P x d matrix (7.5-80 GB at d=8192) and
    preserves cosines about as well as a dense Gaussian projection (grait.md).
    """

    def __init__(self, n_params: int, dim: int, *, blocks: int, seed: int, device: torch.device):
        if dim % blocks:
            raise ValueError(f"projection dim {dim} must be a multiple of sparse_blocks {blocks}")
        gen = torch.Generator().manual_seed(seed)
        width = dim // blocks
        self.dim = dim
        self.scale = 1.0 / math.sqrt(blocks)
        self.index = [
            (torch.randint(0, width, (n_params,), generator=gen) + j * width).to(device)
            for j in range(blocks)
        ]
        self.sign = [
            (torch.randint(0, 2, (n_params,), generator=gen).float() * 2 - 1).to(device)
            for _ in range(blocks)
        ]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.dim, device=x.device, dtype=torch.float32)
        for idx, sign in zip(self.index, self.sign):
            out.index_add_(1, idx, x * sign)
        return out * self.scale


class DenseProjection:
    """Gaussian projection for small parameter counts (tests, tiny models)."""

    def __init__(self, n_params: int, dim: int, *, seed: int, device: torch.device):
        gen = torch.Generator().manual_seed(seed)
        self.matrix = (torch.randn(n_params, dim, generator=gen) / math.sqrt(dim)).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix


def make_projection(
    kind: str, n_params: int, dim: int, *, blocks: int, seed: int, device: torch.device
):
    if kind == "dense":
        return DenseProjection(n_params, dim, seed=seed, device=device)
    return SparseProjection(n_params, dim, blocks=blocks, seed=seed, device=device)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Rows to unit length (zero rows stay zero), so inner products are cosines."""
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


class FeatureStore:
    """Float16 feature matrices on disk, opened as memmaps so 100k+ rows need no RAM."""

    def __init__(self, root: Path):
        self.root = root

    def _meta_path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def create(self, name: str, rows: int, dim: int, *, row_ids: Sequence[int]) -> np.memmap:
        self.root.mkdir(parents=True, exist_ok=True)
        self._meta_path(name).write_text(
            json.dumps({"rows": rows, "dim": dim, "row_ids": list(row_ids)})
        )
        return np.lib.format.open_memmap(
            self.root / f"{name}.npy", mode="w+", dtype=np.float16, shape=(rows, dim)
        )

    def open(self, name: str) -> np.memmap:
        return np.load(self.root / f"{name}.npy", mmap_mode="r")

    def row_ids(self, name: str) -> list[int]:
        return json.loads(self._meta_path(name).read_text())["row_ids"]

    def exists(self, name: str) -> bool:
        return (self.root / f"{name}.npy").exists() and self._meta_path(name).exists()


def compute_features(
    model: nn.Module,
    capture: LoraGradientCapture,
    items: Sequence[Encoded],
    *,
    pad_id: int,
    batch_size: int,
    projection: Callable[[torch.Tensor], torch.Tensor],
    preconditioner: Preconditioner | None,
    out_raw: np.ndarray,
    out_pre: np.ndarray | None,
    tick: Callable[[int], None] | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Fill out_raw (and out_pre) row by row with normalised projected gradients.

    Returns simple statistics (zero-gradient rows, mean raw norm) for the run's log.
    """
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    zero_rows = 0
    norms: list[float] = []
    done = 0
    for start in range(0, len(order), batch_size):
        if should_cancel():
            raise Cancelled("gradient features stopped on request")
        idx = order[start : start + batch_size]
        grads = per_sample_lora_gradients(model, capture, [items[i] for i in idx], pad_id)
        row_norm = grads.norm(dim=1)
        zero_rows += int((row_norm == 0).sum())
        norms.extend(row_norm.tolist())
        with torch.no_grad():
            out_raw[idx] = l2_normalise(projection(grads)).cpu().numpy().astype(np.float16)
            if out_pre is not None and preconditioner is not None:
                out_pre[idx] = (
                    l2_normalise(projection(preconditioner(grads))).cpu().numpy().astype(np.float16)
                )
        done += len(idx)
        if tick:
            tick(done)
    return {
        "rows": len(items),
        "zero_gradient_rows": zero_rows,
        "mean_gradient_norm": float(np.mean(norms)) if norms else 0.0,
    }
