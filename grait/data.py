"""QA records and the readers that turn files into them.

One record type covers multiple-choice (MCQA) and open-ended (OEQA) questions, so every
later stage has a single input shape. Readers stream files line by line and fail loudly:
a bad row raises `DataError` naming the file, line and field, because a silently dropped
or mislabelled question would quietly bias which questions count as "unknown".
"""

from __future__ import annotations

import csv
import json
import random
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Kind = Literal["mcqa", "oeqa"]
FORMATS = ("canonical", "mmlu", "arc", "nq", "openai_chat")
LETTERS = string.ascii_uppercase
MMLU_HEADER = ["id", "lang", "question", "A", "B", "C", "D", "target"]


class DataError(ValueError):
    """A QA file that cannot be read as asked; says where and what."""

    def __init__(
        self, file: str | Path, message: str, *, line: int | None = None, field: str | None = None
    ):
        self.file = str(file)
        self.line = line
        self.field = field
        self.reason = message
        where = self.file + (f", line {line}" if line is not None else "")
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


@dataclass(frozen=True)
class QARecord:
    """A question with either labelled options and a gold label, or gold answer aliases.

    MCQA options are always labelled A, B, C... in order; `source_labels` keeps the file's own
    labels (ARC's "1".."4") so an answer can be traced back to the original item.
    """

    id: str
    question: str
    options: tuple[str, ...] = ()
    gold: str = ""
    aliases: tuple[str, ...] = ()
    source_labels: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def kind(self) -> Kind:
        return "mcqa" if self.options else "oeqa"

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(LETTERS[: len(self.options)])

    @property
    def gold_index(self) -> int:
        return LETTERS.index(self.gold)

    @property
    def answer_text(self) -> str:
        """The training target for a known question: 'B. option text' or the first alias."""
        if self.kind == "mcqa":
            return f"{self.gold}. {self.options[self.gold_index]}"
        return self.aliases[0]

    def to_json(self) -> dict[str, Any]:
        """Canonical JSONL form (what `read_canonical` reads back)."""
        out: dict[str, Any] = {"id": self.id, "question": self.question}
        if self.kind == "mcqa":
            out["options"] = dict(zip(self.labels, self.options))
            out["answer"] = self.gold
        else:
            out["answers"] = list(self.aliases)
        return out


def mcqa(id: str, question: str, options: Iterable[str], gold: str, **kw: Any) -> QARecord:
    """Build an MCQA record, checking the gold label names an option."""
    opts = tuple(options)
    if len(opts) < 2:
        raise ValueError(f"{id}: an MCQA item needs at least 2 options, got {len(opts)}")
    if gold not in LETTERS[: len(opts)]:
        raise ValueError(f"{id}: gold label {gold!r} is not one of {list(LETTERS[: len(opts)])}")
    return QARecord(id=id, question=question, options=opts, gold=gold, **kw)


def _text(obj: dict[str, Any], key: str, file: Path, line: int, *, where: str = "") -> str:
    value = obj.get(key)
    name = f"{where}{key}"
    if value is None:
        raise DataError(file, "missing", line=line, field=name)
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise DataError(file, f"expected text, got {type(value).__name__}", line=line, field=name)
    text = str(value).strip()
    if not text:
        raise DataError(file, "empty", line=line, field=name)
    return text


def _json_lines(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with file.open(encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(
                    file, f"invalid JSON ({exc.msg} at column {exc.colno})", line=number
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    file, f"expected a JSON object, got {type(obj).__name__}", line=number
                )
            yield number, obj


def _options_from(value: Any, file: Path, line: int) -> tuple[list[str], list[str]]:
    """Accept options as {"A": text, ...} or [text, ...] or [{"label", "text"}, ...]."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                items.append(
                    (item.get("label", LETTERS[i] if i < 26 else str(i)), item.get("text"))
                )
            else:
                items.append((LETTERS[i] if i < 26 else str(i), item))
    else:
        raise DataError(file, "expected an object or a list of options", line=line, field="options")
    if not 2 <= len(items) <= 26:
        raise DataError(
            file, f"expected 2 to 26 options, got {len(items)}", line=line, field="options"
        )
    labels, texts = [], []
    for i, (label, text) in enumerate(items):
        if not isinstance(text, str | int | float) or not str(text).strip():
            raise DataError(file, "empty or non-text option", line=line, field=f"options[{i}]")
        labels.append(str(label).strip())
        texts.append(str(text).strip())
    if len(set(labels)) != len(labels):
        raise DataError(file, f"duplicate option labels {labels}", line=line, field="options")
    return labels, texts


def _gold_position(labels: list[str], gold: str, file: Path, line: int, field: str) -> int:
    if gold in labels:
        return labels.index(gold)
    raise DataError(
        file, f"{gold!r} is not one of the option labels {labels}", line=line, field=field
    )


def _where(file: Path, line: int) -> dict[str, Any]:
    """Where a record came from, so later checks (duplicate ids) can point at its line."""
    return {"file": str(file), "line": line}


def read_canonical(file: Path) -> Iterator[QARecord]:
    """Our JSONL: {"id", "question", "options": {...}, "answer": "B"} or {"id", "question", "answers": [...]}."""
    for line, obj in _json_lines(file):
        rid = str(obj.get("id", f"{file.stem}-{line}"))
        question = _text(obj, "question", file, line)
        if "options" in obj:
            labels, texts = _options_from(obj["options"], file, line)
            gold_raw = _text(obj, "answer", file, line)
            pos = _gold_position(labels, gold_raw, file, line, "answer")
            yield QARecord(
                rid,
                question,
                tuple(texts),
                LETTERS[pos],
                source_labels=tuple(labels),
                meta=_where(file, line),
            )
        elif "answers" in obj or "answer" in obj:
            aliases = _aliases(obj, file, line)
            yield QARecord(rid, question, aliases=aliases, meta=_where(file, line))
        else:
            raise DataError(
                file,
                "a record needs 'options' + 'answer' (MCQA) or 'answers' (OEQA)",
                line=line,
                field="answers",
            )


def _aliases(obj: dict[str, Any], file: Path, line: int) -> tuple[str, ...]:
    raw = obj.get("answers")
    if raw is None:
        return (_text(obj, "answer", file, line),)
    if not isinstance(raw, list) or not raw:
        raise DataError(
            file, "expected a non-empty list of answer strings", line=line, field="answers"
        )
    out = []
    for i, alias in enumerate(raw):
        if not isinstance(alias, str | int | float) or not str(alias).strip():
            raise DataError(file, "empty or non-text answer", line=line, field=f"answers[{i}]")
        out.append(str(alias).strip())
    return tuple(out)


def read_arc(file: Path) -> Iterator[QARecord]:
    """AI2 ARC JSONL; labels may be A-E or 1-5 and items have 3 to 5 choices."""
    for line, obj in _json_lines(file):
        rid = _text(obj, "id", file, line)
        q = obj.get("question")
        if not isinstance(q, dict):
            raise DataError(
                file, "expected an object with 'stem' and 'choices'", line=line, field="question"
            )
        stem = _text(q, "stem", file, line, where="question.")
        if not isinstance(q.get("choices"), list):
            raise DataError(file, "missing or not a list", line=line, field="question.choices")
        labels, texts = _options_from(q["choices"], file, line)
        gold_raw = _text(obj, "answerKey", file, line)
        pos = _gold_position(labels, gold_raw, file, line, "answerKey")
        yield QARecord(
            rid,
            stem,
            tuple(texts),
            LETTERS[pos],
            source_labels=tuple(labels),
            meta=_where(file, line),
        )


def read_nq(file: Path) -> Iterator[QARecord]:
    """Natural Questions (open) JSONL: {"qid", "question", "answer", "answers": [...]}."""
    for line, obj in _json_lines(file):
        rid = str(obj.get("qid") or obj.get("id") or f"{file.stem}-{line}")
        question = _text(obj, "question", file, line)
        yield QARecord(rid, question, aliases=_aliases(obj, file, line), meta=_where(file, line))


# OpenAI chat fine-tuning lines are read as open-ended QA: the user turn is the question and
# the assistant turn its gold answer. Longer answers are not QA gold labels (they could never
# be matched by the OEQA scorer), so they are refused rather than silently mis-scored.
CHAT_MAX_ANSWER_CHARS = 300
_CHAT_TOOL_KEYS = ("tool_calls", "function_call")


def _chat_content(message: dict[str, Any], file: Path, line: int, where: str) -> str:
    """A turn's text: a string, or a list of `{"type": "text", "text": ...}` parts."""
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise DataError(
                    file,
                    "only text content parts are supported",
                    line=line,
                    field=f"{where}.content[{i}]",
                )
            texts.append(part["text"])
        content = "".join(texts)
    if content is None:
        raise DataError(file, "missing", line=line, field=f"{where}.content")
    if not isinstance(content, str):
        raise DataError(
            file,
            f"expected text, got {type(content).__name__}",
            line=line,
            field=f"{where}.content",
        )
    if not content.strip():
        raise DataError(file, "empty", line=line, field=f"{where}.content")
    return content.strip()


def read_openai_chat(file: Path) -> Iterator[QARecord]:
    """OpenAI chat fine-tuning JSONL, one question per line, read as OEQA:
    {"messages": [{"role": "system", ...}?, {"role": "user", "content": Q}, {"role": "assistant", "content": A}]}.

    Anything that is not one question and one short answer (system-only lines, further turns,
    tool or function calls, weight-0 answers) is an error naming the line and the message.
    """
    for line, obj in _json_lines(file):
        for key in ("tools", "functions"):
            if key in obj:
                raise DataError(
                    file,
                    "tool and function definitions are not supported; each line must be one question and its answer",
                    line=line,
                    field=key,
                )
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(
                file, "expected a non-empty list of chat messages", line=line, field="messages"
            )
        roles = []
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                raise DataError(
                    file,
                    f"expected a message object, got {type(message).__name__}",
                    line=line,
                    field=where,
                )
            role = message.get("role")
            if role in ("tool", "function") or any(k in message for k in _CHAT_TOOL_KEYS):
                raise DataError(
                    file, "tool and function calls are not supported", line=line, field=where
                )
            if role not in ("system", "developer", "user", "assistant"):
                raise DataError(
                    file,
                    f"unknown role {role!r}; expected system, user or assistant",
                    line=line,
                    field=f"{where}.role",
                )
            roles.append(role)
        # Leading system/developer messages are allowed and dropped: GRAIT writes its own prompt.
        start = 0
        while start < len(roles) and roles[start] in ("system", "developer"):
            start += 1
        turns = roles[start:]
        if not turns:
            raise DataError(
                file,
                "only a system message; expected a user question and an assistant answer",
                line=line,
                field="messages",
            )
        if turns[0] != "user":
            raise DataError(
                file,
                f"expected the user question after the system message, got {turns[0]!r}",
                line=line,
                field=f"messages[{start}].role",
            )
        if len(turns) == 1:
            raise DataError(
                file, "the user question has no assistant answer", line=line, field="messages"
            )
        if turns[1] != "assistant":
            raise DataError(
                file,
                "expected exactly one user question followed by one assistant answer",
                line=line,
                field=f"messages[{start + 1}].role",
            )
        if len(turns) > 2:
            raise DataError(
                file,
                f"multi-turn conversations are not supported ({len(turns)} turns); expected one question and one answer",
                line=line,
                field=f"messages[{start + 2}]",
            )
        answer_message = messages[start + 1]
        if answer_message.get("weight", 1) != 1:
            raise DataError(
                file,
                "an answer with weight 0 trains nothing; remove the line or set weight 1",
                line=line,
                field=f"messages[{start + 1}].weight",
            )
        question = _chat_content(messages[start], file, line, f"messages[{start}]")
        answer = _chat_content(answer_message, file, line, f"messages[{start + 1}]")
        if len(answer) > CHAT_MAX_ANSWER_CHARS:
            raise DataError(
                file,
                f"answer is {len(answer)} characters; chat lines are read as open-ended QA and need a short answer (at most {CHAT_MAX_ANSWER_CHARS})",
                line=line,
                field=f"messages[{start + 1}].content",
            )
        rid = str(obj.get("id") or f"{file.stem}-{line}")
        yield QARecord(rid, question, aliases=(answer,), meta=_where(file, line))


def _mmlu_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        if not files:
            raise DataError(path, "folder holds no .csv files")
        return files
    return [path]


def read_mmlu(path: Path) -> Iterator[QARecord]:
    """MMLU CSV (`id,lang,question,A,B,C,D,target`), one file or a folder of subjects."""
    for file in _mmlu_files(path):
        with file.open(encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(file, "empty file", line=1)
            if [h.strip() for h in header] != MMLU_HEADER:
                raise DataError(
                    file, f"expected header {','.join(MMLU_HEADER)}, got {','.join(header)}", line=1
                )
            end = reader.line_num
            for row in reader:
                # A quoted field may span lines: report the line the row starts on.
                line, end = end + 1, reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(MMLU_HEADER):
                    raise DataError(
                        file, f"expected {len(MMLU_HEADER)} columns, got {len(row)}", line=line
                    )
                obj = dict(zip(MMLU_HEADER, row))
                options = []
                for label in "ABCD":
                    text = obj[label].strip()
                    if not text:
                        raise DataError(file, "empty option", line=line, field=label)
                    options.append(text)
                target = obj["target"].strip()
                if target not in "ABCD" or len(target) != 1:
                    raise DataError(
                        file, f"{target!r} is not one of A, B, C, D", line=line, field="target"
                    )
                question = _text(obj, "question", file, line)
                rid = obj["id"].strip() or f"{file.stem}-{line}"
                meta = {"subject": file.stem, **_where(file, line)}
                yield QARecord(rid, question, tuple(options), target, meta=meta)


READERS = {
    "canonical": read_canonical,
    "mmlu": read_mmlu,
    "arc": read_arc,
    "nq": read_nq,
    "openai_chat": read_openai_chat,
}


def detect_format(path: Path) -> str:
    """Guess the format from the file name or its first record."""
    if path.is_dir() or path.suffix.lower() == ".csv":
        return "mmlu"
    with path.open(encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(
                    path, f"invalid JSON ({exc.msg} at column {exc.colno})", line=number
                ) from None
            if not isinstance(obj, dict):
                raise DataError(path, "expected a JSON object per line", line=number)
            if "messages" in obj:
                return "openai_chat"
            if isinstance(obj.get("question"), dict) and "answerKey" in obj:
                return "arc"
            if "qid" in obj and "answers" in obj:
                return "nq"
            return "canonical"
    raise DataError(path, "file holds no records")


def load_records(path: str | Path, format: str = "auto") -> list[QARecord]:
    """Read every record of a file; raise DataError on the first bad one."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or folder")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in READERS:
        raise DataError(path, f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    records = list(READERS[fmt](path))
    if not records:
        raise DataError(path, "file holds no records")
    seen: set[str] = set()
    for rec in records:
        if rec.id in seen:
            where = rec.meta.get("file", path)
            raise DataError(
                where, f"duplicate id {rec.id!r}", line=rec.meta.get("line"), field="id"
            )
        seen.add(rec.id)
    return records


def take(
    records: list[QARecord], *, seed: int, shuffle: bool, offset: int, limit: int | None
) -> list[QARecord]:
    """Deterministic excerpt: shuffle with the seed, then slice."""
    out = list(records)
    if shuffle:
        random.Random(seed).shuffle(out)
    end = None if limit is None else offset + limit
    return out[offset:end]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
