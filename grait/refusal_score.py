"""Refusal scores from teacher-forced passes: what greedy decoding would say, without decoding.

Greedy generation is the slowest part of an evaluation (one forward pass per new token), and
its outcome is a coarse three-way label. For each question we instead run the RAIT prompt
followed by two targets — the refusal and the gold answer — once each, and read off:

- whether greedy decoding would emit that target (every target token is the arg-max given
  the prompt and the target's earlier tokens). For an exact refusal or an exact gold answer
  this is exactly what greedy decoding starts with, so the outcome `refused` / `correct` /
  `wrong` matches a generation scored against those targets; variants ("I'm not sure",
  a paraphrased answer) count as wrong here, so agreement with generation is measured rather
  than assumed (bench.quality reports it);
- a continuous score, log p(refusal) − log p(gold answer): how much more the model leans to
  refusing than to answering. Its AUROC for known-vs-unknown questions is threshold-free and
  far less noisy than greedy outcomes on a few hundred questions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grait.batching import budget_batches
from grait.data import QARecord
from grait.prompts import (
    Encoded,
    answer_logits,
    collate,
    encode,
    question_message,
    render_prompt,
)
from grait.refusal_bias import AnswerStart, FirstStep
from grait.scoring import Outcome


@dataclass(frozen=True)
class TargetScore:
    """One prompt + target: the target's summed log-probability and whether greedy emits it."""

    logprob: float
    greedy: bool


def score_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 32,
    token_budget: int | None = None,
    max_length: int = 512,
    tick: Callable[[int], None] | None = None,
) -> list[TargetScore]:
    """Teacher-forced log p(target | prompt) and greedy agreement, batched."""
    if len(prompts) != len(targets):
        raise ValueError("one target per prompt")
    encoded = [encode(tokenizer, p, t, max_length=max_length) for p, t in zip(prompts, targets)]
    return score_encoded(
        model,
        encoded,
        pad_id=tokenizer.pad_token_id,
        batch_size=batch_size,
        token_budget=token_budget,
        tick=tick,
    )


@torch.no_grad()
def score_encoded(
    model: PreTrainedModel,
    encoded: Sequence[Encoded],
    *,
    pad_id: int,
    batch_size: int = 32,
    token_budget: int | None = None,
    tick: Callable[[int], None] | None = None,
) -> list[TargetScore]:
    """The same on token ids: each item's target is ids[n_prompt:].

    With `token_budget` a batch also holds at most that many padded tokens, over items taken
    in length order; scores come back in input order either way.
    """
    device = next(model.parameters()).device
    order = list(range(len(encoded)))
    if token_budget is not None:  # a budget packs well only over length-sorted items
        order.sort(key=lambda i: len(encoded[i].ids))
    batches = budget_batches(
        order,
        [len(e.ids) for e in encoded],
        batch_size=batch_size,
        token_budget=token_budget,
    )
    scores: dict[int, TargetScore] = {}
    for idx in batches:
        batch = collate([encoded[i] for i in idx], pad_id).to(device)
        logits, labels = answer_logits(model, batch)
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        mask = labels != -100
        safe = labels.clamp(min=0)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        hit = (logits.argmax(dim=-1) == safe) | ~mask
        total = (logp * mask).sum(dim=1)
        greedy = hit.all(dim=1)
        for i, t, g in zip(idx, total.cpu(), greedy.cpu()):
            scores[i] = TargetScore(float(t), bool(g))
        if tick:
            tick(len(scores))
    return [scores[i] for i in range(len(encoded))]


@dataclass(frozen=True)
class RefusalProbe:
    """Per question: the greedy-equivalent outcome and log p(refusal) − log p(gold)."""

    outcomes: list[Outcome]
    scores: np.ndarray


def probe_refusals(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[QARecord],
    *,
    refusal: str,
    batch_size: int = 32,
    token_budget: int | None = None,
    max_length: int = 512,
) -> RefusalProbe:
    """Two teacher-forced passes per question under the RAIT (refusal-allowed) prompt."""
    prompts = [
        render_prompt(tokenizer, question_message(r, allow_refusal=True, refusal=refusal))
        for r in records
    ]

    def score(targets: list[str]) -> list[TargetScore]:
        return score_targets(
            model,
            tokenizer,
            prompts,
            targets,
            batch_size=batch_size,
            token_budget=token_budget,
            max_length=max_length,
        )

    refuse = score([refusal] * len(records))
    answer = score([r.answer_text for r in records])
    outcomes: list[Outcome] = [
        "refused" if r.greedy else "correct" if a.greedy else "wrong"
        for r, a in zip(refuse, answer)
    ]
    scores = np.array([r.logprob - a.logprob for r, a in zip(refuse, answer)])
    return RefusalProbe(outcomes, scores)


def auroc(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half.

    Positives are the unknown questions (they should get the higher refusal score). NaN when
    one class is empty.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # Average ranks over ties (Mann-Whitney U).
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


# ---- the first step, for the refusal bias (grait.refusal_bias) ------------------------------


@torch.no_grad()
def _pass(
    model: PreTrainedModel,
    encoded: Sequence[Encoded],
    first_tokens: Sequence[int],
    *,
    pad_id: int,
    batch_size: int,
    token_budget: int | None,
) -> list[tuple[float, bool, bool, bool]]:
    """Per item: (first-step margin of its refusal token, target's first token is the top
    non-refusal token, target's first token is the refusal token, later target tokens greedy)."""
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    batches = budget_batches(
        order, [len(e.ids) for e in encoded], batch_size=batch_size, token_budget=token_budget
    )
    out: dict[int, tuple[float, bool, bool, bool]] = {}
    for idx in batches:
        batch = collate([encoded[i] for i in idx], pad_id).to(device)
        logits, labels = answer_logits(model, batch)
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        mask = labels != -100
        first = mask.float().argmax(dim=1)  # column of each row's first target token
        rows = torch.arange(len(idx), device=device)
        step = logits[rows, first]  # [B, vocab]: the first generated step
        r1 = torch.tensor([first_tokens[i] for i in idx], device=device)
        t1 = labels[rows, first]
        ref_logit = step[rows, r1]
        others = step.clone()
        others[rows, r1] = float("-inf")
        margin = ref_logit - others.max(dim=1).values
        top_other = (others.argmax(dim=1) == t1) & (t1 != r1)
        is_ref = t1 == r1
        safe = labels.clamp(min=0)
        hit = (logits.argmax(dim=-1) == safe) | ~mask
        hit[rows, first] = True  # the first step is judged by the margin, not here
        rest = hit.all(dim=1)
        for j, i in enumerate(idx):
            out[i] = (float(margin[j]), bool(top_other[j]), bool(is_ref[j]), bool(rest[j]))
    return [out[i] for i in range(len(encoded))]


def probe_first_step(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[QARecord],
    *,
    refusal: str,
    batch_size: int = 32,
    token_budget: int | None = None,
    max_length: int = 512,
) -> list[FirstStep]:
    """Two teacher-forced passes per question under the RAIT (refusal-allowed) prompt."""
    prompts = [
        render_prompt(tokenizer, question_message(r, allow_refusal=True, refusal=refusal))
        for r in records
    ]
    refuse = [encode(tokenizer, p, refusal, max_length=max_length) for p in prompts]
    answer = [
        encode(tokenizer, p, r.answer_text, max_length=max_length) for p, r in zip(prompts, records)
    ]
    first = [e.ids[e.n_prompt] for e in refuse]
    kw = {"pad_id": tokenizer.pad_token_id, "batch_size": batch_size, "token_budget": token_budget}
    ref = _pass(model, refuse, first, **kw)
    ans = _pass(model, answer, first, **kw)
    probes = []
    for (margin, _, _, ref_rest), (_, top_other, is_ref, ans_rest) in zip(ref, ans):
        start: AnswerStart = "refusal_token" if is_ref else "top_other" if top_other else "not_top"
        probes.append(FirstStep(margin, ref_rest, start, ans_rest))
    return probes
