"""OpenAI chat fine-tuning JSONL read as open-ended QA (format `openai_chat`)."""

import json
from pathlib import Path

import pytest

from grait.data import FORMATS, DataError, QARecord, detect_format, load_records


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _chat(question: str, answer: str, *, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def _error(path: Path) -> DataError:
    with pytest.raises(DataError) as info:
        load_records(path)
    return info.value


def test_one_question_and_answer_per_line_is_open_ended_qa(tmp_path):
    path = _jsonl(
        tmp_path / "chat.jsonl",
        [
            _chat("Capital of France?", "Paris", system="You are terse."),
            {"id": "q2", **_chat("2+2?", " 4 ")},
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Largest planet?"}]},
                    {"role": "assistant", "content": "Jupiter", "weight": 1},
                ]
            },
        ],
    )

    assert detect_format(path) == "openai_chat" and "openai_chat" in FORMATS
    first, second, third = load_records(path)

    assert first == QARecord("chat-1", "Capital of France?", aliases=("Paris",))
    assert first.kind == "oeqa" and first.answer_text == "Paris"
    assert (second.id, second.aliases) == ("q2", ("4",))
    assert third.question == "Largest planet?"


@pytest.mark.parametrize(
    ("bad", "field", "words"),
    [
        ({"messages": [{"role": "system", "content": "hi"}]}, "messages", "only a system message"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a?"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c?"},
                    {"role": "assistant", "content": "d"},
                ]
            },
            "messages[2]",
            "multi-turn",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "tool_calls": [{"id": "1", "type": "function"}]},
                ]
            },
            "messages[1]",
            "tool",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a?"},
                    {"role": "tool", "content": "x"},
                ]
            },
            "messages[1]",
            "tool",
        ),
        ({**_chat("a?", "b"), "tools": []}, "tools", "tool"),
        ({"messages": [{"role": "user", "content": "a?"}]}, "messages", "no assistant answer"),
        (
            {
                "messages": [
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "a?"},
                ]
            },
            "messages[0].role",
            "user question",
        ),
        (_chat("a?", ""), "messages[1].content", "empty"),
        (_chat("a?", "x" * 301), "messages[1].content", "short answer"),
        ({"messages": "hi"}, "messages", "list"),
        (
            {"messages": [{"role": "bot", "content": "a"}]},
            "messages[0].role",
            "unknown role",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                    {"role": "assistant", "content": "b"},
                ]
            },
            "messages[0].content[0]",
            "text",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a?"},
                    {"role": "assistant", "content": "b", "weight": 0},
                ]
            },
            "messages[1].weight",
            "weight 0",
        ),
    ],
)
def test_anything_but_one_question_and_a_short_answer_names_line_and_field(
    tmp_path, bad, field, words
):
    path = _jsonl(tmp_path / "chat.jsonl", [_chat("fine?", "yes"), _chat("also?", "yes"), bad])

    error = _error(path)

    assert (error.line, error.field) == (3, field), error
    assert words in error.reason
    assert "line 3" in str(error)


def test_chat_format_can_be_named_explicitly_and_ids_must_be_unique(tmp_path):
    path = _jsonl(
        tmp_path / "dup.jsonl", [{"id": "x", **_chat("a?", "b")}, {"id": "x", **_chat("c?", "d")}]
    )
    with pytest.raises(DataError) as info:
        load_records(path, "openai_chat")
    assert (info.value.line, info.value.field) == (2, "id")
