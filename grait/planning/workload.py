"""Token lengths of a job's data, counted with the model's own tokenizer and prompts.

Uses the `tokenizers` library on the model folder's `tokenizer.json` and renders the chat
template with jinja2, so the API can count tokens without transformers or torch. A model
folder without `tokenizer.json` falls back to ~4 characters a token, flagged as approximate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from grait.data import QARecord
from grait.messages import cloze_message, question_message

_MARKER = "\x00MSG\x00"


@dataclass(frozen=True)
class TokenCounter:
    """Counts tokens of many strings at once; `overhead` = the chat template's own tokens."""

    count_many: Callable[[list[str]], list[int]]
    overhead: int
    exact: bool

    @classmethod
    def for_model_dir(cls, model_dir: str | Path) -> TokenCounter:
        folder = Path(model_dir)
        path = folder / "tokenizer.json"
        if not path.exists():
            return cls(lambda texts: [math.ceil(len(t) / 4) for t in texts], 16, exact=False)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))

        def count_many(texts: list[str]) -> list[int]:
            return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]

        return cls(count_many, _template_overhead(folder, count_many), exact=True)


def _template_overhead(folder: Path, count_many: Callable[[list[str]], list[int]]) -> int:
    """Tokens the chat template adds around one user message (with the generation prompt)."""
    template = None
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "tokenizer_config.json").exists():
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if not isinstance(template, str):
        return count_many(["\n\nAnswer: "])[0]  # grait.prompts' plain layout
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        text = env.from_string(template).render(
            messages=[{"role": "user", "content": _MARKER}],
            add_generation_prompt=True,
            raise_exception=raise_exception,
            bos_token="",
            eos_token="",
        )
    except (
        TemplateError,
        ValueError,
        TypeError,
    ):  # an exotic template: a typical chat frame's size
        return 16
    return sum(count_many([part])[0] for part in text.split(_MARKER) if part)


@dataclass(frozen=True)
class DatasetTokens:
    """Per-question token lengths for every way the pipeline shows a question."""

    rait_prompt: list[int]  # refusal-allowed prompt: training, features, tuned evaluation
    plain_prompt: list[int]  # base-model evaluation prompt
    answer: list[int]  # gold answer + end of turn
    cloze_prompt: list[int]  # MCQA rows only
    options: list[list[int]]  # MCQA rows only: each option's tokens
    oeqa: int  # open-ended rows
    refusal: int  # the refusal target + end of turn
    exact: bool

    @property
    def n(self) -> int:
        return len(self.rait_prompt)


def count_tokens(
    records: Sequence[QARecord], counter: TokenCounter, *, refusal: str
) -> DatasetTokens:
    o = counter.overhead
    rait = counter.count_many(
        [question_message(r, allow_refusal=True, refusal=refusal) for r in records]
    )
    plain = counter.count_many(
        [question_message(r, allow_refusal=False, refusal=refusal) for r in records]
    )
    answers = counter.count_many([r.answer_text for r in records])
    mcqa = [r for r in records if r.kind == "mcqa"]
    cloze = counter.count_many([cloze_message(r) for r in mcqa])
    flat = counter.count_many([" " + t for r in mcqa for t in r.options])
    options, at = [], 0
    for r in mcqa:
        options.append(flat[at : at + len(r.options)])
        at += len(r.options)
    return DatasetTokens(
        rait_prompt=[t + o for t in rait],
        plain_prompt=[t + o for t in plain],
        answer=[a + 1 for a in answers],
        cloze_prompt=[c + o for c in cloze],
        options=options,
        oeqa=len(records) - len(mcqa),
        refusal=counter.count_many([refusal])[0] + 1,
        exact=counter.exact,
    )


def random_batches(lengths: Sequence[int], batch_size: int) -> list[tuple[int, int]]:
    """(rows, expected padded length) of each batch when rows are shuffled, as training does.

    A batch is padded to its longest row: with k rows drawn at random from n, the longest is
    at most the i-th shortest with probability C(i, k) / C(n, k), which gives its expectation.
    """
    ordered = sorted(lengths)
    n = len(ordered)
    if n == 0:
        return []
    out = []
    for start in range(0, n, batch_size):
        k = min(batch_size, n - start)
        below, expected = 0.0, 0.0
        for i, length in enumerate(ordered, start=1):
            at_most = math.comb(i, k) / math.comb(n, k)
            expected += (at_most - below) * length
            below = at_most
        out.append((k, math.ceil(expected)))
    return out


def padded_batches(lengths: Sequence[int], batch_size: int) -> list[tuple[int, int]]:
    """(rows, padded length) of each batch when rows are sorted by length, as the stages do."""
    ordered = sorted(lengths)
    return [
        (len(ordered[i : i + batch_size]), max(ordered[i : i + batch_size]))
        for i in range(0, len(ordered), batch_size)
    ]
