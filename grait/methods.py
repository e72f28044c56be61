"""Every tuning method in one table: what it trains on and which stages it runs.

The pipeline, the config validation, the CLI, the service and the benchmarks read this
table instead of spelling method names out and branching on them (as peft's
`PEFT_TYPE_TO_CONFIG_MAPPING` is the one place that says what a PEFT type is). Torch-free,
so the web layer can list methods without importing the model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from grait.events import STAGES

Refusals = Literal["none", "all", "ranked"]
Ranking = Literal["gradient", "random", "stratified", "certainty", "correctness"]
KnownOrder = Literal["correctness", "certainty"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    refusals: Refusals  # none: real answers for everything; all: every unknown; ranked: a budget
    ranking: Ranking | None = None  # how a `ranked` method orders the unknown candidates
    weighted: bool = False  # Stage 3 loss weights on the chosen refusals
    uses_stage1: bool = True
    rehearsal: bool = False  # CRaFT's knowledge flow: drop unknowns a rehearsal makes answerable
    known_order: KnownOrder = "correctness"  # which knowns a `knowledge.n_ik` budget keeps first

    @property
    def uses_features(self) -> bool:
        """Gradient features are needed to rank by influence or to cluster for stratification."""
        return self.ranking in ("gradient", "stratified")

    @property
    def stages(self) -> tuple[str, ...]:
        wanted = {"training", "evaluation"}
        if self.uses_stage1:
            wanted.add("knowledge_query")
        if self.rehearsal:
            wanted.add("rehearsal")
        if self.refusals == "ranked":
            wanted.add("selection")
        if self.uses_features:
            wanted.update(("warmup", "gradient_features"))
        return tuple(s for s in STAGES if s in wanted)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "grait",
            "gradient-ranked refusals (coverage of unknowns minus knowns), influence weights",
            "ranked",
            "gradient",
            weighted=True,
        ),
        MethodSpec("grait-noweight", "grait's ranking without loss weights", "ranked", "gradient"),
        MethodSpec(
            "random-idk", "a random sample of the unknowns (same budget)", "ranked", "random"
        ),
        MethodSpec(
            "stratified-random",
            "equal numbers of random unknowns from each cluster of their gradient features",
            "ranked",
            "stratified",
        ),
        MethodSpec(
            "craft",
            "CRaFT: unknowns the rehearsal does not make answerable, least certain first; "
            "knowns most certain first",
            "ranked",
            "certainty",
            rehearsal=True,
            known_order="certainty",
        ),
        MethodSpec(
            "craft-noflow",
            "CRaFT without the rehearsal filter (certainty order only)",
            "ranked",
            "certainty",
            known_order="certainty",
        ),
        MethodSpec(
            "craft-nocert",
            "CRaFT without certainty (the rehearsal filter, then correctness order)",
            "ranked",
            "correctness",
            rehearsal=True,
        ),
        MethodSpec("rtuning", "all known with answers + all unknown as refusals (R-Tuning)", "all"),
        MethodSpec(
            "van", "all data with real answers (no knowledge query)", "none", uses_stage1=False
        ),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}"
        ) from None
