"""One typed job spec for the whole pipeline.

The CLI, the service and the benchmarks all build this object, so a knob exists in one place
with one default. Defaults follow `docs/grait.md`; where the paper's value is for a 7B+
model on a GPU (LoRA rank, batch size) the default is scaled for a small model and says so.
This module imports no torch, so the web layer can validate specs with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from grait.methods import METHOD_NAMES as METHODS  # noqa: F401  (re-exported)
from grait.methods import METHODS as METHOD_TABLE
from grait.methods import method_spec

Method = Literal[
    "grait",
    "grait-noweight",
    "random-idk",
    "stratified-random",
    "craft",
    "craft-noflow",
    "craft-nocert",
    "rtuning",
    "van",
]
DataFormat = Literal["auto", "canonical", "mmlu", "arc", "nq", "openai_chat"]
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
REFUSAL = "I don't know."
# Every linear layer of a Llama-style block: the usual "all linear" LoRA target list.
ALL_LINEAR: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a spec must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Strict):
    """A QA file (or folder of MMLU CSVs) and how to read it."""

    path: str
    format: DataFormat = "auto"
    name: str | None = Field(None, description="Label in reports; defaults to the file name.")
    limit: int | None = Field(
        None,
        ge=1,
        description="Keep the first N records (after shuffling with the job seed when `shuffle`).",
    )
    offset: int = Field(
        0,
        ge=0,
        description="Skip the first N records (after shuffling); lets one file give disjoint train/eval parts.",
    )
    shuffle: bool = Field(
        True, description="Shuffle with the job seed before offset/limit, so excerpts mix subjects."
    )

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


DEFAULT_AUTO_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)


class AutoBudgetConfig(_Strict):
    """`knowledge.n_idk: auto`: pick the refusal budget by a target instead of a count.

    The budget sets the trade-off between refusing unknowns and over-refusing knowns more than
    anything else, and the right count depends on the data and model; a target on a held-out
    slice ("refuse at most 5% of the questions it knows") is what a user can state.
    """

    max_over_refusal: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Share of held-out known questions the trial model may refuse.",
    )
    validation_fraction: float = Field(
        0.2,
        gt=0.0,
        le=0.5,
        description="Share of the training set held out (stratified by known/unknown) to "
        "measure each budget; at most half, so the trial trainings still resemble the real one.",
    )
    fractions: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        default_factory=lambda: list(DEFAULT_AUTO_FRACTIONS),
        min_length=1,
        description="Budgets tried, as fractions of the unknown candidates left after the "
        "hold-out (ascending, deduplicated, at least 1 refusal each).",
    )
    min_validation_known: int = Field(
        10,
        ge=1,
        description="Fewer held-out known questions than this: too few to measure "
        "over-refusal, so the ik:idk ratio rule sets the budget (with a warning).",
    )


class KnowledgeConfig(_Strict):
    """Stage 1: ask the base model each training question."""

    scorer: Literal["auto", "letter", "cloze"] = Field(
        "auto",
        description="MCQA scorer; `auto` = cloze for models under 3B parameters, else letter.",
    )
    tau: float = Field(0.5, ge=0.0, le=1.0, description="c(x) >= tau means known (ik).")
    k_samples: int = Field(
        10, ge=1, le=64, description="OEQA: sampled answers per question (plus one greedy)."
    )
    temperature: float = Field(1.0, gt=0.0, description="OEQA sampling temperature.")
    max_new_tokens: int = Field(24, ge=1, le=1024, description="OEQA: tokens per sampled answer.")
    n_ik: int | None = Field(
        None, ge=0, description="Known samples kept (most certain first); None = all."
    )
    n_idk: Annotated[int, Field(ge=0)] | Literal["auto"] | None = Field(
        None,
        description="Unknown samples selected: a count; `auto` = the largest budget whose "
        "over-refusal on a held-out slice stays within `auto.max_over_refusal` (ranked methods "
        "only); None = n_ik / ik_idk_ratio.",
    )
    ik_idk_ratio: float = Field(
        4.0, gt=0.0, description="Default ik:idk budget ratio (release: 4000:1000)."
    )
    auto: AutoBudgetConfig = Field(
        default_factory=AutoBudgetConfig, description="Used when n_idk is `auto`."
    )
    batch_size: int = Field(16, ge=1, le=4096)
    token_budget: int | None = Field(
        None,
        ge=16,
        le=10_000_000,
        description="Cap on padded tokens per batch (prompts sorted by length fill each batch "
        "up to it, never beyond `batch_size` rows); None = `batch_size` rows whatever their length.",
    )

    @field_validator("n_idk", mode="before")
    @classmethod
    def _count_or_auto(cls, value: Any) -> Any:
        """One clear message (and the field's own location) instead of one per union member."""
        if value is None or value == "auto":
            return value
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not integral or value < 0:
            raise ValueError(f"expected a count >= 0, 'auto' or null, got {value!r}")
        return int(value)


class LoraConfigSpec(_Strict):
    """LoRA adapter shape. The release uses r=64 on an 8B model; r=8 suits 135M-1B on CPU."""

    r: int = Field(8, ge=1, le=1024)
    alpha: int = Field(16, ge=1, le=4096)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class WarmupConfig(_Strict):
    """Stage 2a: a short LoRA warm-up whose AdamW moments precondition the features."""

    data: Literal["known", "mixed"] = Field(
        "known",
        description="known: the kept known samples with their answers (as the authors' release); "
        "mixed: a random share of the RAIT data, refusals included.",
    )
    fraction: float = Field(0.05, gt=0.0, le=1.0, description="Share of the data trained on.")
    min_samples: int = Field(
        8, ge=1, le=100_000, description="Floor on the warm-up set size for small datasets."
    )
    epochs: int = Field(1, ge=1, le=100)
    learning_rate: float = Field(2e-4, gt=0.0)
    batch_size: int = Field(8, ge=1, le=4096)


class FeaturesConfig(_Strict):
    """Stage 2b: per-sample LoRA gradient features (LESS)."""

    dim: int = Field(8192, ge=8, le=2**24, description="Projection dimension d.")
    preconditioner: Literal["adam", "rms", "none"] = "adam"
    projection: Literal["sparse", "dense"] = Field(
        "sparse",
        description="sparse JL (hash + sign, blockwise) or a dense Gaussian matrix (small P only).",
    )
    sparse_blocks: int = Field(
        4, ge=1, description="s: each coordinate lands once in each of s blocks of d/s."
    )
    batch_size: int = Field(16, ge=1, le=4096)
    adam_eps: float = Field(1e-8, gt=0.0)
    target_tokens: Literal["all", "first"] = Field(
        "all",
        description="Which target tokens the per-sample loss covers: `first` = only the "
        "refusal's (or answer's) first token, where a question decides whether to refuse "
        "(quality-study.md); `all` = the whole target, as the paper.",
    )


class SelectionConfig(_Strict):
    """Stage 2c: the order in which unknowns become refusals (a budget takes a prefix).

    `coverage`: greedy facility location, mean_idk max_S k − lam·mean_ik max_S k with
    k = max(0, cos) on centred features. `score`: the paper's linear score
    I_idk − lam·I_ik + mu·VAN − rho·max_sim (a top-n when rho = 0). `neighbourhood`: a random
    order with weights (u/(1−u))^tilt, u the unknown share of a candidate's nearest training
    questions (random-idk at tilt 0). `share`: clusters of all training questions' features;
    picks apportioned to clusters by (unknowns − lam·knowns), random within a cluster.
    """

    strategy: Literal["coverage", "score", "neighbourhood", "share"] = "coverage"
    lam: float = Field(1.0, description="Weight of the over-refusal (known-sample) term.")
    mu: float = Field(1.0, description="score: weight of the agreement with kept ik answers.")
    rho: float = Field(0.0, description="score: weight of the redundancy penalty.")
    centre: bool = Field(
        True,
        description="Subtract the mean feature before comparing (removes the shared refusal direction).",
    )
    candidate_features: Literal["raw", "preconditioned"] = Field(
        "raw", description="coverage/stratified: which refusal features describe a candidate."
    )
    neighbours: int = Field(
        10, ge=1, le=1000, description="neighbourhood: nearest training questions per candidate."
    )
    tilt: float = Field(
        1.0,
        ge=0.0,
        le=20.0,
        description="neighbourhood: exponent on the unknown odds (0 = a uniform random order).",
    )
    max_references: int = Field(
        4096,
        ge=1,
        description="coverage: unknowns/knowns compared against (seeded sample above this).",
    )
    clusters: int | None = Field(
        None,
        ge=1,
        description="stratified-random and share: clusters; None = about sqrt(n/2) (n: the "
        "candidates, or for share all training questions).",
    )
    block_rows: int = Field(
        4096, ge=1, le=1_000_000, description="Rows per block when streaming stored features."
    )


class WeightingConfig(_Strict):
    """Stage 3: w = N * softmax(-(I_ik - I_idk)/T), clipped.

    `relative` (default): T = relative_temperature * std(alpha) over the candidates, so the
    spread of the weights does not depend on the scale of the influence terms. `absolute`:
    T = temperature (the paper's 0.05).
    """

    temperature_scale: Literal["relative", "absolute"] = "relative"
    relative_temperature: float = Field(1.0, gt=0.0)
    temperature: float = Field(0.05, gt=0.0)
    w_min: float = Field(0.1, ge=0.0)
    w_max: float = Field(5.0, gt=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> WeightingConfig:
        if self.w_min > self.w_max:
            raise ValueError(f"w_min ({self.w_min}) must not exceed w_max ({self.w_max})")
        return self


class CraftConfig(_Strict):
    """CRaFT (arXiv 2410.06913): a rehearsal LoRA on the surest knowns, then Stage 1 again.

    Unknowns whose correctness rises after the rehearsal ("knowledge flow": the model could
    learn them from what it knows) are not made refusals. The release rehearsed on up to 1000
    questions with correctness > 0.99; a model that is that sure of fewer than
    `rehearsal_min_samples` questions rehearses on its `rehearsal_min_samples` surest knowns.
    """

    rehearsal_min_correctness: float = Field(0.99, ge=0.0, le=1.0)
    rehearsal_max_samples: int = Field(1000, ge=1, le=1_000_000)
    rehearsal_min_samples: int = Field(16, ge=1, le=1_000_000)
    rehearsal_epochs: float = Field(1.0, gt=0.0, le=1000.0)
    rehearsal_learning_rate: float = Field(2e-4, gt=0.0)
    max_delta: float = Field(
        0.0,
        ge=-1.0,
        le=1.0,
        description="An unknown stays a refusal candidate when its correctness change after "
        "the rehearsal is <= this (the paper: < 0 on continuous MCQA scores; sampled OEQA "
        "correctness is often exactly 0 before and after, which a strict < 0 would drop).",
    )


class FitCheckConfig(_Strict):
    """After training: does the adapter give its training targets? (One teacher-forced pass.)

    A job whose adapter barely moved still "succeeds"; this check makes that visible as a
    warning (`refusal_not_learned`, `answers_not_kept`) in the events, report and job object.
    """

    enabled: bool = True
    max_rows: int = Field(
        256, ge=1, le=100_000, description="Training rows probed per kind (a seeded sample)."
    )
    min_refusal_learned: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Warn below this share of training refusals the tuned model gives.",
    )
    min_answers_kept: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Warn below this share of known training answers the tuned model gives.",
    )


class AutoEpochsConfig(_Strict):
    """How `epochs: auto` scales with the training set (see `grait.training.auto_epochs`)."""

    epochs: float = Field(
        3.0, gt=0.0, le=1000.0, description="Epochs for a set large enough to need no more."
    )
    min_steps: int = Field(
        48,
        ge=1,
        le=1_000_000,
        description="Floor on optimizer steps: small sets get more epochs to reach it.",
    )
    max_epochs: float = Field(
        25.0, gt=0.0, le=1000.0, description="Ceiling on epochs, whatever the set size."
    )


class TrainingConfig(_Strict):
    """Weighted LoRA SFT. Release: lr 2e-4, cosine, 3% warm-up, 3 epochs, batch 16, clip 1.

    `epochs: auto` (default) keeps the release's 3 epochs but gives small sets enough
    optimizer steps to learn the refusal at all (`auto` holds the rule's knobs).
    """

    epochs: float | Literal["auto"] = Field(
        "auto", description="Passes over the training set (0-1000], or auto (from its size)."
    )
    auto: AutoEpochsConfig = Field(default_factory=AutoEpochsConfig)
    fit_check: FitCheckConfig = Field(default_factory=FitCheckConfig)
    max_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Fixed optimizer steps whatever the set size (overrides epochs).",
    )
    learning_rate: float = Field(2e-4, gt=0.0)
    batch_size: int = Field(16, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    max_length: int = Field(
        512,
        ge=16,
        le=32_768,
        description="Prompt + answer tokens; longer prompts are cut from the left.",
    )
    grad_clip: float = Field(1.0, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)

    @field_validator("epochs", mode="before")
    @classmethod
    def _epochs(cls, value: Any) -> Any:
        """One error on `epochs` itself (a union would report one per member)."""
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PydanticCustomError("epochs", "epochs must be a number in (0, 1000] or 'auto'")
        if not 0 < value <= 1000:
            raise PydanticCustomError("epochs", "epochs must be a number in (0, 1000] or 'auto'")
        return float(value)


class EvalConfig(_Strict):
    """Greedy generation with the RAIT prompt, scored as correct / wrong / refused."""

    max_new_tokens: int = Field(24, ge=1, le=1024)
    batch_size: int = Field(16, ge=1, le=4096)
    token_budget: int | None = Field(
        None,
        ge=16,
        le=10_000_000,
        description="Cap on padded tokens per batch of the evaluation's generation (prompt + "
        "new tokens) and of the teacher-forced passes (fit check, `auto` budget probes); None = "
        "`batch_size` rows whatever their length.",
    )
    eval_base_refuse_prompt: bool = Field(
        True, description="Also report the base model told it may refuse (Init-Refuse)."
    )
    bias_curve: bool = Field(
        True,
        description="Also report what a refusal bias would do on each eval set (two "
        "teacher-forced passes per question): the bias meeting each over-refusal level.",
    )


class DecodingConfig(_Strict):
    """How the tuned model decodes, in our evaluation and wherever its adapter is served.

    `refusal_bias` is added to the logit of the refusal's first token at the first generated
    position (greedy otherwise): above 0 it refuses more, below 0 less, with no retraining.
    It is stored with the adapter (`decoding.json`); the report's "Refusal bias" table shows
    what each value does on the eval sets (grait/refusal_bias.py).
    """

    refusal_bias: float | Literal["auto"] = Field(
        0.0,
        description="Logit bias on the refusal's first token at the first step (0 = greedy), "
        "or `auto`: with `knowledge.n_idk: auto`, each tried budget's trial adapter gets the "
        "bias that keeps over-refusal on the held-out slice within "
        "`knowledge.auto.max_over_refusal`, and the budget whose biased trial refuses the most "
        "held-out unknowns wins, with its bias.",
    )

    @field_validator("refusal_bias", mode="before")
    @classmethod
    def _number_or_auto(cls, value: Any) -> Any:
        """One clear message (and the field's own location) instead of one per union member."""
        if value == "auto":
            return value
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not -30.0 <= value <= 30.0:
            raise ValueError(f"expected a logit bias in [-30, 30] or 'auto', got {value!r}")
        return float(value)


class LoadingConfig(_Strict):
    """How the frozen base model sits in memory: what lets a 7-8B model fit one GPU (QLoRA).

    4-bit is the paper's setting (NF4, bf16 compute, LoRA r=64 on top); quantisation needs
    CUDA and the `bitsandbytes` package, and is refused with a clear error elsewhere.
    """

    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="Load the base weights in 8 or 4 bit (bitsandbytes; CUDA only)."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="4-bit: also quantise the quantisation scales.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in the backward pass (less memory, ~1/3 more "
        "compute); auto = on when the base model is quantised.",
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto = PyTorch SDPA (flash/memory-efficient on GPU)."
    )

    @property
    def checkpointing(self) -> bool:
        if self.gradient_checkpointing == "auto":
            return self.quantization != "none"
        return bool(self.gradient_checkpointing)


class JobConfig(_Strict):
    """Everything a GRAIT (or baseline) run needs; `grait run` reads it from YAML."""

    method: Method = "random-idk"  # the evidence: bench/results/tradeoff*/
    base_model: str = Field(DEFAULT_BASE_MODEL, description="Alias, local HF directory or hub id.")
    train: DatasetSpec
    evals: list[DatasetSpec] = Field(default_factory=list, description="First = in-distribution.")
    seed: int = 0
    refusal: str = REFUSAL
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    loading: LoadingConfig = Field(default_factory=LoadingConfig)
    knowledge: KnowledgeConfig = Field(default_factory=KnowledgeConfig)
    lora: LoraConfigSpec = Field(default_factory=LoraConfigSpec)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)
    craft: CraftConfig = Field(default_factory=CraftConfig, description="craft* methods only.")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)

    @field_validator("knowledge")
    @classmethod
    def _auto_budget_needs_a_ranking(
        cls, value: KnowledgeConfig, info: ValidationInfo
    ) -> KnowledgeConfig:
        """`auto` tries budgets along the method's ranking; other methods have no budget."""
        method = info.data.get("method")
        if value.n_idk != "auto" or method not in METHOD_TABLE:
            return value
        if METHOD_TABLE[method].refusals == "ranked":
            return value
        ranked = ", ".join(n for n, m in METHOD_TABLE.items() if m.refusals == "ranked")
        uses = (
            "every unknown as a refusal"
            if METHOD_TABLE[method].refusals == "all"
            else "no refusals"
        )
        error = PydanticCustomError(
            "auto_budget_unranked",
            f"'auto' picks how many ranked unknowns become refusals; method {method!r} trains "
            f"{uses}, so it has no budget to pick. Use it with {ranked}, or leave n_idk unset",
        )
        # Raised as a ValidationError so the location names the field: knowledge.n_idk.
        raise ValidationError.from_exception_data(
            "KnowledgeConfig", [InitErrorDetails(type=error, loc=("n_idk",), input="auto")]
        )

    @field_validator("decoding")
    @classmethod
    def _auto_bias_needs_the_auto_budget(
        cls, value: DecodingConfig, info: ValidationInfo
    ) -> DecodingConfig:
        """An `auto` bias is measured on the `auto` budget's held-out slice and trial adapters."""
        knowledge = info.data.get("knowledge")
        if value.refusal_bias != "auto" or knowledge is None or knowledge.n_idk == "auto":
            return value
        error = PydanticCustomError(
            "auto_bias_without_auto_budget",
            "'auto' chooses the refusal bias on the held-out slice that `knowledge.n_idk: auto` "
            "trains its trial adapters without; set knowledge.n_idk to auto as well (with a "
            "ranked method; random-idk at fraction 1.0 is R-Tuning), or give a number",
        )
        raise ValidationError.from_exception_data(
            "DecodingConfig", [InitErrorDetails(type=error, loc=("refusal_bias",), input="auto")]
        )

    @field_validator("refusal")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the refusal target must not be empty")
        return value

    @property
    def uses_features(self) -> bool:
        """Only the methods that rank or cluster by gradients pay for Stage 2."""
        return method_spec(self.method).uses_features

    @classmethod
    def from_yaml(cls, path: str | Path) -> JobConfig:
        """Read a spec; relative data paths resolve against the YAML file's folder."""
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise TypeError(f"{path}: expected a mapping at the top level")
        base = path.resolve().parent
        for spec in [raw.get("train")] + list(raw.get("evals") or []):
            if isinstance(spec, dict) and "path" in spec and not Path(spec["path"]).is_absolute():
                spec["path"] = str((base / spec["path"]).resolve())
        return cls.model_validate(raw)
