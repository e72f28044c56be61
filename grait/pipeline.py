"""Runs a job spec stage by stage in a run directory, resumable after a crash.

Each stage writes its outputs into `run_dir/<stage>/` and only then records itself as done
in `manifest.json` (atomically), so a rerun skips exactly the stages that finished and redoes
one that was cut off. Every stage reseeds from the job seed, which makes a resumed run give
the same result as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from grait.config import DecodingConfig, FitCheckConfig, JobConfig, LoadingConfig
from grait.craft import KnowledgeSignals, known_by_certainty, rehearsal_rows
from grait.data import QARecord, load_records, read_jsonl, take, write_jsonl
from grait.evaluation import EvalRun, answer_and_score, model_entry
from grait.events import (
    STAGES,
    CancelCheck,
    Cancelled,
    PipelineEvent,
    ProgressCallback,
    never_cancel,
    no_progress,
)
from grait.feature_shards import (
    ANSWERS,
    MATRICES,
    REFUSALS,
    CompactRows,
    FeatureShard,
    batches_per_shard,
    merge_into,
    plan_shards,
    write_shard,
)
from grait.features import (
    AdamState,
    FeatureStore,
    LoraGradientCapture,
    Preconditioner,
    compute_features,
    feature_batches,
    make_projection,
)
from grait.fit_check import check_fit
from grait.knowledge import (
    KnowledgeResult,
    choose_scorer,
    query_mcqa,
    query_oeqa,
    refusal_budget,
    split_known_unknown,
)
from grait.memory import peak_memory, reset_peak_memory
from grait.methods import method_spec
from grait.models import count_parameters, load_base_model, pick_runtime
from grait.operating_point import OperatingPoint, find_operating_point, write_operating_point
from grait.prompts import encode_training_pair, first_target_token
from grait.ranking import Features, rank_candidates, refusal_weights
from grait.refusal_bias import (
    FirstStep,
    bias_curve,
    read_decoding,
    refusal_first_token,
    write_decoding,
)
from grait.refusal_score import probe_first_step, probe_refusals
from grait.report import OPERATING_POINT_PLOT, write_report
from grait.schedule import resolved_epochs
from grait.scoring import Outcome
from grait.training import (
    TrainSettings,
    WeightedExample,
    attached_lora,
    steps_per_epoch,
    train_weighted,
)

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
OPERATING_POINT = "operating_point.json"  # selection/: the `auto` budget's evidence
FORMAT_VERSION = 1
LEGACY_DEFAULT_EPOCHS = 3.0  # `training.epochs` before `auto` became the default


class RunDirConflict(RuntimeError):
    """The run directory belongs to a different job spec; resuming would mix two runs."""


@dataclass
class PipelineResult:
    run_dir: Path
    adapter_dir: Path
    report: dict[str, Any]
    artifacts: dict[str, Path]
    timings: dict[str, float]
    # [{code, message, stage}] from every completed stage (e.g. the training-fit check)
    warnings: list[dict[str, Any]] = field(default_factory=list)


# Each stage seeds torch with seed + its offset. Fixed numbers rather than positions in
# STAGES, so a stage added later (rehearsal) does not reseed, and so change, earlier runs.
STAGE_SEED_OFFSET: dict[str, int] = {
    "knowledge_query": 0,
    "warmup": 1,
    "gradient_features": 2,
    "selection": 3,
    "training": 4,
    "evaluation": 5,
    "rehearsal": 6,
}
assert set(STAGE_SEED_OFFSET) == set(STAGES)


def config_hash(config: JobConfig) -> str:
    """Identifies a spec in its run directory.

    Groups added later count only when used, so a spec that does not use them hashes as it
    did before they existed and earlier run directories still resume: `knowledge.auto` when
    `n_idk` is `auto`, `craft` for the craft methods, `selection.neighbours`/`tilt` for the
    neighbourhood strategy, `training.auto` when `epochs` is `auto`, `training.fit_check`
    when it differs from its defaults (it changes warnings, never the adapter), `loading`
    when it is not the plain default, `token_budget` (knowledge, evaluation) when set,
    `features.target_tokens` when not `all`, `decoding` when not the default,
    `evaluation.bias_curve` when off.
    """
    if config.training.max_steps is not None and config.training.epochs == "auto":
        # Fixed steps make epochs moot: hash as the number that was the default before
        # `auto`, so run directories of fixed-step specs from then still resume.
        training = config.training.model_copy(update={"epochs": LEGACY_DEFAULT_EPOCHS})
        config = config.model_copy(update={"training": training})
    exclude: dict[str, Any] = {}
    knowledge_unused = set()
    if config.knowledge.n_idk != "auto":
        knowledge_unused.add("auto")
    if config.knowledge.token_budget is None:
        knowledge_unused.add("token_budget")
    if knowledge_unused:
        exclude["knowledge"] = knowledge_unused
    evaluation_unused = set()
    if config.evaluation.token_budget is None:
        evaluation_unused.add("token_budget")
    if config.evaluation.bias_curve:
        evaluation_unused.add("bias_curve")
    if evaluation_unused:
        exclude["evaluation"] = evaluation_unused
    if config.decoding == DecodingConfig():
        exclude["decoding"] = True
    if config.loading == LoadingConfig():
        exclude["loading"] = True
    if config.features.target_tokens == "all":
        exclude["features"] = {"target_tokens"}
    if not config.method.startswith("craft"):
        exclude["craft"] = True
    if config.selection.strategy != "neighbourhood":
        exclude["selection"] = {"neighbours", "tilt"}
    unused = set()
    if config.training.epochs != "auto":
        unused.add("auto")
    if config.training.fit_check == FitCheckConfig():
        unused.add("fit_check")
    if unused:
        exclude["training"] = unused
    dump = config.model_dump_json(exclude=exclude or None)
    return hashlib.sha256(dump.encode()).hexdigest()[:16]


def _read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def _write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = run_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(run_dir / MANIFEST)


def copy_completed_stages(src: Path | str, dst: Path | str) -> list[str]:
    """Start `dst` as a resumable copy of `src`'s completed stages; the stages copied.

    A completed stage's files never change again, so they are hard-linked where the file
    system allows (no copy of large feature memmaps) and copied otherwise. What `src` has of
    an unfinished stage is left behind: a second process still writing there cannot touch
    `dst`. The manifest goes last, so a crash mid-copy leaves no claim of a stage.
    """
    src, dst = Path(src), Path(dst)
    manifest = _read_manifest(src)
    if manifest is None:
        return []
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    done = [stage for stage in STAGES if stage in manifest["stages"]]
    for stage in done:
        if (src / stage).is_dir():
            shutil.copytree(src / stage, dst / stage, copy_function=_link_or_copy)
    _write_manifest(dst, manifest)
    return done


def adopt_run_dir(run_dir: Path | str, config: JobConfig) -> None:
    """Claim a run folder's completed stages for `config`.

    For a copy made on another machine of the same job: its manifest names that machine's
    dataset paths, so its spec hash differs although the job is the same. The caller vouches
    that it is (the service: one job row, one immutable set of datasets).
    """
    run_dir = Path(run_dir)
    manifest = _read_manifest(run_dir)
    if manifest is None:
        return
    manifest["config"] = config.model_dump(mode="json")
    manifest["config_hash"] = config_hash(config)
    _write_manifest(run_dir, manifest)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def completed_stages(run_dir: Path) -> list[dict[str, Any]]:
    """Finished stages in run order, with their wall time and metrics (for checkpoints APIs)."""
    manifest = _read_manifest(Path(run_dir)) or {"stages": {}}
    return [{"stage": s, **manifest["stages"][s]} for s in STAGES if s in manifest["stages"]]


def stages_for(method: str) -> tuple[str, ...]:
    """Which stages a method runs; the rest are reported as skipped."""
    return method_spec(method).stages


class _Run:
    """State shared by the stages of one pipeline invocation."""

    def __init__(
        self,
        config: JobConfig,
        run_dir: Path,
        progress: ProgressCallback,
        should_cancel: CancelCheck,
    ):
        self.config = config
        self.run_dir = run_dir
        self.emit = progress
        self.should_cancel = should_cancel
        self.runtime = pick_runtime(config.device, config.dtype)
        self._model: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None
        self.train = self._load(config.train)
        self.evals = [(spec.label, self._load(spec)) for spec in config.evals]

    def _load(self, spec: Any) -> list[QARecord]:
        records = load_records(spec.path, spec.format)
        return take(
            records,
            seed=self.config.seed,
            shuffle=spec.shuffle,
            offset=spec.offset,
            limit=spec.limit,
        )

    @property
    def model(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        if self._model is None:
            self._model = load_base_model(
                self.config.base_model, self.runtime, loading=self.config.loading
            )
        return self._model

    def ticker(self, stage: str, total: int) -> Callable[[int], None]:
        """Progress callback for a loop that also honours cancellation between steps."""

        def tick(done: int) -> None:
            self.emit(PipelineEvent("progress", stage, done=done, total=total))
            if self.should_cancel():
                raise Cancelled(f"cancelled during {stage}")

        return tick

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def encode(self, record: QARecord, target: str) -> Any:
        return encode_training_pair(
            self.model[1],
            record,
            target,
            refusal=self.config.refusal,
            max_length=self.config.training.max_length,
        )


# ---- stages ---------------------------------------------------------------------------------


def _query_knowledge(
    run: _Run, model: Any, records: list[QARecord], tick: Callable[[int], None]
) -> list[KnowledgeResult]:
    """Stage 1's question to `model` (the base, or the base with a rehearsal adapter)."""
    cfg = run.config
    tok = run.model[1]
    mcqa = [r for r in records if r.kind == "mcqa"]
    oeqa = [r for r in records if r.kind == "oeqa"]
    scorer = choose_scorer(cfg.knowledge.scorer, count_parameters(run.model[0]))
    results: dict[str, KnowledgeResult] = {}
    if mcqa:
        for r in query_mcqa(
            model, tok, mcqa, cfg.knowledge, scorer=scorer, refusal=cfg.refusal, tick=tick
        ):
            results[r.id] = r
    if oeqa:
        offset = len(mcqa)
        for r in query_oeqa(
            model,
            tok,
            oeqa,
            cfg.knowledge,
            refusal=cfg.refusal,
            seed=cfg.seed,
            tick=lambda d: tick(offset + d),
        ):
            results[r.id] = r
    return [results[r.id] for r in records]


def _stage_knowledge(run: _Run, out: Path) -> dict[str, Any]:
    cfg = run.config
    model, _ = run.model
    tick = run.ticker("knowledge_query", len(run.train))
    ordered = _query_knowledge(run, model, run.train, tick)
    has_mcqa = any(r.kind == "mcqa" for r in run.train)
    scorer = choose_scorer(cfg.knowledge.scorer, count_parameters(model))
    split = split_known_unknown(ordered, cfg.knowledge)
    write_jsonl(out / "knowledge.jsonl", (r.to_json() for r in ordered))
    (out / "split.json").write_text(json.dumps(split.__dict__))
    return {
        "scorer": scorer if has_mcqa else "sampling",
        "n_train": len(ordered),
        "n_ik": len(split.ik_all),
        "n_idk": len(split.idk_all),
        "n_ik_kept": len(split.ik_kept),
        "n_idk_budget": split.n_idk_budget,
        "mean_correctness": float(np.mean([r.correctness for r in ordered])),
    }


def _split(run: _Run) -> dict[str, Any]:
    return json.loads((run.stage_dir("knowledge_query") / "split.json").read_text())


def _stage1_results(run: _Run) -> list[dict[str, Any]]:
    return read_jsonl(run.stage_dir("knowledge_query") / "knowledge.jsonl")


def _stage_rehearsal(run: _Run, out: Path) -> dict[str, Any]:
    """CRaFT's knowledge flow: rehearse on the surest knowns, ask the unknowns again.

    The rehearsal adapter is thrown away; what stays is each unknown's correctness change
    (`flow.jsonl`), which the selection reads (`grait.craft`).
    """
    cfg = run.config
    craft = cfg.craft
    split = _split(run)
    stage1 = _stage1_results(run)
    correctness = [float(r["correctness"]) for r in stage1]
    certainty = [float(r["certainty"]) for r in stage1]
    rows = rehearsal_rows(correctness, certainty, split["ik_all"], craft)
    unknown: list[int] = split["idk_all"]
    model, tok = run.model
    examples = [
        WeightedExample(run.encode(run.train[i], run.train[i].answer_text), 1.0) for i in rows
    ]
    settings = TrainSettings(
        epochs=craft.rehearsal_epochs,
        learning_rate=craft.rehearsal_learning_rate,
        batch_size=cfg.training.batch_size,
        lr_scheduler="constant",
        grad_clip=cfg.training.grad_clip,
        seed=cfg.seed,
    )
    after: list[KnowledgeResult] = []
    with attached_lora(model, spec=cfg.lora) as peft_model:
        if examples:
            train_weighted(
                peft_model,
                tok,
                examples,
                settings,
                work_dir=out / "hf",
                on_step=lambda d, t: run.emit(
                    PipelineEvent("progress", "rehearsal", done=d, total=t + len(unknown))
                ),
                should_cancel=run.should_cancel,
            )
        peft_model.eval()
        steps = math.ceil(len(examples) / settings.batch_size * settings.epochs) if examples else 0
        tick = run.ticker("rehearsal", steps + len(unknown))
        after = _query_knowledge(
            run, peft_model, [run.train[i] for i in unknown], lambda d: tick(steps + d)
        )
    shutil.rmtree(out / "hf", ignore_errors=True)
    flow = []
    for row, res in zip(unknown, after):
        delta = res.correctness - correctness[row]
        flow.append(
            {
                "id": run.train[row].id,
                "row": row,
                "correctness_before": correctness[row],
                "correctness_after": res.correctness,
                "delta": delta,
                "eligible": delta <= craft.max_delta,
            }
        )
    write_jsonl(out / "flow.jsonl", flow)
    deltas = [f["delta"] for f in flow]
    return {
        "rehearsed": len(rows),
        "unknowns": len(unknown),
        "made_answerable": sum(not f["eligible"] for f in flow),
        "eligible": sum(f["eligible"] for f in flow),
        "mean_delta": float(np.mean(deltas)) if deltas else None,
    }


def _signals(run: _Run) -> KnowledgeSignals:
    """Stage 1's correctness/certainty per training row, and the rehearsal's change if run."""
    stage1 = _stage1_results(run)
    delta = None
    if method_spec(run.config.method).rehearsal:
        delta = np.zeros(len(stage1))
        for f in read_jsonl(run.stage_dir("rehearsal") / "flow.jsonl"):
            delta[f["row"]] = f["delta"]
    return KnowledgeSignals(
        np.array([float(r["correctness"]) for r in stage1]),
        np.array([float(r["certainty"]) for r in stage1]),
        delta,
        run.config.craft.max_delta,
    )


def _kept_known(run: _Run, split: dict[str, Any]) -> list[int]:
    """The knowns trained with their answers: Stage 1's cut, or CRaFT's most-certain cut."""
    if method_spec(run.config.method).known_order != "certainty":
        return list(split["ik_kept"])
    sig = _signals(run)
    return known_by_certainty(
        split["ik_all"], sig.correctness, sig.certainty, run.config.knowledge.n_ik
    )


def _rait_target(run: _Run, index: int, split: dict[str, Any]) -> str:
    idk = set(split["idk_all"])
    return run.config.refusal if index in idk else run.train[index].answer_text


def warmup_rows(cfg: JobConfig, n_train: int, known_rows: list[int]) -> list[int]:
    """Training rows the warm-up sees (sorted).

    `known` (default): the kept known samples with their real answers, as the authors'
    release warmed up. A warm-up that is half refusals makes Adam's first moment the refusal
    direction itself, which then dominates every preconditioned feature (quality-study.md).
    Falls back to `mixed` when nothing is known.
    """
    pool = list(known_rows) if cfg.warmup.data == "known" and known_rows else list(range(n_train))
    size = min(len(pool), max(cfg.warmup.min_samples, round(cfg.warmup.fraction * len(pool))))
    return sorted(random.Random(cfg.seed).sample(pool, size))


def _stage_warmup(run: _Run, out: Path) -> dict[str, Any]:
    cfg = run.config
    split = _split(run)
    model, tok = run.model
    chosen = warmup_rows(cfg, len(run.train), split["ik_kept"])
    size = len(chosen)
    examples = [
        WeightedExample(run.encode(run.train[i], _rait_target(run, i, split)), 1.0) for i in chosen
    ]
    settings = TrainSettings(
        epochs=cfg.warmup.epochs,
        learning_rate=cfg.warmup.learning_rate,
        batch_size=cfg.warmup.batch_size,
        lr_scheduler="constant",
        grad_clip=cfg.training.grad_clip,
        seed=cfg.seed,
    )
    losses: list[float] = []
    with attached_lora(model, spec=cfg.lora) as peft_model:
        trainer = train_weighted(
            peft_model,
            tok,
            examples,
            settings,
            work_dir=out / "hf",
            on_step=lambda d, t: run.emit(PipelineEvent("progress", "warmup", done=d, total=t)),
            on_loss=lambda step, loss: losses.append(loss),
            should_cancel=run.should_cancel,
        )
        capture = LoraGradientCapture(peft_model)
        params = [m.weight for _, m in capture.modules]
        capture.close()
        state = AdamState.from_optimizer(trainer.optimizer, params)
        peft_model.save_pretrained(out / "adapter")
    state.save(out / "adam_state.pt")
    shutil.rmtree(out / "hf", ignore_errors=True)
    return {"samples": size, "steps": state.step, "final_loss": losses[-1] if losses else None}


@dataclass
class _FeatureInputs:
    """Stage 2b's two lists (`feature_shards.REFUSALS`, `ANSWERS`): training rows and targets."""

    rows: dict[str, list[int]]
    items: dict[str, list[Any]] = field(default_factory=dict)  # encoded, when the model is at hand

    def batches(self, name: str, batch_size: int) -> list[list[int]]:
        return feature_batches([len(e.ids) for e in self.items[name]], batch_size)


def _feature_inputs(run: _Run, *, encode: bool) -> _FeatureInputs:
    cfg = run.config
    kept = _split(run)["ik_kept"]
    inputs = _FeatureInputs({REFUSALS: list(range(len(run.train))), ANSWERS: list(kept)})
    if encode:
        refusals = [run.encode(r, cfg.refusal) for r in run.train]
        answers = [run.encode(run.train[i], run.train[i].answer_text) for i in kept]
        if cfg.features.target_tokens == "first":  # the gradient of the decision, not the wording
            refusals = [first_target_token(e) for e in refusals]
            answers = [first_target_token(e) for e in answers]
        inputs.items = {REFUSALS: refusals, ANSWERS: answers}
    return inputs


class _FeaturePass:
    """The warmed-up LoRA model with its capture, projection and preconditioner, ready to
    compute any batches of either list: the whole stage, or one shard of it."""

    def __init__(self, run: _Run, peft_model: Any, capture: LoraGradientCapture):
        cfg = run.config
        self.run = run
        self.model = peft_model
        self.capture = capture
        self.n_params = capture.n_params
        self.projection = make_projection(
            cfg.features.projection,
            capture.n_params,
            cfg.features.dim,
            blocks=cfg.features.sparse_blocks,
            seed=cfg.seed,  # the same projection on every worker computing a shard
            device=run.runtime.device,
        )
        state = AdamState.load(run.stage_dir("warmup") / "adam_state.pt")
        self.pre = Preconditioner(
            cfg.features.preconditioner, state, run.runtime.device, cfg.features.adam_eps
        )

    def compute(
        self,
        name: str,
        items: list[Any],
        batches: list[list[int]],
        out_raw: Any,
        out_pre: Any | None,
        tick: Callable[[int], None],
    ) -> dict[str, Any]:
        return compute_features(
            self.model,
            self.capture,
            items,
            pad_id=self.run.model[1].pad_token_id,
            batch_size=self.run.config.features.batch_size,
            projection=self.projection,
            preconditioner=self.pre if name == REFUSALS else None,  # the reference side is raw
            out_raw=out_raw,
            out_pre=out_pre,
            tick=tick,
            batches=batches,
        )


@contextmanager
def _feature_pass(run: _Run) -> Iterator[_FeaturePass]:
    model, _ = run.model
    with attached_lora(
        model, adapter_dir=run.stage_dir("warmup") / "adapter", trainable=True
    ) as peft_model:
        peft_model.eval()  # no dropout: features must be deterministic
        capture = LoraGradientCapture(peft_model)
        try:
            yield _FeaturePass(run, peft_model, capture)
        finally:
            capture.close()


def _feature_metrics(
    run: _Run, n_params: int, stats: dict[str, dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    zero = stats[REFUSALS]["zero_gradient_rows"]
    if zero:
        run.emit(
            PipelineEvent(
                "warning",
                "gradient_features",
                message=f"{zero} samples had an all-zero gradient (warm-up too short?)",
            )
        )
    return {
        "n_params": n_params,
        "dim": run.config.features.dim,
        "refusal_rows": stats[REFUSALS]["rows"],
        "answer_rows": stats[ANSWERS]["rows"],
        "zero_gradient_rows": zero + stats[ANSWERS]["zero_gradient_rows"],
        **extra,
    }


def _create_matrices(out: Path, inputs: _FeatureInputs, dim: int) -> dict[str, Any]:
    store = FeatureStore(out)
    return {
        matrix: store.create(matrix, len(inputs.rows[name]), dim, row_ids=inputs.rows[name])
        for name, pair in MATRICES.items()
        for matrix in pair
        if matrix is not None
    }


def _stage_features(run: _Run, out: Path) -> dict[str, Any]:
    cfg = run.config
    inputs = _feature_inputs(run, encode=True)
    matrices = _create_matrices(out, inputs, cfg.features.dim)
    tick = run.ticker("gradient_features", sum(len(rows) for rows in inputs.rows.values()))
    stats: dict[str, dict[str, Any]] = {}
    offset = 0
    with _feature_pass(run) as fp:
        for name, (raw, pre) in MATRICES.items():
            stats[name] = fp.compute(
                name,
                inputs.items[name],
                inputs.batches(name, cfg.features.batch_size),
                matrices[raw],
                matrices[pre] if pre else None,
                lambda d, offset=offset: tick(offset + d),
            )
            offset += len(inputs.rows[name])
        n_params = fp.n_params
    return _feature_metrics(run, n_params, stats)


# ---- Stage 2b in shards (grait.feature_shards): plan, one shard, merge ---------------------


def _open_run(
    config: JobConfig,
    run_dir: Path | str,
    progress: ProgressCallback | None,
    should_cancel: CancelCheck | None,
    *,
    needs: tuple[str, ...],
) -> _Run:
    """A run folder of this spec in which `needs` are completed (else ValueError)."""
    run_dir = Path(run_dir)
    manifest = _read_manifest(run_dir)
    if manifest is None or manifest.get("config_hash") != config_hash(config):
        raise RunDirConflict(f"{run_dir} holds no run of this job spec")
    missing = [s for s in needs if s not in manifest["stages"]]
    if missing:
        raise ValueError(f"{run_dir}: stages not completed yet: {', '.join(missing)}")
    return _Run(config, run_dir, progress or no_progress, should_cancel or never_cancel)


def feature_shard_plan(
    config: JobConfig, run_dir: Path | str, rows_per_shard: int
) -> tuple[list[FeatureShard], int]:
    """The shards of this run's Stage 2b and its number of rows (needs Stage 1 only: the
    lists' sizes)."""
    run = _open_run(config, run_dir, None, None, needs=("knowledge_query",))
    inputs = _feature_inputs(run, encode=False)
    size = config.features.batch_size
    refusals, answers = len(inputs.rows[REFUSALS]), len(inputs.rows[ANSWERS])
    shards = plan_shards(
        math.ceil(refusals / size),
        math.ceil(answers / size),
        batches_per_shard(rows_per_shard, size),
    )
    return shards, refusals + answers


ShardComputer = Callable[..., dict[str, Any]]


@contextmanager
def feature_shard_computer(config: JobConfig, run_dir: Path | str) -> Iterator[ShardComputer]:
    """`compute(shard, out, progress=, should_cancel=)` for any shards of this run, from its
    warm-up: one shard's rows into `out` (`feature_shards.write_shard`).

    The samples are encoded and the LoRA model, projection and preconditioner are built once,
    however many shards a worker computes. Any machine holding the run folder up to the
    warm-up can compute any shard.
    """
    run = _open_run(config, run_dir, None, None, needs=("warmup",))
    inputs = _feature_inputs(run, encode=True)
    size, dim = config.features.batch_size, config.features.dim
    batches = {name: inputs.batches(name, size) for name in MATRICES}
    with _feature_pass(run) as fp:

        def compute(
            shard: FeatureShard,
            out: Path | str,
            *,
            progress: ProgressCallback | None = None,
            should_cancel: CancelCheck | None = None,
        ) -> dict[str, Any]:
            out = Path(out)
            run.emit = progress or no_progress
            run.should_cancel = should_cancel or never_cancel
            chosen = {name: [batches[name][b] for b in shard.batches(name)] for name in MATRICES}
            tick = run.ticker(
                "gradient_features", sum(len(b) for bs in chosen.values() for b in bs)
            )
            rows: dict[str, dict[str, CompactRows]] = {}
            stats: dict[str, dict[str, Any]] = {}
            done = 0
            for name, (raw, pre) in MATRICES.items():
                positions = [p for batch in chosen[name] for p in batch]
                rows[name] = {m: CompactRows(positions, dim) for m in (raw, pre) if m is not None}
                stats[name] = fp.compute(
                    name,
                    inputs.items[name],
                    chosen[name],
                    rows[name][raw],
                    rows[name][pre] if pre else None,
                    lambda d, done=done: tick(done + d),
                )
                done += len(positions)
            shutil.rmtree(out, ignore_errors=True)
            write_shard(out, shard, rows, stats, n_params=fp.n_params)
            return stats

        yield compute


def compute_feature_shard(
    config: JobConfig,
    run_dir: Path | str,
    shard: FeatureShard,
    out: Path | str,
    *,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> dict[str, Any]:
    """One shard (`feature_shard_computer` for one)."""
    with feature_shard_computer(config, run_dir) as compute:
        return compute(shard, out, progress=progress, should_cancel=should_cancel)


def merge_feature_shards(
    config: JobConfig,
    run_dir: Path | str,
    shard_dirs: list[Path],
    shards: list[FeatureShard],
    *,
    seconds: float,
    progress: ProgressCallback | None = None,
    **extra_metrics: Any,
) -> dict[str, Any]:
    """Complete Stage 2b from its shards: the same matrices as the unsharded stage, recorded
    in the manifest like any stage (`seconds`: the sharded stage's wall time)."""
    run = _open_run(config, run_dir, progress, None, needs=("warmup",))
    manifest = _read_manifest(run.run_dir)
    assert manifest is not None
    if "gradient_features" in manifest["stages"]:
        raise ValueError("gradient_features is already completed in this run folder")
    out = run.stage_dir("gradient_features")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    inputs = _feature_inputs(run, encode=False)
    matrices = _create_matrices(out, inputs, config.features.dim)
    stats, n_params = merge_into(matrices, shard_dirs, shards)
    for matrix in matrices.values():
        matrix.flush()
    metrics = _feature_metrics(run, n_params, stats, shards=len(shards), **extra_metrics)
    _complete_stage(run, manifest, "gradient_features", seconds, metrics, peak=None)
    return metrics


def _complete_stage(
    run: _Run,
    manifest: dict[str, Any],
    stage: str,
    seconds: float,
    metrics: dict[str, Any],
    *,
    peak: int | None,
) -> None:
    """Record a finished stage (the manifest is written atomically), then say so."""
    manifest["stages"][stage] = {
        "seconds": seconds,
        "peak_memory_bytes": peak,
        "metrics": metrics,
        "completed_at": time.time(),
    }
    _write_manifest(run.run_dir, manifest)
    run.emit(PipelineEvent("metrics", stage, data=metrics))
    run.emit(PipelineEvent("stage_completed", stage, message=f"{stage} done in {seconds:.1f}s"))


def load_features(run_dir: Path) -> Features:
    """Stage 2's stored matrices (memory-mapped float16)."""
    store = FeatureStore(run_dir / "gradient_features")
    return Features(store.open("idk_pre"), store.open("idk_raw"), store.open("van_raw"))


def _stage_selection(run: _Run, out: Path) -> dict[str, Any]:
    """Stage 2c (ranking, budget) and Stage 3 (weights): which unknowns become refusals."""
    cfg = run.config
    spec = method_spec(cfg.method)
    split = _split(run)
    split = {**split, "ik_kept": _kept_known(run, split)}
    idk_rows: list[int] = split["idk_all"]
    features = load_features(run.run_dir) if spec.uses_features else None
    signals = _signals(run) if spec.ranking in ("certainty", "correctness") else None
    # From the spec, not from split.json: runs that share Stage 1 may differ in budget.
    budget = refusal_budget(cfg.knowledge, len(split["ik_kept"]), len(idk_rows))
    auto: OperatingPoint | None = None
    if cfg.knowledge.n_idk == "auto":
        auto = _auto_budget(run, out, split, features, signals, fallback=budget)
        budget = auto.budget
    assert spec.ranking is not None
    ranking = rank_candidates(
        spec.ranking,
        idk_rows=idk_rows,
        ik_rows=split["ik_all"],
        features=features,
        cfg=cfg.selection,
        seed=cfg.seed,
        signals=signals,
    )
    picked = ranking.order[:budget]
    weights = refusal_weights(ranking, picked, cfg.weighting, weighted=spec.weighted)
    rank = {cand: r for r, cand in enumerate(ranking.order)}
    weight_of = {cand: float(weights[r]) for r, cand in enumerate(picked)}
    rows = []
    for cand, row in enumerate(idk_rows):
        rec = run.train[row]
        entry: dict[str, Any] = {
            "id": rec.id,
            "row": row,
            "selected": cand in weight_of,
            "rank": rank.get(cand),
        }
        for name, values in ranking.terms.items():
            value = float(values[cand])
            entry[name] = None if np.isnan(value) else value
        entry["weight"] = weight_of.get(cand)
        rows.append(entry)
    write_jsonl(out / "selection.jsonl", rows)
    chosen = [idk_rows[c] for c in picked]
    (out / "selected.json").write_text(
        json.dumps(
            {
                "rows": chosen,
                "weights": [float(x) for x in weights],
                "known_rows": split["ik_kept"],
            }
        )
    )
    metrics: dict[str, Any] = {"candidates": len(idk_rows), "selected": len(chosen)}
    if len(ranking.order) < len(idk_rows):
        metrics["eligible"] = len(ranking.order)
    if len(weights):
        metrics.update(weight_min=float(np.min(weights)), weight_max=float(np.max(weights)))
    if auto is not None:
        metrics.update(
            budget_rule=auto.rule, auto_budget_tried=[p.budget_full for p in auto.points]
        )
    return metrics


def _auto_budget(
    run: _Run,
    out: Path,
    split: dict[str, Any],
    features: Features | None,
    signals: KnowledgeSignals | None,
    *,
    fallback: int,
) -> OperatingPoint:
    """`n_idk: auto`: trial LoRAs with the job's own training settings, probed on a hold-out."""
    cfg = run.config
    model, tok = run.model
    encoded: dict[tuple[int, str], Any] = {}

    def example(row: int, target: str, weight: float) -> WeightedExample:
        if (row, target) not in encoded:
            encoded[row, target] = run.encode(run.train[row], target)
        return WeightedExample(encoded[row, target], weight)

    @contextmanager
    def train(known: list[int], refusals: list[tuple[int, float]]) -> Iterator[Any]:
        examples = [example(i, run.train[i].answer_text, 1.0) for i in known]
        examples += [example(i, cfg.refusal, w) for i, w in refusals]
        # The seed the training stage will use, so a trial starts from the same LoRA init.
        set_seed(cfg.seed + STAGE_SEED_OFFSET["training"])
        work = out / "auto_hf"
        with attached_lora(model, spec=cfg.lora) as peft_model:
            train_weighted(
                peft_model,
                tok,
                examples,
                _train_settings(cfg, len(examples)),
                work_dir=work,
                should_cancel=run.should_cancel,
            )
            yield peft_model
        shutil.rmtree(work, ignore_errors=True)

    # Both probes of a trial: the held-out rows under the RAIT prompt, teacher-forced.
    probe_settings: dict[str, Any] = {
        "refusal": cfg.refusal,
        "batch_size": cfg.evaluation.batch_size,
        "token_budget": cfg.evaluation.token_budget,
        "max_length": cfg.training.max_length,
    }

    def probe(peft_model: Any, rows: list[int]) -> list[Outcome]:
        records = [run.train[i] for i in rows]
        return probe_refusals(peft_model, tok, records, **probe_settings).outcomes

    def margins(peft_model: Any, rows: list[int]) -> list[FirstStep]:
        return probe_first_step(peft_model, tok, [run.train[i] for i in rows], **probe_settings)

    point = find_operating_point(
        cfg,
        split,
        features,
        train=train,
        probe=probe,
        fallback_budget=fallback,
        emit=run.emit,
        should_cancel=run.should_cancel,
        signals=signals,
        margins=margins if cfg.decoding.refusal_bias == "auto" else None,
    )
    write_operating_point(out / OPERATING_POINT, point)
    return point


def _training_set(run: _Run) -> list[tuple[int, str, str, float]]:
    """(row, kind, target, weight) for every training example of the method."""
    cfg = run.config
    refusals = method_spec(cfg.method).refusals
    if refusals == "none":
        return [(i, "answer", r.answer_text, 1.0) for i, r in enumerate(run.train)]
    split = _split(run)
    if refusals == "all":
        known = [(i, "ik", run.train[i].answer_text, 1.0) for i in split["ik_all"]]
        return known + [(i, "idk", cfg.refusal, 1.0) for i in split["idk_all"]]
    chosen = json.loads((run.stage_dir("selection") / "selected.json").read_text())
    # Selections written before `known_rows` existed kept Stage 1's cut.
    kept = chosen.get("known_rows", split["ik_kept"])
    known = [(i, "ik", run.train[i].answer_text, 1.0) for i in kept]
    return known + [(i, "idk", cfg.refusal, w) for i, w in zip(chosen["rows"], chosen["weights"])]


def _refusal_bias(run: _Run) -> float:
    """The bias the adapter decodes with: the spec's number, or the one `auto` chose with the
    budget (0 when the search fell back to the ratio rule and measured none)."""
    bias = run.config.decoding.refusal_bias
    if bias != "auto":
        return float(bias)
    path = run.stage_dir("selection") / OPERATING_POINT
    chosen = json.loads(path.read_text()).get("refusal_bias") if path.exists() else None
    return float(chosen or 0.0)


def _train_settings(cfg: JobConfig, n_examples: int) -> TrainSettings:
    """The final tuning's settings (the `auto` budget's trial trainings use the same)."""
    t = cfg.training
    return TrainSettings(
        epochs=resolved_epochs(cfg, n_examples),
        learning_rate=t.learning_rate,
        batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler=t.lr_scheduler,
        warmup_ratio=t.warmup_ratio,
        grad_clip=t.grad_clip,
        weight_decay=t.weight_decay,
        seed=cfg.seed,
        max_steps=t.max_steps,
    )


def _stage_training(run: _Run, out: Path) -> dict[str, Any]:
    cfg = run.config
    model, tok = run.model
    plan = _training_set(run)
    if not plan:
        raise ValueError("the training set is empty: no known or selected unknown samples")
    write_jsonl(
        out / "train_set.jsonl",
        (
            {
                "id": run.train[i].id,
                "question": run.train[i].question,
                "kind": kind,
                "target": target,
                "weight": w,
            }
            for i, kind, target, w in plan
        ),
    )
    examples = [WeightedExample(run.encode(run.train[i], target), w) for i, _, target, w in plan]
    settings = _train_settings(cfg, len(examples))
    optimizer_steps = settings.max_steps or max(
        1,
        math.ceil(
            steps_per_epoch(
                len(examples), settings.batch_size, settings.gradient_accumulation_steps
            )
            * settings.epochs
        ),
    )
    if cfg.training.epochs == "auto" and settings.max_steps is None:
        run.emit(
            PipelineEvent(
                "metrics",
                "training",
                message=f"epochs auto: {settings.epochs:g} epochs = {optimizer_steps} optimizer "
                f"steps for {len(examples)} examples",
                data={"epochs": settings.epochs, "optimizer_steps": optimizer_steps},
            )
        )
    losses: list[float] = []

    def on_loss(step: int, loss: float) -> None:
        losses.append(loss)
        run.emit(
            PipelineEvent("metrics", "training", done=step, data={"step": step, "train_loss": loss})
        )

    with attached_lora(model, spec=cfg.lora) as peft_model:
        train_weighted(
            peft_model,
            tok,
            examples,
            settings,
            work_dir=out / "hf",
            on_step=lambda d, total: run.emit(
                PipelineEvent("progress", "training", done=d, total=total)
            ),
            on_loss=on_loss,
            should_cancel=run.should_cancel,
        )
        peft_model.save_pretrained(out / "adapter")
        write_decoding(
            out / "adapter",
            refusal=cfg.refusal,
            token_id=refusal_first_token(tok, cfg.refusal),
            bias=_refusal_bias(run),
        )
        fit = None
        if cfg.training.fit_check.enabled:
            fit = check_fit(
                peft_model,
                [(kind, e.encoded) for (_, kind, _, _), e in zip(plan, examples)],
                cfg.training.fit_check,
                pad_id=tok.pad_token_id,
                batch_size=cfg.evaluation.batch_size,
                token_budget=cfg.evaluation.token_budget,
                seed=cfg.seed,
            )
            for warning in fit.warnings:
                run.emit(
                    PipelineEvent(
                        "warning",
                        "training",
                        message=f"{warning.code}: {warning.message}",
                        data={"code": warning.code},
                    )
                )
    shutil.rmtree(out / "hf", ignore_errors=True)
    n_idk = sum(1 for _, kind, _, _ in plan if kind == "idk")
    return {
        "examples": len(plan),
        "refusal_examples": n_idk,
        "epochs": settings.epochs,
        "optimizer_steps": optimizer_steps,
        "trained_tokens": int(sum(e.encoded.n_target for e in examples) * settings.epochs),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        **({"fit": fit.to_json()} if fit else {}),
    }


def _stage_evaluation(run: _Run, out: Path, timings: dict[str, float]) -> dict[str, Any]:
    cfg = run.config
    ev = cfg.evaluation
    model, tok = run.model
    started = time.perf_counter()
    # Generations (base, base told it may refuse, tuned), then the bias curve's probe.
    passes = (3 if ev.eval_base_refuse_prompt else 2) + (1 if ev.bias_curve else 0)
    total = sum(len(recs) for _, recs in run.evals) * passes
    done = 0
    tick_all = run.ticker("evaluation", total)

    adapter = run.stage_dir("training") / "adapter"
    first_step = read_decoding(adapter)  # what the adapter decodes with, wherever it is served
    bias = first_step[1] if first_step else 0.0

    def answer(
        m: PreTrainedModel, recs: list[QARecord], allow_refusal: bool, *, tuned: bool = False
    ) -> EvalRun:
        nonlocal done
        base_done = done
        result = answer_and_score(
            m,
            tok,
            recs,
            allow_refusal=allow_refusal,
            refusal=cfg.refusal,
            max_new_tokens=ev.max_new_tokens,
            batch_size=ev.batch_size,
            token_budget=ev.token_budget,
            first_step_bias=first_step if tuned else None,
            tick=lambda d: tick_all(base_done + d),
        )
        done += len(recs)
        return result

    runs: dict[str, dict[str, EvalRun]] = {}
    for name, recs in run.evals:
        runs[name] = {"base": answer(model, recs, False)}
        if ev.eval_base_refuse_prompt:
            runs[name]["base+refuse-prompt"] = answer(model, recs, True)
    curves: dict[str, dict[str, Any]] = {}
    with attached_lora(model, adapter_dir=adapter, trainable=False) as tuned:
        for name, recs in run.evals:
            runs[name][cfg.method] = answer(tuned, recs, True, tuned=True)
            if ev.bias_curve:
                probes = probe_first_step(
                    tuned,
                    tok,
                    recs,
                    refusal=cfg.refusal,
                    batch_size=ev.batch_size,
                    token_budget=ev.token_budget,
                    max_length=cfg.training.max_length,
                )
                curves[name] = bias_curve(probes, runs[name]["base"].outcomes, current=bias)
                done += len(recs)
                tick_all(done)

    # Per question, base and tuned side by side: what a person reads to see which questions
    # the tuned model now refuses and where it still answers wrong (known = the base model
    # answered it correctly).
    write_jsonl(
        out / "answers.jsonl",
        (
            {
                "eval": name,
                "id": rec.id,
                "question": rec.question,
                "gold": rec.answer_text,
                "known": runs[name]["base"].outcomes[i] == "correct",
                "base": {
                    "response": runs[name]["base"].responses[i],
                    "outcome": runs[name]["base"].outcomes[i],
                },
                "tuned": {
                    "response": runs[name][cfg.method].responses[i],
                    "outcome": runs[name][cfg.method].outcomes[i],
                },
            }
            for name, recs in run.evals
            for i, rec in enumerate(recs)
        ),
    )
    evals = []
    for name, recs in run.evals:
        base_run = runs[name]["base"]
        entries = [
            model_entry(label, r, base_run, seed=cfg.seed) for label, r in runs[name].items()
        ]
        evals.append({"name": name, "kind": recs[0].kind, "models": entries})
        if name in curves:
            evals[-1]["refusal_bias"] = curves[name]
        write_jsonl(
            out / f"responses_{_safe(name)}.jsonl",
            (
                {
                    "id": rec.id,
                    **{
                        label: {"response": r.responses[i], "outcome": r.outcomes[i]}
                        for label, r in runs[name].items()
                    },
                }
                for i, rec in enumerate(recs)
            ),
        )
    timings = {**timings, "evaluation": round(time.perf_counter() - started, 2)}
    report = {
        "method": cfg.method,
        "base_model": cfg.base_model,
        "seed": cfg.seed,
        "evals": evals,
        "timings": timings,
        "notes": _notes(run, evals),
    }
    operating_point = run.stage_dir("selection") / OPERATING_POINT
    if operating_point.exists():
        report["operating_point"] = json.loads(operating_point.read_text())
    manifest = _read_manifest(run.run_dir) or {"stages": {}}
    training = manifest["stages"].get("training", {}).get("metrics")
    if training:
        keys = ("examples", "refusal_examples", "epochs", "optimizer_steps", "fit")
        report["training"] = {k: training[k] for k in keys if k in training}
    report["warnings"] = stage_warnings(manifest)
    write_report(out, report)
    tuned_ths = {e["name"]: e["models"][-1]["ths"] for e in evals}
    return {"ths": tuned_ths}


def _notes(run: _Run, evals: list[dict[str, Any]]) -> list[str]:
    notes = [
        "THS is measured against the base model with the plain prompt (first row of each table).",
    ]
    for e in evals:
        if e["models"][0]["wrong"] == 0:
            notes.append(
                f"{e['name']}: the base model made no wrong answers, so THS is undefined (n/a)."
            )
    train_ids = {r.id for r in run.train}
    for name, recs in run.evals:
        overlap = sum(1 for r in recs if r.id in train_ids)
        if overlap:
            notes.append(
                f"{name}: {overlap} of {len(recs)} eval questions also appear in the training set."
            )
    return notes


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ---- runner -------------------------------------------------------------------------------


def run_pipeline(
    config: JobConfig,
    run_dir: Path | str,
    *,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    until: str | None = None,
    compute_class: str | None = None,
    elsewhere: dict[str, Callable[[], bool]] | None = None,
) -> PipelineResult:
    """Run (or resume) every stage the method needs; return where the adapter and report are.

    `until` stops after that stage (e.g. `gradient_features`, to share Stages 1-2 between
    runs that differ only in budget or ranking). `compute_class` plans the job on that class
    first (`grait.planning`) and puts the plan beside the measured time and peak memory per
    stage in the report. `elsewhere[stage]()` is asked first whenever that stage is due: True
    means it completed the stage in this run folder itself (Stage 2b in shards over several
    workers, `merge_feature_shards`); False, the stage runs here as usual.
    """
    if until is not None and until not in STAGES:
        raise ValueError(f"until: unknown stage {until!r}; stages are {', '.join(STAGES)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    emit = progress or no_progress
    cancel = should_cancel or never_cancel
    digest = config_hash(config)
    manifest = _read_manifest(run_dir)
    if manifest is None:
        manifest = {
            "version": FORMAT_VERSION,
            "config_hash": digest,
            "config": config.model_dump(mode="json"),
            "stages": {},
        }
        _write_manifest(run_dir, manifest)
    elif manifest.get("config_hash") != digest:
        raise RunDirConflict(
            f"{run_dir} holds a run of a different job spec; use a new run directory"
        )

    run = _Run(config, run_dir, emit, cancel)
    if compute_class is not None:
        _write_plan(config, run_dir, compute_class)
    wanted = stages_for(config.method)
    timings = {s: manifest["stages"][s]["seconds"] for s in STAGES if s in manifest["stages"]}
    for stage in STAGES:
        if stage not in wanted:
            emit(
                PipelineEvent("stage_skipped", stage, message=f"not used by method {config.method}")
            )
            continue
        if stage == "evaluation" and not run.evals:
            emit(PipelineEvent("stage_skipped", stage, message="no eval datasets given"))
            continue
        if stage in manifest["stages"]:
            emit(
                PipelineEvent(
                    "stage_skipped",
                    stage,
                    message="completed in an earlier attempt",
                )
            )
            if stage == until:
                break
            continue
        if cancel():
            raise Cancelled(f"cancelled before {stage}")
        if elsewhere and stage in elsewhere and elsewhere[stage]():
            manifest = _read_manifest(run_dir)
            assert manifest is not None and stage in manifest["stages"], stage
            timings[stage] = manifest["stages"][stage]["seconds"]
            if stage == until:
                break
            continue
        out = run.stage_dir(stage)
        shutil.rmtree(out, ignore_errors=True)  # leftovers of an attempt that died mid-stage
        out.mkdir(parents=True)
        set_seed(config.seed + STAGE_SEED_OFFSET[stage])
        emit(PipelineEvent("stage_started", stage))
        reset_peak_memory(run.runtime)
        started = time.perf_counter()
        if stage == "evaluation":
            metrics = _stage_evaluation(run, out, timings)
        else:
            metrics = _STAGE_FUNCS[stage](run, out)
        seconds = round(time.perf_counter() - started, 2)
        timings[stage] = seconds
        _complete_stage(run, manifest, stage, seconds, metrics, peak=peak_memory(run.runtime))
        if stage == until:
            break
    _attach_plan(run_dir, manifest)
    return _result(run_dir, timings)


PLAN_FILE = "plan.json"


def _write_plan(config: JobConfig, run_dir: Path, compute_class: str) -> None:
    """Plan once per run folder (a resumed attempt keeps the first plan)."""
    from grait.planning import PlanError, plan_config

    path = run_dir / PLAN_FILE
    if path.exists():
        return
    try:
        plan = plan_config(config, compute_class)
    except (PlanError, ValueError) as exc:
        log.warning("no plan for this run: %s", exc)
        return
    path.write_text(json.dumps(plan.to_json(), indent=2))


def _attach_plan(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Put the plan beside what each stage took in report.md / report.json (once)."""
    from grait.planning import render_plan

    plan_path, report_path = run_dir / PLAN_FILE, run_dir / "evaluation" / "report.json"
    if not plan_path.exists() or not report_path.exists():
        return
    report = json.loads(report_path.read_text())
    if "plan" in report:
        return
    plan = json.loads(plan_path.read_text())
    measured = {
        stage: {k: v for k, v in info.items() if k in ("seconds", "peak_memory_bytes")}
        for stage, info in manifest["stages"].items()
    }
    report["plan"] = {"predicted": plan, "measured": measured}
    report_path.write_text(json.dumps(report, indent=2))
    md = report_path.with_name("report.md")
    if md.exists():
        section = "\n\n## Plan against what happened\n\n" + render_plan(plan, measured) + "\n"
        md.write_text(md.read_text().rstrip("\n") + section)


_STAGE_FUNCS: dict[str, Callable[[_Run, Path], dict[str, Any]]] = {
    "knowledge_query": _stage_knowledge,
    "rehearsal": _stage_rehearsal,
    "warmup": _stage_warmup,
    "gradient_features": _stage_features,
    "selection": _stage_selection,
    "training": _stage_training,
}


def stage_warnings(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every completed stage's warnings, in stage order: [{code, message, stage}]."""
    out = []
    for stage in STAGES:
        metrics = manifest["stages"].get(stage, {}).get("metrics") or {}
        for w in (metrics.get("fit") or {}).get("warnings", []):
            out.append({"code": w["code"], "message": w["message"], "stage": stage})
    return out


def _result(run_dir: Path, timings: dict[str, float]) -> PipelineResult:
    adapter = run_dir / "training" / "adapter"
    report_dir = run_dir / "evaluation"
    report_path = report_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    artifacts = {"adapter": adapter, "train_set": run_dir / "training" / "train_set.jsonl"}
    if report:
        artifacts.update(
            report_json=report_path,
            report_md=report_dir / "report.md",
            report_plot=report_dir / "pw_pc.png",
        )
        if (report_dir / "answers.jsonl").exists():
            artifacts["answers"] = report_dir / "answers.jsonl"
        if (report_dir / OPERATING_POINT_PLOT).exists():
            artifacts["operating_point_plot"] = report_dir / OPERATING_POINT_PLOT
    selection = run_dir / "selection" / "selection.jsonl"
    if selection.exists():
        artifacts["selection"] = selection
    if (run_dir / "selection" / OPERATING_POINT).exists():
        artifacts["operating_point"] = run_dir / "selection" / OPERATING_POINT
    manifest = _read_manifest(run_dir) or {"stages": {}}
    return PipelineResult(run_dir, adapter, report, artifacts, timings, stage_warnings(manifest))


def load_train_set(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / "training" / "train_set.jsonl")
