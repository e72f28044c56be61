"""Every prompt the pipeline shows a model, and how prompt + target become token ids.

Keeping the templates in one module guarantees that the knowledge query, the gradient
features, training and evaluation all see the same wording: a mismatch would make the
features describe a different task from the one being trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from grait.data import QARecord
from grait.messages import (  # noqa: F401  (re-exported: the templates live there, torch-free)
    CLOZE_INSTRUCTION,
    MCQA_INSTRUCTION,
    OEQA_INSTRUCTION,
    REFUSAL_INSTRUCTION,
    cloze_message,
    question_message,
)


def render_prompt(tokenizer: PreTrainedTokenizerBase, user_message: str) -> str:
    """The model's own chat template when it has one, else a plain Q/A layout."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
        )
    return f"{user_message}\n\nAnswer: "


def end_of_answer(tokenizer: PreTrainedTokenizerBase) -> str:
    """What closes an answer: the end-of-turn token, so a tuned model learns to stop."""
    return tokenizer.eos_token or ""


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + target; loss is taken on ids[n_prompt:]."""

    ids: list[int]
    n_prompt: int

    @property
    def n_target(self) -> int:
        return len(self.ids) - self.n_prompt


def encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, *, max_length: int
) -> Encoded:
    """Tokenise prompt and target apart (so the boundary is exact); cut the prompt's left end."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not t:
        raise ValueError(f"target {target!r} encodes to no tokens")
    t = t[: max_length - 1]
    room = max_length - len(t)
    if len(p) > room:
        p = p[len(p) - room :]
    return Encoded(p + t, len(p))


def encode_training_pair(
    tokenizer: PreTrainedTokenizerBase,
    record: QARecord,
    target: str,
    *,
    refusal: str,
    max_length: int,
) -> Encoded:
    """A RAIT example: the refusal-allowed prompt followed by the answer or the refusal."""
    prompt = render_prompt(tokenizer, question_message(record, allow_refusal=True, refusal=refusal))
    return encode(tokenizer, prompt, target + end_of_answer(tokenizer), max_length=max_length)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device)
        )


def first_target_token(item: Encoded) -> Encoded:
    """The same example with only its target's first token: a loss on that token alone."""
    return Encoded(item.ids[: item.n_prompt + 1], item.n_prompt)


def collate(items: Sequence[Encoded], pad_id: int) -> Batch:
    """Right-pad a batch; masks come from lengths, never from `ids != pad_id`.

    SmolLM2's pad token is its end-of-turn token, which also ends every answer, so a mask
    built from ids would hide the very token that teaches the model to stop.
    """
    width = max(len(e.ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        mask[row, :n] = 1
        labels[row, e.n_prompt : n] = ids[row, e.n_prompt : n]
    return Batch(ids, mask, labels)


def per_sample_answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each sample's answer tokens: shape [B]."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != -100).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def answer_logits(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits only from the first column that predicts an answer token on, and labels cut to match.

    Prompt positions never enter the answer loss, yet the LM head over them costs a large
    share of a small model's pass (SmolLM2-135M: a 576 x 49152 matmul per position plus a
    [B, T, vocab] float tensor). HF causal LMs take `logits_to_keep` (a tensor of positions);
    a model that rejects or ignores it gets full logits and full labels, so results are the
    same either way. `per_sample_answer_loss(*answer_logits(model, batch))` equals the
    full-logit loss.
    """
    width = batch.input_ids.shape[1]
    answer_cols = (batch.labels != -100).any(dim=0).nonzero()
    start = max(0, int(answer_cols[0]) - 1) if len(answer_cols) else 0
    if start > 0:
        keep = torch.arange(start, width, device=batch.input_ids.device)
        try:
            logits = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep
            ).logits
        except TypeError:
            logits = None
        if logits is not None:
            if logits.shape[1] == width - start:
                return logits, batch.labels[:, start:]
            if logits.shape[1] == width:
                return logits, batch.labels
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits, batch.labels
