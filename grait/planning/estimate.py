"""Per stage: tokens, FLOPs, time and peak memory of a job, from its spec, data and hardware.

A roofline with fixed costs: a stage's time is its matmul FLOPs over (peak × the stage's
measured efficiency), or its bytes over bandwidth where it is memory-bound (generation, the
per-sample projection), plus a fixed cost per block per forward call and per stage. Memory
is the weights plus the largest batch's working set. The known/unknown split is not known
before Stage 1, so the plan assumes a share of known questions and says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from grait.config import JobConfig
from grait.methods import method_spec
from grait.planning.architecture import Architecture
from grait.planning.hardware import ComputeClass
from grait.planning.workload import DatasetTokens, padded_batches, random_batches
from grait.schedule import resolved_epochs, steps_per_epoch

DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
# bitsandbytes: 4-bit NF4 = 0.5 B + an fp32 scale per 64 weights (double quantisation stores
# that scale in 8 bit with an fp32 per 256 blocks); 8-bit = 1 B + a per-row scale.
QUANT_BYTES = {"4bit": {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}, "8bit": 1.0}
LORA_STATE_BYTES = 16.0  # fp32 weight + gradient + two Adam moments per LoRA parameter
ALLOCATOR_SLACK = 1.1  # the caching allocator's fragmentation over live tensors
MEMORY_HEADROOM = 0.92  # plan to at most this share of the device: other processes, spikes
# Streamed selection on float16 memmaps, per row per 8192 feature dims (bench/results/speed:
# 125k rows in 17.5 s on 2 CPU cores); selection runs on the host whatever the class.
SELECTION_SECONDS_PER_ROW = 1.4e-4


@dataclass
class StagePlan:
    stage: str
    tokens: int
    flops: float
    seconds: float
    peak_memory_bytes: float
    bound: str  # compute | bandwidth | overhead: what the time is mostly made of
    detail: str = ""
    decode_steps: int = 0  # generation: forward calls of one new token (each reads every weight)


@dataclass
class Plan:
    compute_class: str
    calibration: str | None
    dtype: str
    quantization: str
    params: int
    lora_params: int
    weights_bytes: float
    memory_limit_bytes: float
    assumptions: list[str]
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def peak_memory_bytes(self) -> float:
        return max((s.peak_memory_bytes for s in self.stages), default=self.weights_bytes)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak_memory_bytes <= self.memory_limit_bytes

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.stage == name)

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "stages"},
            "fits": self.fits,
            "weights_bytes": round(self.weights_bytes),
            "memory_limit_bytes": round(self.memory_limit_bytes),
            "peak_memory_bytes": round(self.peak_memory_bytes),
            "seconds": round(self.seconds, 1),
            "stages": [
                {
                    **asdict(s),
                    "seconds": round(s.seconds, 2),
                    "peak_memory_bytes": round(s.peak_memory_bytes),
                }
                for s in self.stages
            ],
        }


class _Costs:
    """The roofline terms for one (model, hardware, precision)."""

    def __init__(self, config: JobConfig, arch: Architecture, cls: ComputeClass):
        self.arch, self.cls, self.eff = arch, cls, cls.efficiency
        dtype = config.dtype
        if dtype == "auto":
            dtype = "bfloat16" if cls.device == "cuda" else "float32"
        self.dtype = dtype
        self.db = DTYPE_BYTES[dtype]
        self.peak = cls.peak(dtype)
        q = config.loading.quantization
        self.quantization = q
        if q == "none":
            self.weights = arch.params * self.db
        else:
            per = QUANT_BYTES[q]
            bpp = per[config.loading.double_quant] if isinstance(per, dict) else per
            rest = arch.params - arch.block_linear_params
            self.weights = arch.block_linear_params * bpp + rest * self.db
        self.checkpointing = config.loading.checkpointing
        lora = config.lora
        self.lora_params = arch.lora_params(lora.r, lora.target_modules)
        self.max_factor = arch.max_lora_module_params(lora.r, lora.target_modules)
        self.base_memory = self.weights + cls.runtime_bytes

    def calls(self, forwards: float) -> float:
        return forwards * self.arch.layers * self.eff.seconds_per_layer_call

    def time(self, flops: float, efficiency: float, forwards: float) -> tuple[float, str]:
        compute = flops / (self.peak * efficiency)
        overhead = self.calls(forwards)
        return compute + overhead, "compute" if compute >= overhead else "overhead"

    def memory(self, working: float) -> float:
        return self.base_memory + working * ALLOCATOR_SLACK

    def inference_working_set(self, rows: int, length: int, logit_rows: float) -> float:
        """One layer's transient tensors for the batch plus its fp32 logits where taken."""
        a = self.arch
        transient = rows * length * (4 * a.hidden + 2 * a.intermediate) * self.db
        kv = a.kv_cache_bytes(rows * length, self.db)
        return transient + kv + logit_rows * a.vocab * 4 * 2

    def training_working_set(self, rows: int, length: int, answer: int) -> float:
        a = self.arch
        acts = (
            rows * length * a.activation_bytes_per_token(self.db, checkpointing=self.checkpointing)
        )
        logits = rows * answer * a.vocab * (self.db + 8)  # logits, fp32 log-softmax, its grad
        return self.lora_params * LORA_STATE_BYTES + acts + logits


def _train_like(
    costs: _Costs,
    stage: str,
    lengths: Sequence[tuple[int, int]],
    *,
    batch_size: int,
    epochs: float,
    efficiency: float,
    detail: str,
    steps: int | None = None,
) -> StagePlan:
    """A LoRA training run: forward + backward (+ a recompute with checkpointing)."""
    a = costs.arch
    if not lengths:
        return StagePlan(stage, 0, 0.0, 0.0, costs.base_memory, "overhead", detail)
    batches = random_batches([p + t for p, t in lengths], batch_size)  # the Trainer shuffles
    tokens_epoch = sum(r * w for r, w in batches)
    answers_epoch = sum(t for _, t in lengths)
    if steps is not None:  # max_steps: as many batches as steps, cycling the epoch
        epochs = steps / len(batches)
    passes = 3.0 if costs.checkpointing else 2.0  # forward, backward (activation grads), recompute
    mean_len = tokens_epoch / max(1, sum(r for r, _ in batches))
    flops = passes * a.forward_flops(tokens_epoch, mean_len / 2, logit_tokens=answers_epoch)
    flops *= epochs
    seconds, bound = costs.time(flops, efficiency, passes * len(batches) * epochs)
    seconds += len(batches) * epochs * costs.eff.seconds_per_step
    rows, width = max(batches, key=lambda b: b[0] * b[1])
    memory = costs.memory(costs.training_working_set(rows, width, max(t for _, t in lengths)))
    return StagePlan(
        stage,
        round(tokens_epoch * epochs),
        flops,
        seconds + costs.eff.seconds_per_stage,
        memory,
        bound,
        detail,
    )


def _forward(
    costs: _Costs, rows: Sequence[tuple[int, int]], batch_size: int
) -> tuple[float, float, float]:
    """(tokens, flops, seconds) of one teacher-forced pass with logits on the targets only
    (in the rows' own order, as the fit check takes them)."""
    if not rows:
        return 0.0, 0.0, 0.0
    batches = random_batches([p + t for p, t in rows], batch_size)
    tokens = sum(r * w for r, w in batches)
    mean = tokens / len(rows)
    flops = costs.arch.forward_flops(tokens, mean / 2, logit_tokens=sum(t for _, t in rows))
    seconds, _ = costs.time(flops, costs.eff.prefill, len(batches))
    return tokens, flops, seconds


def _generation(
    costs: _Costs, prompts: Sequence[int], *, batch_size: int, new_tokens: int, samples: int = 1
) -> tuple[float, float, float, float, float, int]:
    """(tokens, flops, seconds, peak working set, bandwidth seconds, decode steps) of batched
    generation."""
    a = costs.arch
    tokens = flops = seconds = peak = bw_seconds = 0.0
    steps = 0
    rows_cap = max(1, batch_size)
    for rows, width in padded_batches(prompts, rows_cap):
        seqs = rows * samples
        prefill = a.forward_flops(seqs * width, width / 2, logit_tokens=seqs)
        t_prefill, _ = costs.time(prefill, costs.eff.prefill, 1)
        step_flops = a.forward_flops(seqs, width + new_tokens / 2, logit_tokens=seqs)
        kv = a.kv_cache_bytes(seqs * (width + new_tokens / 2), costs.db)
        step_bw = (costs.weights + kv) / (costs.cls.bandwidth * costs.eff.decode)
        step_compute = step_flops / (costs.peak * costs.eff.prefill)
        step = max(step_bw, step_compute) + costs.calls(1)
        tokens += seqs * (width + new_tokens)
        flops += prefill + new_tokens * step_flops
        seconds += t_prefill + new_tokens * step
        bw_seconds += new_tokens * step_bw
        steps += new_tokens
        working = costs.inference_working_set(seqs, width, seqs) + a.kv_cache_bytes(
            seqs * (width + new_tokens), costs.db
        )
        peak = max(peak, working)
    return tokens, flops, seconds, peak, bw_seconds, steps


def _knowledge(costs: _Costs, config: JobConfig, data: DatasetTokens) -> StagePlan:
    a, k = costs.arch, config.knowledge
    scorer = k.scorer if k.scorer != "auto" else ("cloze" if a.params < 3e9 else "letter")
    tokens = flops = seconds = working = 0.0
    if data.options:
        if scorer == "cloze":
            seqs = [c + o for c, opts in zip(data.cloze_prompt, data.options) for o in opts]
            logit_tokens = sum(o for opts in data.options for o in opts)
        else:
            seqs = list(data.rait_prompt[: len(data.options)])
            logit_tokens = len(seqs)
        batches = padded_batches(seqs, k.batch_size)
        tokens = sum(r * w for r, w in batches)
        mean = tokens / max(1, len(seqs))
        flops = a.forward_flops(tokens, mean / 2, logit_tokens=logit_tokens)
        seconds, _ = costs.time(flops, costs.eff.prefill, len(batches))
        rows, width = max(batches, key=lambda b: b[0] * b[1])
        working = costs.inference_working_set(rows, width, rows * width)
    if data.oeqa:
        prompts = data.rait_prompt[len(data.options) :]
        per = max(1, k.batch_size // max(1, k.k_samples))
        g = _generation(
            costs, prompts, batch_size=per, new_tokens=k.max_new_tokens, samples=k.k_samples
        )
        greedy = _generation(costs, prompts, batch_size=k.batch_size, new_tokens=k.max_new_tokens)
        tokens += g[0] + greedy[0]
        flops += g[1] + greedy[1]
        seconds += g[2] + greedy[2]
        working = max(working, g[3], greedy[3])
    detail = f"{scorer} scoring of {len(data.options)} MCQA" + (
        f", {k.k_samples}+1 answers to {data.oeqa} open questions" if data.oeqa else ""
    )
    bound = "compute" if flops / (costs.peak * costs.eff.prefill) > seconds / 2 else "overhead"
    return StagePlan(
        "knowledge_query",
        round(tokens),
        flops,
        seconds + costs.eff.seconds_per_stage,
        costs.memory(working),
        bound,
        detail,
    )


def _features(costs: _Costs, config: JobConfig, data: DatasetTokens, n_known: int) -> StagePlan:
    """Every question with the refusal target (candidates) plus the kept knowns' answers."""
    a, f = costs.arch, config.features
    refusal_rows = [(p, data.refusal) for p in data.rait_prompt]
    answer_rows = list(zip(data.rait_prompt, data.answer))[:n_known]
    rows = refusal_rows + answer_rows
    batches = padded_batches([p + t for p, t in rows], f.batch_size)
    tokens = sum(r * w for r, w in batches)
    answers = sum(t for _, t in rows)
    mean = tokens / max(1, len(rows))
    # Forward + backward, plus each sample's own outer products (2 FLOPs per LoRA weight per token).
    flops = (
        2.0 * a.forward_flops(tokens, mean / 2, logit_tokens=answers)
        + 2.0 * costs.lora_params * tokens
    )
    compute, bound = costs.time(flops, costs.eff.features, 2 * len(batches))
    # Per sample, per projection block: read the gradient, its sign, write the product, scatter
    # it by index (~24 B per LoRA weight); candidates also get the preconditioned copy.
    s = f.sparse_blocks if f.projection == "sparse" else 1
    per_weight = 24.0 * s
    traffic = costs.lora_params * (
        len(refusal_rows) * (2 * per_weight + 24) + len(answer_rows) * per_weight
    )
    bandwidth = traffic / (costs.cls.bandwidth * costs.eff.decode)
    if bandwidth > compute:
        bound = "bandwidth"
    rows_max, width = max(batches, key=lambda b: b[0] * b[1])
    acts = rows_max * width * a.activation_bytes_per_token(costs.db, checkpointing=False)
    per_sample = rows_max * costs.max_factor * 4 * 3  # streamed: one LoRA factor at a time
    projection = (
        s * costs.lora_params * 12 if f.projection == "sparse" else costs.lora_params * f.dim * 4
    )
    working = (
        costs.lora_params * 12  # LoRA weights + the warm-up's two Adam moments
        + acts
        + per_sample
        + projection
        + rows_max * f.dim * 4 * 2
        + rows_max * max(t for _, t in rows) * a.vocab * (costs.db + 8)
    )
    return StagePlan(
        "gradient_features",
        tokens,
        flops,
        compute + bandwidth + costs.eff.seconds_per_stage,
        costs.memory(working),
        bound,
        f"{len(refusal_rows)} refusal + {len(answer_rows)} answer gradients, d={f.dim}",
    )


def _evaluation(
    costs: _Costs, config: JobConfig, evals: Sequence[tuple[str, DatasetTokens]]
) -> StagePlan:
    ev = config.evaluation
    runs = 3 if ev.eval_base_refuse_prompt else 2
    tokens = flops = seconds = working = bw = 0.0
    questions = steps = 0
    for _, data in evals:
        questions += data.n
        for prompts in (data.plain_prompt, data.rait_prompt, data.rait_prompt)[:runs]:
            g = _generation(costs, prompts, batch_size=ev.batch_size, new_tokens=ev.max_new_tokens)
            tokens += g[0]
            flops += g[1]
            seconds += g[2]
            working = max(working, g[3])
            bw += g[4]
            steps += g[5]
    bound = "bandwidth" if bw > seconds / 2 else "overhead"
    return StagePlan(
        "evaluation",
        round(tokens),
        flops,
        seconds + costs.eff.seconds_per_stage if evals else 0.0,
        costs.memory(working),
        bound,
        f"{runs} greedy runs over {questions} questions",
        decode_steps=steps,
    )


def plan_job(
    config: JobConfig,
    arch: Architecture,
    train: DatasetTokens,
    evals: Sequence[tuple[str, DatasetTokens]],
    cls: ComputeClass,
    *,
    known_share: float = 0.5,
) -> Plan:
    """The job's predicted cost per stage on `cls` (stages the method skips are left out)."""
    costs = _Costs(config, arch, cls)
    spec = method_spec(config.method)
    stages = spec.stages
    n = train.n
    n_known_all = round(known_share * n) if spec.uses_stage1 else n
    n_known = (
        min(n_known_all, config.knowledge.n_ik)
        if config.knowledge.n_ik is not None
        else n_known_all
    )
    n_unknown = n - n_known_all
    if spec.refusals == "none":
        n_refusals, answer_rows = 0, n
    elif spec.refusals == "all":
        n_refusals, answer_rows = n_unknown, n_known_all
    else:
        budget = config.knowledge.n_idk
        if budget is None or budget == "auto":
            budget = round(n_known / config.knowledge.ik_idk_ratio)
        n_refusals, answer_rows = min(n_unknown, int(budget)), n_known
    assumptions = [
        f"{known_share:.0%} of training questions known to the base model (Stage 1 decides)",
        f"{n_refusals} refusals and {answer_rows} answers trained",
    ]
    if not train.exact:
        assumptions.append("token counts approximate (~4 characters a token): no tokenizer.json")
    if cls.calibration is None:
        assumptions.append(f"class {cls.name!r} not calibrated: default efficiencies")
    if costs.quantization != "none":
        assumptions.append(
            "dequantisation time of 4/8-bit weights is inside the calibrated efficiencies"
        )
    plan = Plan(
        compute_class=cls.name,
        calibration=cls.calibration,
        dtype=costs.dtype,
        quantization=costs.quantization,
        params=arch.params,
        lora_params=costs.lora_params,
        weights_bytes=costs.weights,
        memory_limit_bytes=cls.memory_bytes * MEMORY_HEADROOM,
        assumptions=assumptions,
    )
    t = config.training
    answers = list(zip(train.rait_prompt, train.answer))
    if "knowledge_query" in stages:
        plan.stages.append(_knowledge(costs, config, train))
    if "rehearsal" in stages:
        c = config.craft
        rows = min(c.rehearsal_max_samples, max(c.rehearsal_min_samples, n_known_all // 2))
        rehearsal = _train_like(
            costs,
            "rehearsal",
            answers[:rows],
            batch_size=t.batch_size,
            epochs=c.rehearsal_epochs,
            efficiency=costs.eff.training,
            detail=f"rehearsal on {rows} knowns, then Stage 1 again",
        )
        again = _knowledge(costs, config, train)
        rehearsal.seconds += again.seconds
        rehearsal.flops += again.flops
        rehearsal.tokens += again.tokens
        rehearsal.peak_memory_bytes = max(rehearsal.peak_memory_bytes, again.peak_memory_bytes)
        plan.stages.append(rehearsal)
    if "warmup" in stages:
        w = config.warmup
        pool = n_known if w.data == "known" and n_known else n
        rows = min(pool, max(w.min_samples, round(w.fraction * pool)))
        plan.stages.append(
            _train_like(
                costs,
                "warmup",
                answers[:rows],
                batch_size=w.batch_size,
                epochs=w.epochs,
                efficiency=costs.eff.training,
                detail=f"{rows} samples × {w.epochs} epoch(s)",
            )
        )
    if "gradient_features" in stages:
        plan.stages.append(_features(costs, config, train, n_known))
    training_rows = answers[:answer_rows] + [
        (p, train.refusal) for p in train.rait_prompt[:n_refusals]
    ]
    examples = len(training_rows)
    epochs = resolved_epochs(config, examples)
    train_kwargs = {  # micro-batches: what one forward holds and what the calls count
        "batch_size": t.batch_size,
        "epochs": epochs,
        "efficiency": costs.eff.training,
        "steps": t.max_steps * t.gradient_accumulation_steps if t.max_steps else None,
    }
    if "selection" in stages:
        rows = n + n_known
        seconds = SELECTION_SECONDS_PER_ROW * rows * config.features.dim / 8192
        selection = StagePlan(
            "selection", 0, 0.0, seconds, costs.base_memory, "bandwidth", "streamed on the host"
        )
        if config.knowledge.n_idk == "auto":
            trials = len(config.knowledge.auto.fractions)
            trial = _train_like(costs, "selection", training_rows, detail="", **train_kwargs)
            selection.seconds += trials * trial.seconds
            selection.flops += trials * trial.flops
            selection.tokens += trials * trial.tokens
            selection.peak_memory_bytes = trial.peak_memory_bytes
            selection.bound = trial.bound
            selection.detail = f"auto budget: {trials} trial trainings"
        plan.stages.append(selection)
    steps = t.max_steps or math.ceil(
        steps_per_epoch(examples, t.batch_size, t.gradient_accumulation_steps) * epochs
    )
    training = _train_like(
        costs,
        "training",
        training_rows,
        detail=f"{examples} examples, {steps} optimizer steps ({epochs:g} epochs)",
        **train_kwargs,
    )
    if t.fit_check.enabled:  # one teacher-forced pass over a sample of each kind of target
        cap = t.fit_check.max_rows
        probed = training_rows[:answer_rows][:cap] + training_rows[answer_rows:][:cap]
        tokens, flops, seconds = _forward(costs, probed, config.evaluation.batch_size)
        training.tokens += round(tokens)
        training.flops += flops
        training.seconds += seconds
    plan.stages.append(training)
    plan.stages.append(_evaluation(costs, config, evals))
    return plan
