"""Stage 1 — knowledge query: which training questions does the base model already know?

grait.md, "Stage 1": MCQA correctness c(x) is the probability the model gives the gold
option, normalised over the options (`letter`: next-token probability of each letter;
`cloze`: length-normalised log-likelihood of each option's text). OEQA correctness is the
fraction of k sampled answers (plus one greedy) judged correct. ik = {c >= tau}.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grait.batching import budget_batches
from grait.config import KnowledgeConfig
from grait.data import QARecord
from grait.generation import generate
from grait.prompts import (
    answer_logits,
    cloze_message,
    collate,
    encode,
    end_of_answer,
    per_sample_answer_loss,
    question_message,
    render_prompt,
)
from grait.scoring import normalize_answer, oeqa_correct

Tick = Callable[[int], None]  # called with the number of questions just finished


@dataclass(frozen=True)
class KnowledgeResult:
    """What the base model knows about one question."""

    id: str
    correctness: float
    certainty: float
    prediction: str
    known: bool

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def certainty_from_distribution(probs: np.ndarray) -> float:
    """1 - normalised entropy: 1 for a one-hot answer, 0 for a uniform one."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    if len(p) < 2:
        return 1.0
    entropy = float(-(p * np.log(p)).sum())
    return max(0.0, 1.0 - entropy / math.log(len(p)))


def choose_scorer(scorer: str, n_parameters: int) -> str:
    """`auto`: small models' letter probabilities are near-uniform (models.md), so use cloze."""
    if scorer != "auto":
        return scorer
    return "cloze" if n_parameters < 3_000_000_000 else "letter"


@torch.no_grad()
def score_options_cloze(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[QARecord],
    *,
    batch_size: int,
    token_budget: int | None = None,
    max_length: int = 512,
    tick: Tick | None = None,
) -> list[np.ndarray]:
    """Per record, softmax over options of each option text's mean token log-likelihood.

    Every option is its own sequence, so `batch_size` and `token_budget` count options.
    """
    pairs: list[tuple[int, int]] = []
    encoded = []
    eoa = end_of_answer(tokenizer)
    for ri, rec in enumerate(records):
        prompt = render_prompt(tokenizer, cloze_message(rec))
        for oi, text in enumerate(rec.options):
            pairs.append((ri, oi))
            encoded.append(encode(tokenizer, prompt, text + eoa, max_length=max_length))
    # Sorting by length keeps padding (wasted compute) small.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    scores = np.zeros(len(encoded))
    device = next(model.parameters()).device
    done_options = 0
    options_per_record = max(1, len(encoded) // max(1, len(records)))
    lengths = [len(e.ids) for e in encoded]
    for idx in budget_batches(order, lengths, batch_size=batch_size, token_budget=token_budget):
        batch = collate([encoded[i] for i in idx], tokenizer.pad_token_id).to(device)
        loss = per_sample_answer_loss(*answer_logits(model, batch))
        scores[idx] = (-loss).cpu().numpy()
        done_options += len(idx)
        if tick:
            tick(min(len(records), done_options // options_per_record))
    out: list[np.ndarray] = [np.zeros(len(r.options)) for r in records]
    for (ri, oi), s in zip(pairs, scores):
        out[ri][oi] = s
    return [_softmax(s) for s in out]


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def letter_token_ids(tokenizer: PreTrainedTokenizerBase, label: str) -> list[int]:
    """Single-token spellings of a letter ("A", " A"); multi-token spellings are skipped."""
    ids = set()
    for spelling in (label, " " + label):
        toks = tokenizer(spelling, add_special_tokens=False)["input_ids"]
        if len(toks) == 1:
            ids.add(toks[0])
    return sorted(ids)


@torch.no_grad()
def score_options_letter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[QARecord],
    *,
    batch_size: int,
    token_budget: int | None = None,
    refusal: str,
    tick: Tick | None = None,
) -> list[np.ndarray]:
    """Per record, the next-token probability of each option letter, normalised over options."""
    device = next(model.parameters()).device
    prompts = [
        render_prompt(tokenizer, question_message(r, allow_refusal=False, refusal=refusal))
        for r in records
    ]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = list(range(len(records)))
    if token_budget is not None:  # a budget packs well only over length-sorted prompts
        order.sort(key=lambda i: len(encoded[i]))
    batches = budget_batches(
        order, [len(e) for e in encoded], batch_size=batch_size, token_budget=token_budget
    )
    out: list[np.ndarray] = [np.zeros(0)] * len(records)
    done = 0
    for chunk in batches:
        enc = [encoded[i] for i in chunk]
        width = max(len(e) for e in enc)
        # Left padding puts every prompt's last token in the final column.
        ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(enc):
            ids[row, width - len(e) :] = torch.tensor(e)
            mask[row, width - len(e) :] = 1
        logits = (
            model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1, :].float()
        )
        probs = torch.softmax(logits, dim=-1).cpu()
        for row, i in enumerate(chunk):
            rec = records[i]
            p = np.array(
                [
                    max(
                        (probs[row, t].item() for t in letter_token_ids(tokenizer, lab)),
                        default=0.0,
                    )
                    for lab in rec.labels
                ]
            )
            out[i] = p / p.sum() if p.sum() > 0 else np.full(len(p), 1.0 / len(p))
        done += len(chunk)
        if tick:
            tick(done)
    return out


def query_mcqa(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[QARecord],
    cfg: KnowledgeConfig,
    *,
    scorer: str,
    refusal: str,
    tick: Tick | None = None,
) -> list[KnowledgeResult]:
    if scorer == "cloze":
        dists = score_options_cloze(
            model,
            tokenizer,
            records,
            batch_size=cfg.batch_size,
            token_budget=cfg.token_budget,
            tick=tick,
        )
    else:
        dists = score_options_letter(
            model,
            tokenizer,
            records,
            batch_size=cfg.batch_size,
            token_budget=cfg.token_budget,
            refusal=refusal,
            tick=tick,
        )
    results = []
    for rec, p in zip(records, dists):
        c = float(p[rec.gold_index])
        results.append(
            KnowledgeResult(
                rec.id,
                c,
                certainty_from_distribution(p),
                rec.labels[int(np.argmax(p))],
                c >= cfg.tau,
            )
        )
    return results


def query_oeqa(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[QARecord],
    cfg: KnowledgeConfig,
    *,
    refusal: str,
    seed: int,
    tick: Tick | None = None,
) -> list[KnowledgeResult]:
    """Greedy answer + k samples per question; c = share judged correct, certainty = agreement."""
    prompts = [
        render_prompt(tokenizer, question_message(r, allow_refusal=False, refusal=refusal))
        for r in records
    ]
    greedy = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        token_budget=cfg.token_budget,
    )
    torch.manual_seed(seed)
    sampled = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=max(1, cfg.batch_size // max(1, cfg.k_samples)),
        token_budget=cfg.token_budget,
        num_samples=cfg.k_samples,
        temperature=cfg.temperature,
        tick=tick,
    )
    results = []
    for i, rec in enumerate(records):
        answers = [greedy[i]] + sampled[i]
        correct = [oeqa_correct(rec, a) for a in answers]
        c = sum(correct) / len(correct)
        counts = Counter(normalize_answer(a) for a in answers)
        certainty = counts.most_common(1)[0][1] / len(answers)
        results.append(KnowledgeResult(rec.id, c, certainty, greedy[i], c >= cfg.tau))
    return results


@dataclass(frozen=True)
class Split:
    """Indices into the training records: kept known, all known, chosen-or-candidate unknown."""

    ik_all: list[int]
    idk_all: list[int]
    ik_kept: list[int]
    n_idk_budget: int


def split_known_unknown(results: Sequence[KnowledgeResult], cfg: KnowledgeConfig) -> Split:
    """ik/idk by tau; keep the most confidently known ik first (release: top by correctness).

    Budgets default to everything known and n_ik / ratio unknowns (release: 4000 : 1000).
    """
    ik = [i for i, r in enumerate(results) if r.known]
    idk = [i for i, r in enumerate(results) if not r.known]
    ranked = sorted(ik, key=lambda i: (-results[i].correctness, -results[i].certainty, i))
    n_ik = len(ranked) if cfg.n_ik is None else min(cfg.n_ik, len(ranked))
    return Split(
        ik_all=ik,
        idk_all=idk,
        ik_kept=sorted(ranked[:n_ik]),
        n_idk_budget=refusal_budget(cfg, n_ik, len(idk)),
    )


def refusal_budget(cfg: KnowledgeConfig, n_ik_kept: int, n_idk: int) -> int:
    """How many unknowns become refusals: `n_idk`, else n_ik_kept / ratio (at least 1).

    With `n_idk: auto` this is the ratio rule too: Stage 1 records it as a provisional budget
    (the selection stage measures the real one), and it is the fallback when it cannot.
    """
    if isinstance(cfg.n_idk, int):
        return min(cfg.n_idk, n_idk)
    # With nothing known there is nothing to protect from over-refusal: refuse all unknowns.
    wanted = max(1, round(n_ik_kept / cfg.ik_idk_ratio)) if n_ik_kept else n_idk
    return min(wanted, n_idk)
