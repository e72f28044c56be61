"""The words of every user turn the pipeline writes, kept free of torch.

`grait.prompts` turns these messages into token ids for the model; the job planner
(`grait.planning`) counts their tokens in the API process, which must not import torch.
"""

from __future__ import annotations

from grait.data import QARecord

MCQA_INSTRUCTION = (
    "Answer the following multiple-choice question with the letter of the correct option."
)
OEQA_INSTRUCTION = "Answer the following question with a short answer."
CLOZE_INSTRUCTION = "Answer the following question."
REFUSAL_INSTRUCTION = 'If you do not know the answer, reply "{refusal}"'


def question_message(record: QARecord, *, allow_refusal: bool, refusal: str) -> str:
    """The user turn: instruction, question, lettered options, optional refusal clause."""
    if record.kind == "mcqa":
        options = "\n".join(
            f"{label}. {text}" for label, text in zip(record.labels, record.options)
        )
        body = f"{MCQA_INSTRUCTION}\n\nQuestion: {record.question}\n{options}"
    else:
        body = f"{OEQA_INSTRUCTION}\n\nQuestion: {record.question}"
    if allow_refusal:
        body += "\n\n" + REFUSAL_INSTRUCTION.format(refusal=refusal)
    return body


def cloze_message(record: QARecord) -> str:
    """Cloze scoring shows the question without options and scores each option's text."""
    return f"{CLOZE_INSTRUCTION}\n\nQuestion: {record.question}"
