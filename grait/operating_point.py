"""`knowledge.n_idk: auto`: choose the refusal budget by a target on over-refusal.

A method ranks the unknown training questions once; a budget b trains the first b of that
order as refusals. Measured on our testbed, b sets the trade-off between refusing unknowns and
over-refusing knowns more than anything else, and the right b depends on the data and the
model, so users state a target instead ("refuse at most 5% of what it knows") and we search:

1. hold out a seeded slice of the training set, stratified by the Stage-1 label (ik / idk);
2. rank the remaining unknowns with the method's own ranking, on the remaining rows only;
3. for each tried budget (ascending fractions of the remaining unknowns) train a trial LoRA
   on the remaining kept knowns + the first b refusals, and probe the slice teacher-forced:
   over-refusal = refused share of its known questions, unknown refusal = the same for its
   unknowns. Over-refusal grows with b, so the search stops at the first budget over target;
4. take the largest budget within the target (none: the smallest tried, with a warning) and
   scale it from the remaining unknowns to all of them.

With `decoding.refusal_bias: auto` step 3 probes each trial's first step instead
(grait.refusal_bias): the trial gets the bias that keeps the slice's over-refusal within the
target, every budget is tried (a bias can pull a budget over target back within it), and
step 4 takes the budget whose biased trial refuses the most held-out unknowns, with its bias.

Torch-free: training and probing come in as callables, so the search and the choice can be
tested with fakes and the pipeline supplies the real LoRA training and probe.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from grait.config import JobConfig
from grait.craft import KnowledgeSignals
from grait.events import CancelCheck, Cancelled, PipelineEvent, ProgressCallback
from grait.methods import method_spec
from grait.ranking import Features, Ranking, rank_candidates, refusal_weights
from grait.refusal_bias import FirstStep, choose_bias, outcomes_at, refused_at
from grait.scoring import Outcome

STAGE = "selection"
# Over-refusal is a ratio of small counts; this only absorbs float noise (1/20 vs 0.05).
_TOLERANCE = 1e-9

# (kept known rows trained with their answers, [(unknown row, loss weight)] trained to refuse)
# -> a context holding the trained model; leaving it must detach the trial adapter.
TrainFn = Callable[[list[int], list[tuple[int, float]]], AbstractContextManager[Any]]
# (model, training rows) -> the teacher-forced outcome of each row, in order.
ProbeFn = Callable[[Any, list[int]], Sequence[Outcome]]
# The same rows' first steps (grait.refusal_bias): outcomes at any refusal bias.
MarginFn = Callable[[Any, list[int]], Sequence[FirstStep]]


@dataclass(frozen=True)
class TriedBudget:
    """One trial: `budget` refusals of the remaining unknowns, measured on the held-out slice."""

    budget: int
    budget_full: int  # the same share of all unknowns: what the real run would train
    over_refusal: float  # refused share of the slice's known questions
    unknown_refusal: float | None  # refused share of its unknown ones (None: none held out)
    known_refused: int
    unknown_refused: int
    n_known: int
    n_unknown: int
    within_target: bool
    # `decoding.refusal_bias: auto`: the bias keeping this trial within the target on the
    # slice, and the slice's rates when decoding with it.
    refusal_bias: float | None = None
    biased_over_refusal: float | None = None
    biased_unknown_refusal: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Choice:
    point: TriedBudget
    met: bool  # False: no tried budget met the target, `point` is the smallest tried
    over: TriedBudget | None  # the first larger tried budget over the target (the search's stop)


@dataclass(frozen=True)
class OperatingPoint:
    """The chosen budget for the whole training set, and the evidence for it."""

    budget: int
    rule: Literal["auto", "ratio"]  # ratio: fell back to the ik:idk ratio rule
    reason: str
    target: float
    n_candidates: int  # all unknowns
    n_remaining: int  # unknowns left to rank after the hold-out
    validation_known: list[int] = field(default_factory=list)
    validation_unknown: list[int] = field(default_factory=list)
    points: list[TriedBudget] = field(default_factory=list)
    chosen: TriedBudget | None = None
    met_target: bool | None = None
    refusal_bias: float | None = None  # chosen with the budget (`decoding.refusal_bias: auto`)

    def to_json(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "refusal_bias": self.refusal_bias,
            "rule": self.rule,
            "reason": self.reason,
            "target_max_over_refusal": self.target,
            "n_candidates": self.n_candidates,
            "n_remaining_unknown": self.n_remaining,
            "validation": {
                "known": len(self.validation_known),
                "unknown": len(self.validation_unknown),
                "known_rows": self.validation_known,
                "unknown_rows": self.validation_unknown,
            },
            "points": [p.to_json() for p in self.points],
            "chosen": self.chosen.to_json() if self.chosen else None,
            "met_target": self.met_target,
        }


# ---- pure pieces ----------------------------------------------------------------------------


def validation_slice(
    known_rows: Sequence[int], unknown_rows: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded held-out rows, the same share of each Stage-1 label (so both rates are measured)."""
    rng = random.Random(seed)
    known = sorted(rng.sample(list(known_rows), round(fraction * len(known_rows))))
    unknown = sorted(rng.sample(list(unknown_rows), round(fraction * len(unknown_rows))))
    return known, unknown


def tried_budgets(fractions: Sequence[float], n_unknown: int) -> list[int]:
    """Budgets for `fractions` of `n_unknown`: ascending, deduplicated, each in [1, n_unknown]."""
    if n_unknown <= 0:
        return []
    return sorted({min(n_unknown, max(1, round(f * n_unknown))) for f in fractions})


def scale_budget(budget: int, n_all: int, n_part: int) -> int:
    """The same share of all `n_all` unknowns as `budget` is of the `n_part` that were ranked."""
    if n_part <= 0 or n_all <= 0:
        return 0
    return max(1, min(n_all, round(budget * n_all / n_part)))


def measure(
    budget: int,
    outcomes: Sequence[Outcome],
    n_known: int,
    *,
    target: float,
    budget_full: int,
) -> TriedBudget:
    """Rates of one trial from the slice's outcomes, its known questions first."""
    known = [o == "refused" for o in outcomes[:n_known]]
    unknown = [o == "refused" for o in outcomes[n_known:]]
    over = sum(known) / len(known) if known else 0.0
    return TriedBudget(
        budget=budget,
        budget_full=budget_full,
        over_refusal=over,
        unknown_refusal=sum(unknown) / len(unknown) if unknown else None,
        known_refused=sum(known),
        unknown_refused=sum(unknown),
        n_known=len(known),
        n_unknown=len(unknown),
        within_target=over <= target + _TOLERANCE,
    )


def with_bias(point: TriedBudget, probes: Sequence[FirstStep], target: float) -> TriedBudget:
    """`point` plus the bias that keeps its slice's over-refusal within `target`, and the
    slice's rates at that bias (`probes`: the slice's known questions first, as in `measure`)."""
    known = np.arange(len(probes)) < point.n_known
    bias = choose_bias(probes, known, target)
    refused = refused_at(probes, [bias])[0]
    return replace(
        point,
        refusal_bias=bias,
        biased_over_refusal=float(refused[known].mean()) if known.any() else 0.0,
        biased_unknown_refusal=float(refused[~known].mean()) if (~known).any() else None,
    )


def choose_biased(points: Sequence[TriedBudget], target: float) -> Choice:
    """The budget whose biased trial refuses the most held-out unknowns (ties: the smaller).

    Every biased point is within the target on the slice by construction (unless even the
    smallest bias could not get it there), so budgets compete on unknown refusal alone.
    """
    if not points:
        raise ValueError("no tried budgets to choose from")
    ordered = sorted(points, key=lambda p: p.budget)
    best = max(ordered, key=lambda p: (p.biased_unknown_refusal or 0.0, -p.budget))
    met = (best.biased_over_refusal or 0.0) <= target + _TOLERANCE
    return Choice(best, met, None)


def choose(points: Sequence[TriedBudget], target: float) -> Choice:
    """The largest budget within the target; if none is, the smallest tried."""
    if not points:
        raise ValueError("no tried budgets to choose from")
    ordered = sorted(points, key=lambda p: p.budget)
    within = [p for p in ordered if p.over_refusal <= target + _TOLERANCE]
    chosen = within[-1] if within else ordered[0]
    over = next(
        (p for p in ordered if p.budget > chosen.budget and p.over_refusal > target + _TOLERANCE),
        None,
    )
    return Choice(chosen, bool(within), over)


def search(
    budgets: Sequence[int],
    evaluate: Callable[[int], TriedBudget],
    *,
    target: float,
    should_cancel: CancelCheck,
    on_point: Callable[[int, TriedBudget], None] = lambda i, p: None,
    stop_over_target: bool = True,
) -> list[TriedBudget]:
    """Evaluate budgets in ascending order, stopping after the first one over the target.

    Over-refusal grows with the budget, so larger budgets would only be over it too; each
    trial is a full LoRA training, which makes stopping early the main saving. With a refusal
    bias to choose (`stop_over_target=False`) a budget over the target can still be biased
    back within it, so every budget is tried. The cancel check runs before every trial.
    """
    points: list[TriedBudget] = []
    for i, budget in enumerate(sorted(budgets)):
        if should_cancel():
            raise Cancelled(f"cancelled during {STAGE} (auto budget, {i} of {len(budgets)} tried)")
        point = evaluate(budget)
        points.append(point)
        on_point(i, point)
        if stop_over_target and point.over_refusal > target + _TOLERANCE:
            break
    return points


def _pct(x: float) -> str:
    text = f"{100 * x:.1f}".rstrip("0").rstrip(".")
    return f"{text}%"


def explain(choice: Choice, *, target: float, n_all: int, n_remaining: int) -> str:
    """One sentence a user can check: which budget, measured how, against which target."""
    p = choice.point
    head = f"budget {p.budget_full} of {n_all} unknowns"
    if n_remaining != n_all:
        head += f" ({p.budget} of the {n_remaining} left after the hold-out, scaled)"
    where = f"over-refusal on {p.n_known} held-out known questions"
    if p.refusal_bias is not None:
        unknown = "n/a" if p.biased_unknown_refusal is None else _pct(p.biased_unknown_refusal)
        return (
            f"{head} with refusal bias {p.refusal_bias:+.2f}: each tried budget's trial adapter "
            f"was biased to keep its {where} within {_pct(target)} "
            f"({'met' if choice.met else 'not met even at the lowest bias'}: "
            f"{_pct(p.biased_over_refusal or 0.0)}), and this one refused the most held-out "
            f"unknowns ({unknown}; {_pct(p.unknown_refusal or 0.0)} unbiased)"
        )
    if choice.met:
        text = (
            f"{head}: the largest tried whose {where} ({_pct(p.over_refusal)}) "
            f"stays within {_pct(target)}"
        )
        if choice.over is not None:
            text += (
                f"; the next, {choice.over.budget_full}, refused {_pct(choice.over.over_refusal)}"
            )
        else:
            text += "; every tried budget did"
        return text
    return (
        f"{head}: no tried budget kept {where} within {_pct(target)}; the smallest tried "
        f"refused {_pct(p.over_refusal)} and is used"
    )


# ---- the search on a run --------------------------------------------------------------------


def _restricted_ranking(
    config: JobConfig,
    features: Features | None,
    *,
    rows: list[int],
    unknown: list[int],
    known: list[int],
    kept: list[int],
    signals: KnowledgeSignals | None = None,
) -> Ranking:
    """The method's ranking of `unknown`, computed as if the training set were only `rows`.

    Features are cut down to those rows (kept-known answer features follow `kept`'s order, as
    Stage 2 stored them), so the held-out slice does not even shape the centring.
    """
    spec = method_spec(config.method)
    assert spec.ranking is not None
    local = {row: i for i, row in enumerate(rows)}
    sub: Features | None = None
    if features is not None:
        van_keep = [i for i, row in enumerate(kept) if row in local]
        sub = Features(
            np.asarray(features.idk_pre[rows]),
            np.asarray(features.idk_raw[rows]),
            np.asarray(features.van_raw[van_keep]),
        )
    return rank_candidates(
        spec.ranking,
        idk_rows=[local[r] for r in unknown],
        ik_rows=[local[r] for r in known],
        features=sub,
        cfg=config.selection,
        seed=config.seed,
        signals=None if signals is None else signals.restricted(rows),
    )


def find_operating_point(
    config: JobConfig,
    split: dict[str, Any],
    features: Features | None,
    *,
    train: TrainFn,
    probe: ProbeFn,
    fallback_budget: int,
    emit: ProgressCallback,
    should_cancel: CancelCheck,
    signals: KnowledgeSignals | None = None,
    margins: MarginFn | None = None,
) -> OperatingPoint:
    """Search the budget for `config.knowledge.auto`'s target (see the module docstring).

    `split` is Stage 1's split.json; `fallback_budget` the ratio rule's budget, used (with a
    warning) when the held-out slice has too few known questions to measure over-refusal.
    With `margins` (`decoding.refusal_bias: auto`) each trial is probed at its first step
    instead, gets its own refusal bias (`with_bias`), every budget is tried, and the choice
    is `choose_biased`'s.
    """
    auto = config.knowledge.auto
    target = auto.max_over_refusal
    spec = method_spec(config.method)
    known_all: list[int] = split["ik_all"]
    unknown_all: list[int] = split["idk_all"]
    kept: list[int] = split["ik_kept"]
    n_all = len(unknown_all)
    if n_all == 0:
        reason = "no unknown candidates: there is nothing to refuse"
        emit(PipelineEvent("metrics", STAGE, message=reason, data={"auto_budget": 0}))
        return OperatingPoint(0, "ratio", reason, target, 0, 0)

    held_known, held_unknown = validation_slice(
        known_all, unknown_all, auto.validation_fraction, config.seed
    )
    held = set(held_known) | set(held_unknown)
    remaining_unknown = [r for r in unknown_all if r not in held]
    if len(held_known) < auto.min_validation_known or not remaining_unknown:
        why = (
            f"the held-out slice ({_pct(auto.validation_fraction)} of the training set) has "
            f"{len(held_known)} known questions, fewer than knowledge.auto.min_validation_known"
            f" = {auto.min_validation_known}, too few to measure over-refusal"
            if remaining_unknown
            else "no unknowns are left to rank after the hold-out"
        )
        reason = f"budget {fallback_budget} of {n_all} unknowns by the ik:idk ratio rule: {why}"
        emit(PipelineEvent("warning", STAGE, message=f"auto budget not measured: {reason}"))
        emit(
            PipelineEvent(
                "metrics",
                STAGE,
                message=reason,
                data={"auto_budget": fallback_budget, "rule": "ratio"},
            )
        )
        return OperatingPoint(
            fallback_budget,
            "ratio",
            reason,
            target,
            n_all,
            len(remaining_unknown),
            held_known,
            held_unknown,
        )

    rows = sorted((set(known_all) | set(unknown_all)) - held)
    train_known = [r for r in kept if r not in held]
    remaining_known = [r for r in known_all if r not in held]
    ranking = _restricted_ranking(
        config,
        features,
        rows=rows,
        unknown=remaining_unknown,
        known=remaining_known,
        kept=kept,
        signals=signals,
    )
    order = ranking.order
    n_rem = len(remaining_unknown)
    budgets = tried_budgets(auto.fractions, n_rem)
    probe_rows = held_known + held_unknown

    def evaluate(budget: int) -> TriedBudget:
        picked = order[:budget]
        weights = refusal_weights(ranking, picked, config.weighting, weighted=spec.weighted)
        refusals = [(remaining_unknown[p], float(w)) for p, w in zip(picked, weights)]
        with train(train_known, refusals) as model:
            steps = margins(model, probe_rows) if margins is not None else None
            outcomes = outcomes_at(steps, 0.0) if steps is not None else probe(model, probe_rows)
        point = measure(
            budget,
            outcomes,
            len(held_known),
            target=target,
            budget_full=scale_budget(budget, n_all, n_rem),
        )
        return point if steps is None else with_bias(point, steps, target)

    def on_point(i: int, p: TriedBudget) -> None:
        unknown = "n/a" if p.unknown_refusal is None else _pct(p.unknown_refusal)
        message = (
            f"auto budget {p.budget_full} ({p.budget} of {n_rem} after the hold-out): "
            f"over-refusal {_pct(p.over_refusal)}, unknown refusal {unknown}"
        )
        if p.refusal_bias is not None:
            biased = "n/a" if p.biased_unknown_refusal is None else _pct(p.biased_unknown_refusal)
            message += (
                f"; with refusal bias {p.refusal_bias:+.2f}: over-refusal "
                f"{_pct(p.biased_over_refusal or 0.0)}, unknown refusal {biased}"
            )
        emit(
            PipelineEvent(
                "progress",
                STAGE,
                done=i + 1,
                total=len(budgets),
                message=message,
                data={"auto_point": p.to_json()},
            )
        )

    emit(
        PipelineEvent(
            "progress",
            STAGE,
            done=0,
            total=len(budgets),
            message=f"auto budget: trying up to {len(budgets)} budgets on "
            f"{len(held_known)} known + {len(held_unknown)} unknown held-out questions",
        )
    )
    points = search(
        budgets,
        evaluate,
        target=target,
        should_cancel=should_cancel,
        on_point=on_point,
        stop_over_target=margins is None,
    )
    choice = choose(points, target) if margins is None else choose_biased(points, target)
    reason = explain(choice, target=target, n_all=n_all, n_remaining=n_rem)
    if not choice.met:
        emit(PipelineEvent("warning", STAGE, message=f"auto budget missed its target: {reason}"))
    emit(
        PipelineEvent(
            "metrics",
            STAGE,
            message=reason,
            data={
                "auto_budget": choice.point.budget_full,
                "rule": "auto",
                "met_target": choice.met,
                "chosen": choice.point.to_json(),
                "tried": [p.budget_full for p in points],
                "refusal_bias": choice.point.refusal_bias,
            },
        )
    )
    return OperatingPoint(
        budget=choice.point.budget_full,
        rule="auto",
        reason=reason,
        target=target,
        n_candidates=n_all,
        n_remaining=n_rem,
        validation_known=held_known,
        validation_unknown=held_unknown,
        points=points,
        chosen=choice.point,
        met_target=choice.met,
        refusal_bias=choice.point.refusal_bias,
    )


def write_operating_point(path: Path, point: OperatingPoint) -> None:
    Path(path).write_text(json.dumps(point.to_json(), indent=2) + "\n")
