"""Batched text generation, greedy or sampled, with left padding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import overload

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from grait.batching import budget_batches


class FirstStepBias(LogitsProcessor):
    """Adds `bias` to one token's logit at the first generated position only.

    `prompt_len` is the (left-padded) prompt width of the batch: the first call sees exactly
    that many columns. Used for the refusal bias (grait.refusal_bias).
    """

    def __init__(self, token_id: int, bias: float, prompt_len: int) -> None:
        self.token_id = token_id
        self.bias = bias
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] == self.prompt_len and self.bias != 0.0:
            scores = scores.clone()
            scores[:, self.token_id] += self.bias
        return scores


@overload
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    token_budget: int | None = None,
    num_samples: None = None,
    temperature: float = 1.0,
    first_step_bias: tuple[int, float] | None = None,
    tick: Callable[[int], None] | None = None,
) -> list[str]: ...


@overload
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    token_budget: int | None = None,
    num_samples: int,
    temperature: float = 1.0,
    first_step_bias: tuple[int, float] | None = None,
    tick: Callable[[int], None] | None = None,
) -> list[list[str]]: ...


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    token_budget: int | None = None,
    num_samples: int | None = None,
    temperature: float = 1.0,
    first_step_bias: tuple[int, float] | None = None,
    tick: Callable[[int], None] | None = None,
) -> list[str] | list[list[str]]:
    """Greedy when `num_samples` is None (one string per prompt), else that many samples each.

    Prompts are sorted by length so a batch pads little; results come back in input order.
    A batch holds at most `batch_size` prompts and, with `token_budget`, at most that many
    padded tokens: rows (prompts x samples) x (longest prompt + `max_new_tokens`), the
    length the KV cache reaches. `first_step_bias=(token, b)` adds b to that token's logit at
    the first generated position (grait.refusal_bias: the refusal bias).
    """
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[object] = [None] * len(prompts)
    eos = [t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None]
    was_training = model.training
    model.eval()
    done = 0
    batches = budget_batches(
        order,
        [len(e) + max_new_tokens for e in encoded],
        batch_size=batch_size,
        token_budget=token_budget,
        rows_per_item=num_samples or 1,
    )
    for idx in batches:
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        sampling = num_samples is not None
        processors = LogitsProcessorList()
        if first_step_bias is not None and first_step_bias[1] != 0.0:
            processors.append(FirstStepBias(*first_step_bias, prompt_len=width))
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=None,
            top_k=None,
            num_return_sequences=num_samples or 1,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=processors,
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        for row, i in enumerate(idx):
            if sampling:
                results[i] = texts[row * num_samples : (row + 1) * num_samples]
            else:
                results[i] = texts[row]
        done += len(idx)
        if tick:
            tick(done)
    if was_training:
        model.train()
    return results  # type: ignore[return-value]
