from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import SHARED_DATA

from .conftest import upload

pytestmark = pytest.mark.timeout(60)


def stored_files(env: dict[str, str]) -> list[Path]:
    root = Path(env["GRAIT_STORAGE_DIR"])
    return sorted(p for p in root.rglob("*") if p.is_file() and "jobs" not in p.parts)


def test_upload_arc_excerpt_is_validated_and_described(
    client: httpx.Client, data_dir: Path
) -> None:
    response = upload(client, data_dir / "arc_excerpt.jsonl", name="arc-easy")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["object"] == "dataset" and body["id"].startswith("ds-")
    assert (body["format"], body["kind"], body["rows"], body["name"]) == (
        "arc",
        "mcqa",
        30,
        "arc-easy",
    )
    assert body["counts"] == {"mcqa": 30, "oeqa": 0}
    assert client.get(f"/v1/datasets/{body['id']}").json() == body


def test_upload_mmlu_csv_and_nq_jsonl_are_detected(
    client: httpx.Client, data_dir: Path, tmp_path: Path
) -> None:
    mmlu = upload(client, data_dir / "mmlu_excerpt.csv").json()
    assert (mmlu["format"], mmlu["kind"], mmlu["rows"]) == ("mmlu", "mcqa", 32)
    nq_rows = (SHARED_DATA / "nq" / "dev_part1.jsonl").read_text().splitlines()[:5]
    nq_file = tmp_path / "nq.jsonl"
    nq_file.write_text("\n".join(nq_rows) + "\n")
    nq = upload(client, nq_file).json()
    assert (nq["format"], nq["kind"], nq["counts"]) == ("nq", "oeqa", {"mcqa": 0, "oeqa": 5})


def test_invalid_upload_names_line_and_field_and_stores_nothing(
    client: httpx.Client, data_dir: Path, tmp_path: Path, service_env: dict[str, str]
) -> None:
    lines = (data_dir / "arc_excerpt.jsonl").read_text().splitlines()[:5]
    lines[3] = lines[3].replace('"answerKey":"', '"answerKey":"Z')  # line 4 names no option
    bad = tmp_path / "broken_arc.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    before_files, before_list = (
        stored_files(service_env),
        client.get("/v1/datasets", params={"limit": 100}).json(),
    )

    response = upload(client, bad)

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_dataset"
    assert (error["line"], error["field"], error["param"]) == (4, "answerKey", "file")
    assert (
        "line 4" in error["message"]
        and "answerKey" in error["message"]
        and "broken_arc.jsonl" in error["message"]
    )
    assert stored_files(service_env) == before_files
    assert client.get("/v1/datasets", params={"limit": 100}).json()["data"] == before_list["data"]


def test_unknown_format_name_is_422_on_the_format_field(
    client: httpx.Client, data_dir: Path
) -> None:
    response = upload(client, data_dir / "arc_excerpt.jsonl", format="parquet")
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "format"


def test_oversize_upload_is_413_and_stores_nothing(
    client: httpx.Client, tmp_path: Path, service_env: dict[str, str]
) -> None:
    limit = int(service_env["GRAIT_MAX_UPLOAD_BYTES"])
    big = tmp_path / "big.jsonl"
    row = '{"id": "q%d", "question": "What is %d + 1?", "answers": ["%d"]}\n'
    with big.open("w") as fh:
        i = 0
        while fh.tell() < limit + 100_000:
            fh.write(row % (i, i, i + 1))
            i += 1
    before = stored_files(service_env)
    response = upload(client, big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert stored_files(service_env) == before


def test_upload_without_multipart_is_415(client: httpx.Client) -> None:
    response = client.post("/v1/datasets", json={"file": "x"})
    assert response.status_code == 415
    assert response.json()["error"]["param"] == "file"


def test_unknown_dataset_is_404_with_error_body(client: httpx.Client) -> None:
    for response in (client.get("/v1/datasets/ds-nope"), client.delete("/v1/datasets/ds-nope")):
        assert response.status_code == 404
        assert response.json() == {
            "error": {
                "code": "not_found",
                "message": "No dataset with id 'ds-nope'.",
                "param": "id",
            }
        }


def test_unknown_route_and_bad_query_use_the_error_envelope(client: httpx.Client) -> None:
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad_limit = client.get("/v1/datasets", params={"limit": 0})
    assert bad_limit.status_code == 422
    assert bad_limit.json()["error"]["param"] == "limit"


def test_dataset_list_paginates_newest_first_with_cursor(
    client: httpx.Client, data_dir: Path
) -> None:
    created = [
        upload(client, data_dir / "arc_excerpt.jsonl", name=f"page-{i}").json()["id"]
        for i in range(3)
    ]
    first = client.get("/v1/datasets", params={"limit": 2}).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [d["id"] for d in first["data"]] == created[::-1][:2]
    assert (first["first_id"], first["last_id"]) == (created[2], created[1])
    second = client.get("/v1/datasets", params={"limit": 2, "after": first["last_id"]}).json()
    assert second["data"][0]["id"] == created[0]
    seen = []
    page = {"has_more": True, "last_id": None}
    while page["has_more"]:
        params = {"limit": 3} | ({"after": page["last_id"]} if page["last_id"] else {})
        page = client.get("/v1/datasets", params=params).json()
        seen += [d["id"] for d in page["data"]]
    assert len(seen) == len(set(seen)) and set(created) <= set(seen)


def test_delete_unused_dataset_removes_row_and_file(
    client: httpx.Client, data_dir: Path, service_env: dict[str, str]
) -> None:
    dataset = upload(client, data_dir / "arc_excerpt.jsonl").json()
    folder = Path(service_env["GRAIT_STORAGE_DIR"]) / "datasets" / dataset["id"]
    assert folder.is_dir()
    response = client.delete(f"/v1/datasets/{dataset['id']}")
    assert response.status_code == 200 and response.json() == {
        "id": dataset["id"],
        "object": "dataset",
        "deleted": True,
    }
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert not folder.exists()
