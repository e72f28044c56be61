"""Stage 2b — per-sample LoRA gradient features (LESS), at about the cost of one batched pass.

grait.md, "Stage 2": for every sample and target, the gradient of its answer-token loss
w.r.t. the LoRA weights, (a) Adam-preconditioned (candidate side) and (b) raw (reference
side), each randomly projected to d dims and L2-normalised, stored as float16 memmaps.

Per-sample gradients come from one batched forward+backward: every LoRA factor is an
`nn.Linear`, so its weight gradient is sum_t dY_t^T X_t; keeping X (forward hook) and dY
(tensor hook) per sample gives each sample's gradient without a loop of batch size 1. The
batch loss is the *sum* of per-sample losses so no sample is scaled by 1/B.

The features never hold a batch's whole flattened gradient: for an 8B model with r=64 on
every linear layer P is ~168M, so [B, P] float32 is ~11 GB at B=16. Projection is linear
and preconditioning elementwise, so each LoRA factor's block is preconditioned and
projected with its own slice of the moments and of the projection, and the [B, d] results
are summed. Nor does it keep every factor's dY until the backward pass ends (B x T x out
for each, ~20 GB in bf16 at that size): each factor's block is made and projected inside
its gradient hook, the moment its dY arrives, and its X and dY are dropped there.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from grait.events import Cancelled
from grait.prompts import Encoded, answer_logits, collate, per_sample_answer_loss

_LORA_FACTOR = re.compile(r"\.lora_[AB]\.[^.]+$")


class LoraGradientCapture:
    """Hooks every LoRA factor to get each sample's gradient of it from one batched pass.

    By default the hooks keep each factor's input X and output gradient dY until
    `module_gradients()` consumes them (tests, benchmarks). Inside `projecting()` each
    factor's block is made, preconditioned and projected the moment its dY arrives, so only
    the factor being processed has a dY held beside autograd's own.
    """

    def __init__(self, model: nn.Module):
        self.modules: list[tuple[str, nn.Linear]] = [
            (name, mod)
            for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and _LORA_FACTOR.search(name) and mod.weight.requires_grad
        ]
        if not self.modules:
            raise ValueError("model has no trainable LoRA factors (lora_A/lora_B Linear layers)")
        names = [name for name, _ in self.modules]
        sizes = [mod.weight.numel() for _, mod in self.modules]
        self.n_params = sum(sizes)
        # Where each factor's block starts in the flattened [B, P] layout.
        self._offsets = dict(zip(names, accumulate(sizes, initial=0)))
        self._sizes = dict(zip(names, sizes))
        self._inputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._sums: ProjectionSums | None = None  # set while projecting()
        self._projected: set[str] = set()
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
                output.register_hook(self._gradient_hook(name))

        return hook

    def _gradient_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if self._sums is None:
                self._grads[name] = grad.detach()
                return
            # Autograd calls these hooks in whatever order its graph dictates; the sum does
            # not care, but a second call would count the factor twice.
            if name in self._projected:
                raise RuntimeError(
                    f"LoRA factor {name} got a second output gradient in one batch: each "
                    "factor must run once per forward pass and the batch backward once"
                )
            self._projected.add(name)
            self._sums.add(self._block(name, grad.detach()), self._offsets[name])

        return hook

    def _block(self, name: str, grad: torch.Tensor | None) -> torch.Tensor:
        """[B, P_m] float32: one factor's per-sample gradient; releases its captured input.

        A factor whose output got no gradient (it did not reach the loss) has a zero one.
        """
        x = self._inputs.pop(name, None)
        if x is None:
            raise RuntimeError(
                f"LoRA factor {name} has no captured input: it did not run in this batch's "
                "forward pass"
            )
        if grad is None:
            return torch.zeros(x.shape[0], self._sizes[name], device=x.device)
        return torch.einsum("bto,bti->boi", grad.float(), x.float()).flatten(1)

    def module_gradients(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, [B, P_m] float32) per LoRA factor, in module order; consumes the batch.

        `offset` is where the block starts in the flattened [B, P] layout. Each factor's
        captured activations are released once its block is made, so memory shrinks as the
        iteration goes.
        """
        try:
            for name, _ in self.modules:
                yield self._offsets[name], self._block(name, self._grads.pop(name, None))
        finally:
            self._inputs.clear()
            self._grads.clear()

    def per_sample_gradients(self) -> torch.Tensor:
        """[B, P] float32: each sample's gradient, flattened in module order."""
        return torch.cat([block for _, block in self.module_gradients()], dim=1)

    @contextmanager
    def projecting(
        self, projection: Projection, preconditioner: Preconditioner | None
    ) -> Iterator[ProjectionSums]:
        """Project each factor's gradient inside its hook, for the one batch run in the block.

        The yielded sums are complete once the block exits: factors whose output got no
        gradient are added then as zero gradients, exactly as `module_gradients()` gives them.
        """
        if self._sums is not None:
            raise RuntimeError("this capture is already projecting a batch")
        sums = ProjectionSums(projection, preconditioner)
        self._sums = sums
        try:
            yield sums
            for name, _ in self.modules:
                if name not in self._projected:
                    sums.add(self._block(name, None), self._offsets[name])
        finally:
            self._sums = None
            self._projected.clear()
            self._inputs.clear()
            self._grads.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _backward_batch(model: nn.Module, items: Sequence[Encoded], pad_id: int) -> None:
    """One forward+backward over the batch; the capture's hooks take what they need."""
    device = next(model.parameters()).device
    batch = collate(items, pad_id).to(device)
    # Logits only where answers are predicted: the LM head over the prompt is wasted work.
    loss = per_sample_answer_loss(*answer_logits(model, batch)).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)


def per_sample_lora_gradients(
    model: nn.Module, capture: LoraGradientCapture, items: Sequence[Encoded], pad_id: int
) -> torch.Tensor:
    """One forward+backward over the batch; returns [B, P] per-sample gradients."""
    _backward_batch(model, items, pad_id)
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
        return self.block(g, 0)

    def block(self, g: torch.Tensor, offset: int) -> torch.Tensor:
        """Precondition columns offset .. offset + g.shape[1] of the flattened gradient."""
        if self.kind == "none":
            return g
        end = offset + g.shape[-1]
        v_hat = (self.b2 * self.v[offset:end] + (1 - self.b2) * g * g) / self.c2
        denom = v_hat.sqrt() + self.eps
        if self.kind == "rms":
            return g / denom
        m_hat = (self.b1 * self.m[offset:end] + (1 - self.b1) * g) / self.c1
        return m_hat / denom


class Projection(Protocol):
    """A linear map of the flattened gradient to `dim` columns, applicable block by block."""

    dim: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def project_block(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """[B, dim]: the contribution of columns offset .. offset + x.shape[1]."""
        ...


class SparseProjection:
    """Sparse JL projection: each coordinate hashed once into each of s blocks with a sign.

    Needs an index of s*P ints instead of a dense P x d matrix (7.5-80 GB at d=8192) and
    preserves cosines about as well as a dense Gaussian projection (grait.md). The index is
    kept as int32 and the signs as int8 (5 bytes a coordinate a block: ~3.4 GB at P=168M,
    s=4, against ~8 GB as int64 and float32); the draws are those of the int64 original, so
    a seed gives the same features as it always has.
    """

    def __init__(self, n_params: int, dim: int, *, blocks: int, seed: int, device: torch.device):
        if dim % blocks:
            raise ValueError(f"projection dim {dim} must be a multiple of sparse_blocks {blocks}")
        gen = torch.Generator().manual_seed(seed)
        width = dim // blocks
        self.dim = dim
        self.scale = 1.0 / math.sqrt(blocks)
        # Same generator calls in the same order as ever: changing them would change old runs.
        self.index = [
            (torch.randint(0, width, (n_params,), generator=gen) + j * width)
            .to(torch.int32)
            .to(device)
            for j in range(blocks)
        ]
        self.sign = [
            (torch.randint(0, 2, (n_params,), generator=gen) * 2 - 1).to(torch.int8).to(device)
            for _ in range(blocks)
        ]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_block(x, 0)

    def project_block(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        end = offset + x.shape[1]
        out = torch.zeros(x.shape[0], self.dim, device=x.device, dtype=torch.float32)
        for idx, sign in zip(self.index, self.sign):
            # index_add_ takes int32 indices; the +-1 signs multiply exactly in x's dtype.
            out.index_add_(1, idx[offset:end], x * sign[offset:end].to(x.dtype))
        return out * self.scale


class DenseProjection:
    """Gaussian projection for small parameter counts (tests, tiny models)."""

    def __init__(self, n_params: int, dim: int, *, seed: int, device: torch.device):
        gen = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.matrix = (torch.randn(n_params, dim, generator=gen) / math.sqrt(dim)).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_block(x, 0)

    def project_block(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        return x @ self.matrix[offset : offset + x.shape[1]]


def make_projection(
    kind: str, n_params: int, dim: int, *, blocks: int, seed: int, device: torch.device
) -> SparseProjection | DenseProjection:
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


@dataclass(frozen=True)
class ProjectedGradients:
    """One batch's projected per-sample gradients, before normalisation."""

    raw: torch.Tensor  # [B, d]
    pre: torch.Tensor | None  # [B, d], preconditioned; None without a preconditioner
    sq_norm: torch.Tensor  # [B], squared L2 norm of each full raw gradient


class ProjectionSums:
    """Running [B, d] sums of a batch's projected gradient blocks, added in any order.

    Projection is linear and preconditioning elementwise, so each block is preconditioned
    and projected with its own slices and the parts summed: extra memory B x P_m + B x d.
    """

    def __init__(self, projection: Projection, preconditioner: Preconditioner | None):
        self.projection = projection
        self.preconditioner = preconditioner
        self._raw: torch.Tensor | None = None
        self._pre: torch.Tensor | None = None
        self._sq_norm: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, g: torch.Tensor, offset: int) -> None:
        """Add the block g ([B, P_m]) of columns offset .. offset + P_m."""
        part = self.projection.project_block(g, offset)
        self._raw = part if self._raw is None else self._raw + part
        sq = g.square().sum(dim=1)
        self._sq_norm = sq if self._sq_norm is None else self._sq_norm + sq
        if self.preconditioner is not None:
            part = self.projection.project_block(self.preconditioner.block(g, offset), offset)
            self._pre = part if self._pre is None else self._pre + part

    def result(self) -> ProjectedGradients:
        if self._raw is None or self._sq_norm is None:
            raise RuntimeError("no gradient block was added")
        return ProjectedGradients(self._raw, self._pre, self._sq_norm)


def project_captured_gradients(
    capture: LoraGradientCapture, projection: Projection, preconditioner: Preconditioner | None
) -> ProjectedGradients:
    """Project a batch the capture kept, module by module: the reference for the hook path."""
    sums = ProjectionSums(projection, preconditioner)
    for offset, g in capture.module_gradients():
        sums.add(g, offset)
    return sums.result()


def projected_lora_gradients(
    model: nn.Module,
    capture: LoraGradientCapture,
    items: Sequence[Encoded],
    pad_id: int,
    *,
    projection: Projection,
    preconditioner: Preconditioner | None,
) -> ProjectedGradients:
    """One forward+backward over the batch, each factor projected as its gradient arrives."""
    with capture.projecting(projection, preconditioner) as sums:
        _backward_batch(model, items, pad_id)
    return sums.result()


def compute_features(
    model: nn.Module,
    capture: LoraGradientCapture,
    items: Sequence[Encoded],
    *,
    pad_id: int,
    batch_size: int,
    projection: Projection,
    preconditioner: Preconditioner | None,
    out_raw: np.ndarray,
    out_pre: np.ndarray | None,
    tick: Callable[[int], None] | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
    batches: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Fill out_raw (and out_pre) row by row with normalised projected gradients.

    `batches` (default: all of `feature_batches`) computes only those batches of item
    positions: a shard. out_raw/out_pre are indexed by item position either way.
    Returns simple statistics (rows, zero-gradient rows, sum of raw norms) for the run's log.
    """
    if batches is None:
        batches = feature_batches([len(e.ids) for e in items], batch_size)
    zero_rows = 0
    norms: list[float] = []
    done = 0
    for idx in map(list, batches):
        if should_cancel():
            raise Cancelled("gradient features stopped on request")
        proj = projected_lora_gradients(
            model,
            capture,
            [items[i] for i in idx],
            pad_id,
            projection=projection,
            preconditioner=preconditioner if out_pre is not None else None,
        )
        row_norm = proj.sq_norm.sqrt()
        zero_rows += int((row_norm == 0).sum())
        norms.extend(row_norm.tolist())
        out_raw[idx] = l2_normalise(proj.raw).cpu().numpy().astype(np.float16)
        if out_pre is not None and proj.pre is not None:
            out_pre[idx] = l2_normalise(proj.pre).cpu().numpy().astype(np.float16)
        done += len(idx)
        if tick:
            tick(done)
    return {
        "rows": done,
        "zero_gradient_rows": zero_rows,
        "gradient_norm_sum": float(np.sum(norms)) if norms else 0.0,
    }


def feature_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The item positions of each batch: sorted by length (less padding), then cut.

    Shards are runs of these batches, so a row is computed with the same neighbours and
    padding with or without shards (bit-identical features, the same selection).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
