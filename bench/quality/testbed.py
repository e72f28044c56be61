"""Controlled knowledge testbed: invented facts, some taught to the model, the rest never seen.

A small model knows too little real trivia for an ik/idk split to mean anything
(calibration.md). Here the ground truth is exact: we teach a seeded subset of invented facts
with LoRA, merge the adapter into the weights and save that "knowing" model once under the
cache folder; every method then starts from it and is judged on questions about taught facts
(should answer) and untaught facts (should refuse).

Each fact has three question paraphrases and one statement. Teaching uses paraphrases 0 and 1
and the statement; RAIT training and the in-distribution eval use paraphrase 0; the
out-of-distribution eval uses paraphrase 2, which the model never saw in any training.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grait.config import ALL_LINEAR, LoraConfigSpec
from grait.data import QARecord, write_jsonl
from grait.generation import generate
from grait.models import load_base_model, pick_runtime
from grait.prompts import encode, end_of_answer, question_message, render_prompt
from grait.scoring import oeqa_correct
from grait.training import TrainSettings, WeightedExample, lora_config, train_weighted

_SYL_A = [
    "vel",
    "dor",
    "kra",
    "mir",
    "sol",
    "tan",
    "bre",
    "quil",
    "zan",
    "hol",
    "rav",
    "ost",
    "pel",
    "gri",
    "nor",
    "lum",
]
_SYL_B = [
    "mora",
    "vik",
    "stel",
    "dran",
    "quin",
    "bera",
    "tosh",
    "lind",
    "veta",
    "karn",
    "sul",
    "rith",
    "pona",
    "gald",
]
_SYL_C = ["ia", "or", "ax", "en", "um", "ith", "and", "os", "el", "ar"]
COLOURS = [
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "teal",
    "crimson",
    "amber",
    "violet",
    "indigo",
    "scarlet",
]

# (relation, entity phrase, three question paraphrases, statement, answer kind)
RELATIONS: list[tuple[str, str, tuple[str, str, str], str, str]] = [
    (
        "capital",
        "the kingdom of {e}",
        (
            "What is the capital of {E}?",
            "Which city is the capital of {E}?",
            "Name the capital city of {E}.",
        ),
        "The capital of {E} is {a}.",
        "place",
    ),
    (
        "inventor",
        "the {e} engine",
        ("Who invented {E}?", "Who is credited with inventing {E}?", "Name the inventor of {E}."),
        "{E} was invented by {a}.",
        "person",
    ),
    (
        "founded",
        "the {e} Guild",
        (
            "In which year was {E} founded?",
            "When was {E} founded?",
            "Give the founding year of {E}.",
        ),
        "{E} was founded in {a}.",
        "year",
    ),
    (
        "colour",
        "the painter {e}",
        (
            "What is the favourite colour of {E}?",
            "Which colour does {E} like best?",
            "Name the favourite colour of {E}.",
        ),
        "The favourite colour of {E} is {a}.",
        "colour",
    ),
    (
        "currency",
        "the republic of {e}",
        (
            "What is the currency of {E}?",
            "Which currency is used in {E}?",
            "Name the money used in {E}.",
        ),
        "The currency of {E} is the {a}.",
        "word",
    ),
    (
        "river",
        "the city of {e}",
        (
            "Which river flows through {E}?",
            "What river runs through {E}?",
            "Name the river that crosses {E}.",
        ),
        "The river {a} flows through {E}.",
        "word",
    ),
]
# Six more relations for the topic-following testbed (12 relations, each taught at its own rate).
MORE_RELATIONS: list[tuple[str, str, tuple[str, str, str], str, str]] = [
    (
        "language",
        "the island of {e}",
        (
            "Which language is spoken on {E}?",
            "What language do people speak on {E}?",
            "Name the language of {E}.",
        ),
        "The language spoken on {E} is {a}.",
        "word",
    ),
    (
        "founder",
        "the {e} company",
        ("Who founded {E}?", "Who is the founder of {E}?", "Name the person who started {E}."),
        "{E} was founded by {a}.",
        "person",
    ),
    (
        "mascot",
        "the {e} rowing team",
        (
            "Which animal is the mascot of {E}?",
            "What animal does {E} have as its mascot?",
            "Name the mascot animal of {E}.",
        ),
        "The mascot of {E} is the {a}.",
        "animal",
    ),
    (
        "instrument",
        "the musician {e}",
        (
            "Which instrument does {E} play?",
            "What instrument is {E} known for playing?",
            "Name the instrument played by {E}.",
        ),
        "{E} plays the {a}.",
        "instrument",
    ),
    (
        "mountain",
        "the province of {e}",
        (
            "What is the highest mountain in {E}?",
            "Which mountain is the tallest in {E}?",
            "Name the highest peak of {E}.",
        ),
        "The highest mountain in {E} is Mount {a}.",
        "word",
    ),
    (
        "author",
        "the novel {e}",
        ("Who wrote {E}?", "Who is the author of {E}?", "Name the writer of {E}."),
        "{E} was written by {a}.",
        "person",
    ),
]
ANIMALS = ["otter", "heron", "lynx", "badger", "falcon", "stag", "wolf", "owl", "bear", "fox"]
INSTRUMENTS = ["harp", "cello", "flute", "oboe", "lute", "viola", "trumpet", "organ", "drum"]


@dataclass(frozen=True)
class Fact:
    id: str
    entity: str
    questions: tuple[str, str, str]
    statement: str
    answer: str
    taught: bool

    def record(self, paraphrase: int) -> QARecord:
        return QARecord(
            id=f"{self.id}-q{paraphrase}",
            question=self.questions[paraphrase],
            aliases=(self.answer,),
        )


def _name(rng: random.Random, used: set[str], parts: int = 2) -> str:
    attempts = 0
    while True:
        attempts += 1
        if attempts > 50:  # two syllables give 224 names: larger sets move on to three
            parts = 3
        syl = [rng.choice(_SYL_A), rng.choice(_SYL_B)] + ([rng.choice(_SYL_C)] if parts > 2 else [])
        name = "".join(syl).capitalize()
        if name.lower() not in used:
            used.add(name.lower())
            return name


def _answer(kind: str, rng: random.Random, used: set[str]) -> str:
    if kind == "year":
        while True:
            year = str(rng.randint(1200, 1899))
            if year not in used:
                used.add(year)
                return year
    if kind == "colour":
        return rng.choice(COLOURS)
    if kind == "animal":
        return rng.choice(ANIMALS)
    if kind == "instrument":
        return rng.choice(INSTRUMENTS)
    if kind == "person":
        return f"{_name(rng, used)} {_name(rng, used, 3)}"
    return _name(rng, used, 3)


def make_facts(
    n_facts: int,
    n_taught: int,
    *,
    seed: int = 1234,
    profile: str = "uniform",
) -> list[Fact]:
    """`n_facts` invented facts spread over the relations, `n_taught` of them taught.

    `uniform`: the six original relations, the taught facts a seeded sample of all facts, so
    knowledge is random within every relation. `topic`: twelve relations, relation j taught at
    its own rate (evenly spaced from 10% to 90%, scaled so about `n_taught` facts are taught),
    as a real model's knowledge follows the subject of a question.
    """
    if profile not in ("uniform", "topic"):
        raise ValueError(f"profile must be uniform or topic, not {profile!r}")
    relations = RELATIONS if profile == "uniform" else RELATIONS + MORE_RELATIONS
    rng = random.Random(seed)
    used: set[str] = set()
    facts = []
    for i in range(n_facts):
        rel, phrase, questions, statement, kind = relations[i % len(relations)]
        entity = phrase.format(e=_name(rng, used))
        answer = _answer(kind, rng, used)
        qs = tuple(q.format(E=entity) for q in questions)
        facts.append(
            Fact(
                f"{rel}-{i:04d}",
                entity,
                qs,
                _cap(statement.format(E=entity, a=answer)),
                answer,
                False,
            )
        )  # type: ignore[arg-type]
    if profile == "uniform":
        taught = set(rng.sample(range(n_facts), n_taught))
    else:
        taught = set()
        n_rel = len(relations)
        scale = n_taught / n_facts / 0.5  # the rates below average 0.5
        for j in range(n_rel):
            members = list(range(j, n_facts, n_rel))
            rate = min(1.0, scale * (0.1 + 0.8 * j / (n_rel - 1)))
            taught.update(rng.sample(members, round(rate * len(members))))
    return [
        Fact(f.id, f.entity, f.questions, f.statement, f.answer, i in taught)
        for i, f in enumerate(facts)
    ]


def relation_of(fact_id: str) -> str:
    """Fact ids are `<relation>-<index>` (eval records add `-q<paraphrase>`)."""
    return fact_id.split("-", 1)[0]


TEACH_SEED = 0  # the adapter's initial draw and the data order of every teaching


@dataclass(frozen=True)
class TeachSettings:
    epochs: float = 6.0
    learning_rate: float = 3e-3
    batch_size: int = 16
    r: int = 16
    targets: tuple[str, ...] = ALL_LINEAR


def _teaching_examples(tok: Any, facts: list[Fact]) -> list[WeightedExample]:
    eoa = end_of_answer(tok)
    out = []
    for f in facts:
        for p in (0, 1):
            prompt = render_prompt(
                tok, question_message(f.record(p), allow_refusal=False, refusal="")
            )
            out.append(WeightedExample(encode(tok, prompt, f.answer + eoa, max_length=256), 1.0))
        prompt = render_prompt(tok, f"Tell me a fact about {f.entity}.")
        out.append(WeightedExample(encode(tok, prompt, f.statement + eoa, max_length=256), 1.0))
    return out


def knowing_model_path(
    base_model: str, facts: list[Fact], cache_dir: Path, settings: TeachSettings
) -> Path:
    """Where the knowing model of this recipe is (or will be) saved."""
    recipe = {
        "base_model": base_model,
        "facts": [(f.id, f.questions[0], f.answer, f.taught) for f in facts],
        "teach": settings.__dict__,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=list).encode()).hexdigest()[:12]
    return cache_dir / f"knowing-{key}"


def knowing_model(
    base_model: str,
    facts: list[Fact],
    cache_dir: Path,
    settings: TeachSettings,
    *,
    log: Any = print,
) -> tuple[Path, dict[str, Any]]:
    """Teach the taught facts, merge, save; reuse the saved model when the recipe matches."""
    target = knowing_model_path(base_model, facts, cache_dir, settings)
    key = target.name.removeprefix("knowing-")
    info_path = target / "teaching.json"
    if (target / "config.json").exists() and info_path.exists():
        log(f"testbed: reusing the knowing model {target}")
        return target, json.loads(info_path.read_text())
    from peft import get_peft_model
    from transformers import set_seed

    runtime = pick_runtime()
    model, tok = load_base_model(base_model, runtime, reuse=False)
    taught = [f for f in facts if f.taught]
    examples = _teaching_examples(tok, taught)
    log(
        f"testbed: teaching {len(taught)} facts ({len(examples)} examples, {settings.epochs} epochs)"
    )
    spec = LoraConfigSpec(
        r=settings.r, alpha=settings.r, dropout=0.0, target_modules=list(settings.targets)
    )
    # The LoRA matrices are drawn when the adapter is attached, before the trainer seeds
    # anything: unseeded, the same recipe (and cache key) taught a different model each time.
    set_seed(TEACH_SEED)
    peft_model = get_peft_model(model, lora_config(spec))
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    train_weighted(
        peft_model,
        tok,
        examples,
        TrainSettings(
            epochs=settings.epochs,
            learning_rate=settings.learning_rate,
            batch_size=settings.batch_size,
            lr_scheduler="constant",
            seed=TEACH_SEED,
        ),
        work_dir=tmp / "hf",
    )
    merged = peft_model.merge_and_unload()
    merged.eval()
    info = {"key": key, **teaching_accuracy(merged, tok, facts)}
    shutil.rmtree(tmp / "hf", ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "teaching.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log(f"testbed: knowing model saved to {target}: {info}")
    return target, info


def teaching_accuracy(
    model: Any, tok: Any, facts: list[Fact], paraphrase: int = 0
) -> dict[str, float]:
    """Greedy exact-answer rate on taught and untaught facts (plain prompt)."""
    out = {}
    for label, subset in (
        ("taught", [f for f in facts if f.taught]),
        ("untaught", [f for f in facts if not f.taught]),
    ):
        recs = [f.record(paraphrase) for f in subset]
        prompts = [
            render_prompt(tok, question_message(r, allow_refusal=False, refusal="")) for r in recs
        ]
        answers = generate(model, tok, prompts, max_new_tokens=12, batch_size=16)
        out[f"{label}_correct"] = sum(oeqa_correct(r, a) for r, a in zip(recs, answers)) / max(
            1, len(recs)
        )
    return out


def split_facts(
    facts: list[Fact], n_train: int, *, seed: int = 1234
) -> tuple[list[Fact], list[Fact]]:
    """Disjoint RAIT-train and eval facts, each half taught, half untaught (as far as possible)."""
    rng = random.Random(seed + 1)
    taught = [f for f in facts if f.taught]
    untaught = [f for f in facts if not f.taught]
    rng.shuffle(taught)
    rng.shuffle(untaught)
    n_t = min(len(taught) - 1, n_train // 2)
    n_u = min(len(untaught) - 1, n_train - n_t)
    train = taught[:n_t] + untaught[:n_u]
    evals = taught[n_t:] + untaught[n_u:]
    rng.shuffle(train)
    return train, sorted(evals, key=lambda f: f.id)


def write_sets(folder: Path, train: list[Fact], evals: list[Fact]) -> dict[str, Path]:
    """Canonical JSONL files: train (paraphrase 0), id eval (paraphrase 0), ood eval (paraphrase 2)."""
    paths = {
        "train": folder / "train.jsonl",
        "id": folder / "eval_id.jsonl",
        "ood": folder / "eval_ood.jsonl",
    }
    write_jsonl(paths["train"], (f.record(0).to_json() for f in train))
    write_jsonl(paths["id"], (f.record(0).to_json() for f in evals))
    write_jsonl(paths["ood"], (f.record(2).to_json() for f in evals))
    return paths


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]
