"""Weighted LoRA SFT on the Hugging Face Trainer (used for the warm-up and the final tuning).

The loss is taken on answer tokens only, and each sample's mean token loss is scaled by its
GRAIT weight: batch loss = sum_i w_i * L_i / B (grait.md, "Stage 3"). Everything else —
optimizer, schedule, clipping, device placement — is the Trainer's own.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from grait.config import LoraConfigSpec
from grait.events import Cancelled
from grait.models import loading_of
from grait.prompts import Batch, Encoded, answer_logits, collate, per_sample_answer_loss
from grait.schedule import auto_epochs, steps_per_epoch  # noqa: F401  (re-exported)

# Raised by Trainer's own internals on every run; nothing a caller can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass(frozen=True)
class WeightedExample:
    encoded: Encoded
    weight: float


class WeightedCollator:
    """Right-padded batch plus a `weights` tensor the Trainer passes through untouched."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: Sequence[WeightedExample]) -> dict[str, torch.Tensor]:
        batch = collate([it.encoded for it in items], self.pad_id)
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "labels": batch.labels,
            "weights": torch.tensor([it.weight for it in items], dtype=torch.float32),
        }


class WeightedLossTrainer(Trainer):
    """Trainer whose loss is the weighted mean of per-sample answer-token losses."""

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        weights = inputs.pop("weights")
        batch = Batch(inputs["input_ids"], inputs["attention_mask"], inputs.pop("labels"))
        logits, labels = answer_logits(model, batch)
        per_sample = per_sample_answer_loss(logits, labels)
        loss = (weights.to(per_sample.dtype) * per_sample).sum() / per_sample.numel()
        return (loss, {"logits": logits}) if return_outputs else loss


class _Progress(TrainerCallback):
    """Forwards step progress and losses, and stops training when the caller cancels."""

    def __init__(
        self,
        on_step: Callable[[int, int], None],
        on_loss: Callable[[int, float], None],
        should_cancel: Callable[[], bool],
    ):
        self.on_step = on_step
        self.on_loss = on_loss
        self.should_cancel = should_cancel
        self.cancelled = False

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.on_step(state.global_step, state.max_steps)
        if self.should_cancel():
            self.cancelled = True
            control.should_training_stop = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kw: Any,
    ) -> None:
        if logs and "loss" in logs:
            self.on_loss(state.global_step, float(logs["loss"]))


@dataclass(frozen=True)
class TrainSettings:
    epochs: float
    learning_rate: float
    batch_size: int
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int | None = (
        None  # fixes the optimizer steps whatever the set size (overrides epochs)
    )


def lora_config(spec: LoraConfigSpec) -> LoraConfig:
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


@contextmanager
def attached_lora(
    base: PreTrainedModel,
    *,
    spec: LoraConfigSpec | None = None,
    adapter_dir: Path | None = None,
    trainable: bool = True,
) -> Iterator[PeftModel]:
    """Wrap the (shared, cached) base model with LoRA and always take the LoRA layers off again.

    The worker keeps one base model for many jobs; leaving layers injected would leak one
    job's adapter into the next.
    """
    use_cache = base.config.use_cache  # Trainer turns the KV cache off; generation needs it back
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    else:
        assert spec is not None
        model = get_peft_model(base, lora_config(spec))
    try:
        yield model
    finally:
        model.unload()
        if hasattr(base, "peft_config"):
            del base.peft_config
        base.config.use_cache = use_cache
        base.eval()
        for p in base.parameters():
            p.requires_grad_(False)


def _base_of(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@contextmanager
def activation_checkpointing(model: torch.nn.Module, *, enabled: bool) -> Iterator[None]:
    """Recompute each decoder layer's activations in the backward pass, for this block only.

    On for training passes when `loading.checkpointing` (the QLoRA setting): peft's
    `prepare_model_for_kbit_training` turns it on for good, but every inference pass of the
    shared base model (knowledge query, features, evaluation) would then pay for a flag it
    does not use, so it is switched off again on the way out. Non-reentrant checkpointing
    gives the LoRA weights inside a checkpointed layer their gradients whether or not the
    layer's input requires grad; the embedding output is made to require grad anyway, as
    peft does, so a frozen first layer never cuts the graph.
    """
    if not enabled:
        yield
        return
    base = _base_of(model)
    use_cache = base.config.use_cache
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # the newer name; the old one warns
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Some transformers versions hook the embeddings in the call above and some do not:
    # replace whatever they did with exactly one hook, so the exit below removes it.
    base.disable_input_require_grads()
    base.enable_input_require_grads()
    base.config.use_cache = False  # a KV cache is never read in training; it would warn per step
    try:
        yield
    finally:
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()
        base.disable_input_require_grads()
        base.config.use_cache = use_cache


def train_weighted(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[WeightedExample],
    settings: TrainSettings,
    *,
    work_dir: Path,
    on_step: Callable[[int, int], None] = lambda done, total: None,
    on_loss: Callable[[int, float], None] = lambda step, loss: None,
    should_cancel: Callable[[], bool] = lambda: False,
) -> Trainer:
    """Run the Trainer; return it so callers can read the optimizer state (warm-up) or logs."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    per_epoch = steps_per_epoch(
        len(examples), settings.batch_size, settings.gradient_accumulation_steps
    )
    total_steps = settings.max_steps or max(1, math.ceil(per_epoch * settings.epochs))
    args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=round(settings.warmup_ratio * total_steps),
        max_grad_norm=settings.grad_clip,
        weight_decay=settings.weight_decay,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=settings.seed,
        data_seed=settings.seed,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda" and dtype == torch.bfloat16,
    )
    progress = _Progress(on_step, on_loss, should_cancel)
    trainer = WeightedLossTrainer(
        model=model,
        args=args,
        train_dataset=list(examples),
        data_collator=WeightedCollator(tokenizer.pad_token_id),
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through our callback, not stdout
    with activation_checkpointing(model, enabled=loading_of(model).checkpointing):
        trainer.train()
    model.eval()
    if progress.cancelled:
        raise Cancelled("training stopped at a step boundary on request")
    return trainer
