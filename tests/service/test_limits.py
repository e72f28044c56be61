"""Limits from settings, each a precise 4xx/429 (with Retry-After where waiting helps).

One API process with small limits; each test uses its own tenant (the rate limit is per key).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import bearer, make_key, start_api, upload

pytestmark = pytest.mark.timeout(90)

LIMITS = {
    "GRAIT_MAX_UPLOAD_BYTES": str(8 * 1024),
    "GRAIT_MAX_DATASET_ROWS": "10",
    "GRAIT_MAX_QUEUED_JOBS_PER_TENANT": "2",
    "GRAIT_MAX_REQUEST_BYTES": "2048",
    "GRAIT_RATE_LIMIT_PER_SECOND": "0.5",
    "GRAIT_RATE_LIMIT_BURST": "30",
    "GRAIT_WEBHOOK_ALLOW_PRIVATE": "false",
    "GRAIT_METRICS_TOKEN": "scrape-me",
}


@pytest.fixture(scope="module")
def limited(service_env: dict[str, str], logs_dir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    # Its own queue, which no worker consumes: jobs submitted here stay queued.
    env = {**service_env, **LIMITS, "GRAIT_QUEUE": service_env["GRAIT_QUEUE"] + "-limits"}
    proc, base = start_api(env, logs_dir, name="api-limits")
    yield base, env
    proc.stop()


def tenant_client(limited: tuple[str, dict[str, str]], name: str) -> httpx.Client:
    base, env = limited
    return httpx.Client(base_url=base, headers=bearer(make_key(env, name)), timeout=30)


def small_arc(data_dir: Path, tmp_path: Path, rows: int) -> Path:
    lines = (data_dir / "arc_excerpt.jsonl").read_text().splitlines()[:rows]
    path = tmp_path / f"arc_{rows}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_upload_over_the_size_limit_is_413(
    limited: tuple[str, dict[str, str]], data_dir: Path
) -> None:
    with tenant_client(limited, "limits-size") as client:
        response = upload(client, data_dir / "arc_excerpt.jsonl")  # ~12 KB > 8 KiB
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("payload_too_large", "file")
    assert "8192" in error["message"]


def test_dataset_over_the_row_limit_is_422_naming_both_counts(
    limited: tuple[str, dict[str, str]], data_dir: Path, tmp_path: Path
) -> None:
    with tenant_client(limited, "limits-rows") as client:
        response = upload(client, small_arc(data_dir, tmp_path, 11))
        fits = upload(client, small_arc(data_dir, tmp_path, 10))
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["code"], error["rows"], error["max_rows"]) == ("too_many_rows", 11, 10)
    assert fits.status_code == 201


def test_queued_jobs_per_tenant_is_429_with_retry_after(
    limited: tuple[str, dict[str, str]], data_dir: Path, tmp_path: Path
) -> None:
    with tenant_client(limited, "limits-queue") as client:
        dataset = upload(client, small_arc(data_dir, tmp_path, 10)).json()["id"]
        jobs = [client.post("/v1/jobs", json={"train_dataset": dataset}) for _ in range(2)]
        assert [j.status_code for j in jobs] == [201, 201]
        third = client.post("/v1/jobs", json={"train_dataset": dataset})
        oai = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "smollm2-135m-instruct", "training_file": dataset},
        )
        client.post(f"/v1/jobs/{jobs[0].json()['id']}/cancel")
        after_cancel = client.post("/v1/jobs", json={"train_dataset": dataset})
        for job in (jobs[1], after_cancel):
            client.post(f"/v1/jobs/{job.json()['id']}/cancel")
    assert third.status_code == 429 and int(third.headers["retry-after"]) > 0
    assert third.json()["error"]["code"] == "too_many_queued_jobs"
    assert oai.status_code == 429 and oai.json()["error"]["type"] == "rate_limit_error"
    assert after_cancel.status_code == 201


def test_request_body_over_the_limit_is_413_declared_or_chunked(
    limited: tuple[str, dict[str, str]],
) -> None:
    big = {"train_dataset": "ds-x", "metadata": {"note": "x" * 4000}}
    with tenant_client(limited, "limits-body") as client:
        declared = client.post("/v1/jobs", json=big)
        chunked = client.post(
            "/v1/jobs",
            content=iter([json.dumps(big).encode()[:1500], json.dumps(big).encode()[1500:]]),
            headers={"content-type": "application/json"},
        )
        oai = client.post("/v1/fine_tuning/jobs", json={"model": "m", "suffix": "x" * 4000})
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"
    assert chunked.status_code == 413 and "2048" in chunked.json()["error"]["message"]
    assert oai.status_code == 413 and oai.json()["error"]["type"] == "invalid_request_error"


def test_rate_limit_per_key_is_429_with_retry_after(limited: tuple[str, dict[str, str]]) -> None:
    with (
        tenant_client(limited, "limits-rate") as client,
        tenant_client(limited, "limits-rate-other") as other,
    ):
        codes = [client.get("/v1/jobs").status_code for _ in range(35)]
        refused = client.get("/v1/jobs")
        oai = client.get("/v1/fine_tuning/jobs")
        neighbour = other.get("/v1/jobs")
    assert codes[:30] == [200] * 30 and 429 in codes[30:]
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 2  # one token back at 0.5/s
    assert oai.status_code == 429 and oai.json()["error"]["type"] == "rate_limit_error"
    assert neighbour.status_code == 200  # another key has its own bucket


def test_private_webhook_urls_are_refused_without_the_operator_setting(
    limited: tuple[str, dict[str, str]], data_dir: Path, tmp_path: Path
) -> None:
    with tenant_client(limited, "limits-webhook") as client:
        dataset = upload(client, small_arc(data_dir, tmp_path, 10)).json()["id"]
        for url in (
            "http://127.0.0.1:9/hook",
            "http://localhost/hook",
            "http://10.1.2.3/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/hook",
            "ftp://example.com/hook",
        ):
            response = client.post("/v1/jobs", json={"train_dataset": dataset, "webhook_url": url})
            assert response.status_code == 422, url
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("invalid_webhook_url", "webhook_url"), url


def test_metrics_behind_their_own_token_when_set(limited: tuple[str, dict[str, str]]) -> None:
    base, _ = limited
    assert httpx.get(base + "/metrics").status_code == 401
    assert httpx.get(base + "/metrics", headers=bearer("wrong")).status_code == 401
    assert httpx.get(base + "/metrics", headers=bearer("scrape-me")).status_code == 200
    assert httpx.get(base + "/healthz").status_code == 200


def test_path_like_upload_names_never_become_paths(
    client: httpx.Client, data_dir: Path, service_env: dict[str, str]
) -> None:
    root = Path(service_env["GRAIT_STORAGE_DIR"]).resolve()
    content = (data_dir / "arc_excerpt.jsonl").read_bytes()
    for name in (
        "../../../../tmp/escape.jsonl",
        "/etc/passwd.jsonl",
        "..\\..\\evil.jsonl",
        "..",
        "a/../../b.jsonl",
        "x.\x00jsonl",
    ):
        response = client.post("/v1/datasets", files={"file": (name, content)})
        assert response.status_code == 201, (name, response.text)
        body = response.json()
        assert "/" not in body["filename"] and "\\" not in body["filename"]
        assert not body["filename"].startswith(".")
        stored = list((root / "datasets" / body["id"]).iterdir())
        assert [p.name for p in stored] == [body["filename"]]
        assert all(p.resolve().is_relative_to(root) for p in stored)
        client.delete(f"/v1/datasets/{body['id']}")
    assert not Path("/tmp/escape.jsonl").exists()
