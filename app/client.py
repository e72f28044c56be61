"""Client commands over HTTP (`python -m app jobs ...`), so platform scripts need no hand-written
HTTP. JSON goes to stdout; progress lines go to stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from grait.methods import METHOD_NAMES

TERMINAL = ("succeeded", "failed", "cancelled")


class ServiceError(SystemExit):
    pass


def _client(args: argparse.Namespace) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(
        base_url=args.url.rstrip("/"), headers=headers, timeout=httpx.Timeout(60, connect=5)
    )


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            where = f" [{error['param']}]" if error.get("param") else ""
            message = f"error {response.status_code} {error['code']}{where}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = f"error {response.status_code}: {response.text[:500]}"
        print(message, file=sys.stderr)
        raise ServiceError(1)
    return response.json()


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _paged(
    client: httpx.Client, path: str, params: dict[str, Any], limit: int | None
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = None
    while True:
        page = _check(
            client.get(path, params={**params, "limit": 100, **({"after": after} if after else {})})
        )
        out += page["data"]
        if not page["has_more"] or (limit and len(out) >= limit):
            return out[:limit] if limit else out
        after = page["last_id"]


def _json_arg(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    return json.loads(text)


def _status_line(job: dict[str, Any]) -> str:
    eta = f", eta {job['eta_seconds']:.0f}s" if job.get("eta_seconds") else ""
    stage = f" {job['stage']}" if job.get("stage") else ""
    codes = ", ".join(w["code"] for w in job.get("warnings") or [])
    warned = f" - warnings: {codes}" if codes else ""
    return f"[{job['status']}]{stage} {job['percent']:.1f}%{eta}{warned}"


def follow(client: httpx.Client, job_id: str, *, interval: float = 1.0) -> dict[str, Any]:
    """Print events as they arrive until the job ends; return the final job."""
    after = None
    while True:
        page = _check(
            client.get(
                f"/v1/jobs/{job_id}/events",
                params={"limit": 1000, **({"after": after} if after else {})},
            )
        )
        for event in page["data"]:
            if event["type"] != "progress":
                print(f"{event['level']:7} {event['type']:15} {event['message']}", file=sys.stderr)
            after = event["id"]
        job = _check(client.get(f"/v1/jobs/{job_id}"))
        if page["has_more"]:
            continue
        print(_status_line(job), file=sys.stderr)
        if job["status"] in TERMINAL:
            return job
        time.sleep(interval)


def cmd_datasets_upload(args: argparse.Namespace) -> int:
    with _client(args) as client, Path(args.file).open("rb") as fh:
        data = {"format": args.format, **({"name": args.name} if args.name else {})}
        _print(
            _check(
                client.post("/v1/datasets", files={"file": (Path(args.file).name, fh)}, data=data)
            )
        )
    return 0


def cmd_datasets_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(_paged(client, "/v1/datasets", {}, args.limit))
    return 0


def cmd_datasets_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(_check(client.get(f"/v1/datasets/{args.id}")))
    return 0


def cmd_datasets_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(_check(client.delete(f"/v1/datasets/{args.id}")))
    return 0


def cmd_jobs_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "method": args.method,
        "train_dataset": args.train,
        "eval_datasets": args.eval or [],
        "hyperparameters": _json_arg(args.hyperparameters),
        "seed": args.seed,
    }
    if args.base_model:
        body["base_model"] = args.base_model
    if args.suffix:
        body["suffix"] = args.suffix
    with _client(args) as client:
        job = _check(client.post("/v1/jobs", json=body))
        if args.wait:
            job = follow(client, job["id"])
        _print(job)
    return 0 if not args.wait or job["status"] == "succeeded" else 2


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(
            _paged(client, "/v1/jobs", {"status": args.status} if args.status else {}, args.limit)
        )
    return 0


def cmd_jobs_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(_check(client.get(f"/v1/jobs/{args.id}")))
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(_check(client.post(f"/v1/jobs/{args.id}/cancel")))
    return 0


def cmd_jobs_events(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.follow:
            job = follow(client, args.id)
            return 0 if job["status"] == "succeeded" else 2
        _print(_paged(client, f"/v1/jobs/{args.id}/events", {}, None))
    return 0


def cmd_jobs_download(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _client(args) as client:
        artifacts = _check(client.get(f"/v1/jobs/{args.id}/artifacts"))["data"]
        wanted = [a for a in artifacts if not args.kind or a["kind"] in args.kind]
        if not wanted:
            print(
                f"job {args.id} has no matching artifacts (has: {[a['kind'] for a in artifacts]})",
                file=sys.stderr,
            )
            return 1
        for artifact in wanted:
            target = out_dir / artifact["filename"]
            # An object store may answer 307 to a presigned URL (httpx drops the API key
            # when the redirect leaves the API's origin).
            with client.stream("GET", artifact["download_url"], follow_redirects=True) as response:
                if response.status_code >= 400:
                    response.read()
                    _check(response)
                with target.open("wb") as fh:
                    for chunk in response.iter_bytes():
                        fh.write(chunk)
            print(target)
    return 0


def add_client_commands(sub: Any, default_url: str, default_api_key: str | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=default_url, help=f"service URL (GRAIT_URL; default {default_url})"
    )
    common.add_argument(
        "--api-key",
        default=default_api_key,
        help="API key sent as Bearer (default: GRAIT_API_KEY)",
    )

    datasets = sub.add_parser("datasets", help="upload and manage QA datasets").add_subparsers(
        dest="sub", required=True
    )
    p = datasets.add_parser(
        "upload", parents=[common], help="upload a QA file (validated before it is stored)"
    )
    p.add_argument("file")
    p.add_argument("--format", default="auto", choices=["auto", "canonical", "mmlu", "arc", "nq"])
    p.add_argument("--name")
    p.set_defaults(func=cmd_datasets_upload)
    p = datasets.add_parser("list", parents=[common])
    p.add_argument("--limit", type=int)
    p.set_defaults(func=cmd_datasets_list)
    for name, func in (("get", cmd_datasets_get), ("delete", cmd_datasets_delete)):
        p = datasets.add_parser(name, parents=[common])
        p.add_argument("id")
        p.set_defaults(func=func)

    jobs = sub.add_parser("jobs", help="submit and follow tuning jobs").add_subparsers(
        dest="sub", required=True
    )
    p = jobs.add_parser("create", parents=[common], help="submit a job")
    p.add_argument("--train", required=True, help="dataset id")
    p.add_argument("--eval", action="append", help="dataset id; repeat (first = in-distribution)")
    p.add_argument(
        "--method",
        default="grait",
        choices=METHOD_NAMES,
    )
    p.add_argument("--base-model")
    p.add_argument("--hyperparameters", help="JSON object, or @file.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suffix")
    p.add_argument("--wait", action="store_true", help="follow events until the job ends")
    p.set_defaults(func=cmd_jobs_create)
    p = jobs.add_parser("list", parents=[common])
    p.add_argument(
        "--status", choices=["validating", "queued", "running", "succeeded", "failed", "cancelled"]
    )
    p.add_argument("--limit", type=int)
    p.set_defaults(func=cmd_jobs_list)
    for name, func in (("get", cmd_jobs_get), ("cancel", cmd_jobs_cancel)):
        p = jobs.add_parser(name, parents=[common])
        p.add_argument("id")
        p.set_defaults(func=func)
    p = jobs.add_parser("events", parents=[common])
    p.add_argument("id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=cmd_jobs_events)
    p = jobs.add_parser(
        "download",
        parents=[common],
        help="download artifacts (adapter .tar.gz, reports, train set)",
    )
    p.add_argument("id")
    p.add_argument(
        "--kind",
        action="append",
        help="adapter | report_json | report_md | report_plot | train_set | selection | "
        "operating_point | operating_point_plot",
    )
    p.add_argument("--out", default=".")
    p.set_defaults(func=cmd_jobs_download)
