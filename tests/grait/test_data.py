import json
from pathlib import Path

import pytest

from grait.data import DataError, QARecord, detect_format, load_records, read_jsonl, write_jsonl
from tests.conftest import SHARED_DATA

MMLU_HEADER = "id,lang,question,A,B,C,D,target\n"


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _arc(rid: str, labels: list[str], answer: str, stem: str = "Which one?") -> dict:
    choices = [{"text": f"choice {label}", "label": label} for label in labels]
    return {"id": rid, "question": {"stem": stem, "choices": choices}, "answerKey": answer}


def _error(path: Path, fmt: str = "auto") -> DataError:
    with pytest.raises(DataError) as info:
        load_records(path, fmt)
    return info.value


# --- readers, one per format -------------------------------------------------------------


def test_canonical_mcqa_accepts_option_objects_and_lists(tmp_path):
    path = _jsonl(
        tmp_path / "mc.jsonl",
        [
            {"id": "a", "question": "2+2?", "options": {"A": "3", "B": "4"}, "answer": "B"},
            {"id": "b", "question": "Sky?", "options": ["green", "blue", "red"], "answer": "B"},
        ],
    )
    first, second = load_records(path)
    assert first == QARecord("a", "2+2?", ("3", "4"), "B", source_labels=("A", "B"))
    assert first.kind == "mcqa" and first.answer_text == "B. 4"
    assert second.options == ("green", "blue", "red") and second.gold == "B"


def test_canonical_oeqa_reads_answer_lists_and_single_answers(tmp_path):
    path = _jsonl(
        tmp_path / "oe.jsonl",
        [
            {"id": "a", "question": "Hamlet author?", "answers": ["Shakespeare", "W. Shakespeare"]},
            {"id": "b", "question": "Capital of Peru?", "answer": "Lima"},
        ],
    )
    first, second = load_records(path, "canonical")
    assert first.kind == "oeqa" and first.aliases == ("Shakespeare", "W. Shakespeare")
    assert second.aliases == ("Lima",) and second.answer_text == "Lima"


def test_canonical_round_trips_through_to_json(tmp_path):
    records = [
        QARecord("a", "Q1?", ("x", "y", "z"), "C", source_labels=("A", "B", "C")),
        QARecord("b", "Q2?", aliases=("one", "two")),
    ]
    path = tmp_path / "rt.jsonl"
    write_jsonl(path, (r.to_json() for r in records))
    assert load_records(path) == records
    assert read_jsonl(path)[0]["options"] == {"A": "x", "B": "y", "C": "z"}


def test_mmlu_csv_keeps_quoted_commas_and_newlines(tmp_path):
    path = tmp_path / "astronomy_test.csv"
    path.write_text(
        MMLU_HEADER
        + 'q1,en,"Which, of these,\nis a planet?",Mars,Sirius,Vega,Moon,A\n'
        + "q2,en,Plain question?,a,b,c,d,D\n",
        encoding="utf-8",
    )
    first, second = load_records(path)
    assert first.question == "Which, of these,\nis a planet?"
    assert first.options == ("Mars", "Sirius", "Vega", "Moon") and first.gold == "A"
    assert first.meta["subject"] == "astronomy_test"
    assert second.gold == "D" and second.answer_text == "D. d"


def test_mmlu_folder_reads_every_subject(tmp_path):
    folder = tmp_path / "mmlu"
    folder.mkdir()
    (folder / "a_test.csv").write_text(MMLU_HEADER + "a1,en,Q?,1,2,3,4,B\n", encoding="utf-8")
    (folder / "b_test.csv").write_text(MMLU_HEADER + "b1,en,Q?,1,2,3,4,C\n", encoding="utf-8")
    records = load_records(folder)
    assert [(r.id, r.gold, r.meta["subject"]) for r in records] == [
        ("a1", "B", "a_test"),
        ("b1", "C", "b_test"),
    ]


def test_arc_digit_labels_map_to_letters_and_keep_gold_text(tmp_path):
    path = _jsonl(tmp_path / "arc.jsonl", [_arc("d", ["1", "2", "3", "4"], "3")])
    (rec,) = load_records(path, "arc")
    assert rec.gold == "C"
    assert rec.options[rec.gold_index] == "choice 3"
    assert rec.source_labels == ("1", "2", "3", "4")
    assert rec.answer_text == "C. choice 3"


def test_arc_items_with_three_and_five_choices(tmp_path):
    path = _jsonl(
        tmp_path / "arc.jsonl",
        [_arc("three", ["A", "B", "C"], "C"), _arc("five", ["A", "B", "C", "D", "E"], "E")],
    )
    three, five = load_records(path)
    assert three.labels == ("A", "B", "C") and three.options[three.gold_index] == "choice C"
    assert five.labels == ("A", "B", "C", "D", "E") and five.gold == "E"
    assert five.options[five.gold_index] == "choice E"


def test_nq_reads_all_aliases(tmp_path):
    row = {
        "qid": "nq_1",
        "lang": "en",
        "question": "moon landing?",
        "answer": "1969",
        "answers": ["1969", "July 1969"],
    }
    (rec,) = load_records(_jsonl(tmp_path / "nq.jsonl", [row]))
    assert rec.id == "nq_1" and rec.kind == "oeqa" and rec.aliases == ("1969", "July 1969")


# --- format detection --------------------------------------------------------------------


def test_detect_format_from_name_and_first_record(tmp_path):
    csv_path = tmp_path / "x.csv"
    csv_path.write_text(MMLU_HEADER, encoding="utf-8")
    arc = _jsonl(tmp_path / "arc.jsonl", [_arc("a", ["A", "B"], "A")])
    nq = _jsonl(tmp_path / "nq.jsonl", [{"qid": "1", "question": "q?", "answers": ["a"]}])
    canonical = _jsonl(tmp_path / "c.jsonl", [{"id": "1", "question": "q?", "answers": ["a"]}])
    blank_first = tmp_path / "blank.jsonl"
    blank_first.write_text("\n\n" + arc.read_text(encoding="utf-8"), encoding="utf-8")
    assert detect_format(csv_path) == "mmlu"
    assert detect_format(tmp_path) == "mmlu"
    assert detect_format(arc) == "arc"
    assert detect_format(nq) == "nq"
    assert detect_format(canonical) == "canonical"
    assert detect_format(blank_first) == "arc"


# --- errors name the file, the line and the field ----------------------------------------


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "1", "question": "q?", "answers": ["a"]})
    path.write_text(good + "\n" + good.replace('"1"', '"2"') + "\n{not json\n", encoding="utf-8")
    err = _error(path, "canonical")
    assert err.file == str(path) and err.line == 3
    assert str(path) in str(err) and "line 3" in str(err) and "invalid JSON" in str(err)


def test_arc_missing_answer_key(tmp_path):
    item = _arc("a", ["A", "B"], "A")
    del item["answerKey"]
    path = _jsonl(tmp_path / "arc.jsonl", [_arc("ok", ["A", "B"], "B"), item])
    err = _error(path, "arc")
    assert (err.line, err.field) == (2, "answerKey")
    assert str(path) in str(err) and "line 2" in str(err) and "answerKey" in str(err)


def test_arc_answer_key_not_among_labels(tmp_path):
    path = _jsonl(tmp_path / "arc.jsonl", [_arc("a", ["1", "2", "3", "4"], "C")])
    err = _error(path)
    assert (err.line, err.field) == (1, "answerKey")
    assert "'C'" in str(err) and "['1', '2', '3', '4']" in str(err) and str(path) in str(err)


def test_mmlu_bad_target_names_line_after_multiline_row(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        MMLU_HEADER + 'q1,en,"two\nlines",a,b,c,d,A\n' + "q2,en,Q?,a,b,c,d,E\n",
        encoding="utf-8",
    )
    err = _error(path)
    assert (err.line, err.field) == (4, "target")
    assert str(path) in str(err) and "line 4" in str(err) and "'E'" in str(err)


def test_mmlu_error_in_multiline_row_names_the_line_it_starts_on(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(MMLU_HEADER + 'q1,en,"two\nlines",a,b,c,d,X\n', encoding="utf-8")
    err = _error(path)
    assert (err.line, err.field) == (2, "target")


def test_mmlu_wrong_header(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("question,A,B,C,D,answer\nQ?,a,b,c,d,A\n", encoding="utf-8")
    err = _error(path)
    assert err.line == 1 and str(path) in str(err) and "header" in str(err)


@pytest.mark.parametrize(
    "name, content, fmt",
    [
        (
            "c.jsonl",
            json.dumps({"id": "1", "question": "   ", "answers": ["a"]}) + "\n",
            "canonical",
        ),
        ("m.csv", MMLU_HEADER + "q1,en,,a,b,c,d,A\n", "mmlu"),
        ("nq.jsonl", json.dumps({"qid": "1", "question": "", "answers": ["a"]}) + "\n", "nq"),
    ],
)
def test_empty_question_names_the_field(tmp_path, name, content, fmt):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    err = _error(path, fmt)
    assert (err.line, err.field) == (2 if fmt == "mmlu" else 1, "question")
    assert "empty" in str(err) and str(path) in str(err)


def test_arc_empty_stem_names_the_nested_field(tmp_path):
    path = _jsonl(tmp_path / "arc.jsonl", [_arc("a", ["A", "B"], "A", stem=" ")])
    err = _error(path)
    assert (err.line, err.field) == (1, "question.stem")


def test_duplicate_id_names_file_line_and_field(tmp_path):
    rows = [{"id": "x", "question": f"q{i}?", "answers": ["a"]} for i in range(2)]
    rows.insert(1, {"id": "y", "question": "q?", "answers": ["a"]})
    path = _jsonl(tmp_path / "dup.jsonl", rows)
    err = _error(path)
    assert (err.line, err.field) == (3, "id")
    assert str(path) in str(err) and "line 3" in str(err) and "'x'" in str(err)


def test_missing_file_and_empty_file(tmp_path):
    assert "no such file" in str(_error(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    assert "no records" in str(_error(empty))


def test_unknown_format_lists_the_allowed_ones(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"id": "1", "question": "q?", "answers": ["a"]}])
    err = _error(path, "squad")
    assert "'squad'" in str(err) and "canonical, mmlu, arc, nq" in str(err)


# --- the real ARC file ---------------------------------------------------------------------


@pytest.mark.skipif(
    not (SHARED_DATA / "arc_easy" / "test.jsonl").exists(), reason="shared data not present"
)
def test_real_arc_digit_labelled_items_keep_their_gold_text():
    path = SHARED_DATA / "arc_easy" / "test.jsonl"
    records = {r.id: r for r in load_records(path)}
    raw = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    assert len(records) == len(raw)
    digit_items = [item for item in raw if item["question"]["choices"][0]["label"].isdigit()]
    assert digit_items, "the ARC file is expected to hold digit-labelled items"
    for item in digit_items:
        rec = records[item["id"]]
        choices = item["question"]["choices"]
        gold_text = next(c["text"] for c in choices if c["label"] == item["answerKey"])
        assert rec.options[rec.gold_index] == gold_text.strip(), item["id"]
        assert rec.source_labels == tuple(c["label"] for c in choices)
        assert rec.source_labels[rec.gold_index] == item["answerKey"]


def test_duplicate_id_across_mmlu_subjects_names_the_subject_file(tmp_path):
    folder = tmp_path / "mmlu"
    folder.mkdir()
    (folder / "a_test.csv").write_text(MMLU_HEADER + "same,en,Q?,1,2,3,4,B\n", encoding="utf-8")
    (folder / "b_test.csv").write_text(
        MMLU_HEADER + "other,en,Q?,1,2,3,4,C\nsame,en,Q?,1,2,3,4,C\n", encoding="utf-8"
    )
    err = _error(folder)
    assert (err.file, err.line, err.field) == (str(folder / "b_test.csv"), 3, "id")
