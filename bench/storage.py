"""Object-store client throughput: how `app.storage.S3Storage`'s client was chosen.

`python -m bench.storage [--sizes 64,256] [--repeats 2] [--endpoint URL]` starts a local
S3-protocol server (moto's, from PyPI: the one the tests use) unless `--endpoint` names one,
then times uploading and downloading a file of each size with every client installed
(boto3's transfer manager, boto3 streaming `get_object`, obstore, s3fs), next to a plain
filesystem copy. Each measurement runs in a fresh subprocess so its peak RSS says whether
the client streamed (a client that buffers the object shows the object's size there).
Prints a Markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BUCKET = "bench"
PART = 8 * 1024 * 1024
ACCESS = {"key": "bench", "secret": "bench-secret", "region": "us-east-1"}


def _measure(client: str, op: str, path: str, endpoint: str) -> dict[str, Any]:
    """One timed operation in this (fresh) process; returns seconds and peak RSS."""
    source = Path(path)
    key = f"bench/{source.name}"
    target = source.with_name(source.name + f".{client}.out")
    if client == "filesystem":
        started = time.perf_counter()
        if op == "upload":
            shutil.copyfile(source, target)
        else:
            shutil.copyfile(target, source.with_name(source.name + ".back"))
    elif client.startswith("boto3"):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=ACCESS["key"],
            aws_secret_access_key=ACCESS["secret"],
            region_name=ACCESS["region"],
            config=Config(s3={"addressing_style": "path"}),
        )
        config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART)
        started = time.perf_counter()
        if op == "upload":
            s3.upload_file(str(source), BUCKET, key, Config=config)
        elif client == "boto3":
            s3.download_file(BUCKET, key, str(target), Config=config)
        else:  # boto3-stream: what a streamed API download does
            body = s3.get_object(Bucket=BUCKET, Key=key)["Body"]
            with target.open("wb") as out:
                for chunk in body.iter_chunks(1024 * 1024):
                    out.write(chunk)
    elif client == "obstore":
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            BUCKET,
            endpoint=endpoint,
            access_key_id=ACCESS["key"],
            secret_access_key=ACCESS["secret"],
            region=ACCESS["region"],
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
        )
        started = time.perf_counter()
        if op == "upload":
            # As app.storage.S3Storage uploads: 4 parts in flight.
            obstore.put(store, key, source, chunk_size=PART, max_concurrency=4)
        else:
            with target.open("wb") as out:
                for chunk in obstore.get(store, key).stream(min_chunk_size=1024 * 1024):
                    out.write(chunk)
    elif client == "s3fs":
        import s3fs

        fs = s3fs.S3FileSystem(
            key=ACCESS["key"],
            secret=ACCESS["secret"],
            endpoint_url=endpoint,
            client_kwargs={"region_name": ACCESS["region"]},
        )
        started = time.perf_counter()
        if op == "upload":
            fs.put_file(str(source), f"{BUCKET}/{key}", chunksize=PART)
        else:
            fs.get_file(f"{BUCKET}/{key}", str(target))
    else:
        raise ValueError(client)
    seconds = time.perf_counter() - started
    # VmHWM, not ru_maxrss: the latter carries the parent's peak over fork + exec.
    status = Path("/proc/self/status").read_text()
    peak_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024}


def _clients() -> list[str]:
    names = ["filesystem"]
    for module, labels in (
        ("boto3", ["boto3", "boto3-stream"]),
        ("obstore", ["obstore"]),
        ("s3fs", ["s3fs"]),
    ):
        try:
            __import__(module)
        except ImportError:
            print(f"{module} is not installed: skipped", file=sys.stderr)
        else:
            names += labels
    return names


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto server did not start")


def _run(client: str, op: str, path: Path, endpoint: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.storage", "--one", client, op, str(path), endpoint],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256", help="MiB, comma-separated")
    parser.add_argument("--repeats", type=int, default=2, help="best of N")
    parser.add_argument("--endpoint", help="an S3 endpoint with bucket 'bench' (default: moto)")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_measure(*args.one)))
        return 0

    server = None
    endpoint = args.endpoint
    if endpoint is None:
        server, endpoint = _start_moto()
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=ACCESS["key"],
            aws_secret_access_key=ACCESS["secret"],
            region_name=ACCESS["region"],
        ).create_bucket(Bucket=BUCKET)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="grait-storage-bench-") as tmp:
            for mib in (int(s) for s in args.sizes.split(",")):
                path = Path(tmp) / f"{mib}mib-{uuid.uuid4().hex[:6]}.bin"
                with path.open("wb") as fh:
                    for _ in range(mib):
                        fh.write(os.urandom(1024 * 1024))
                for client in _clients():
                    best: dict[str, dict[str, Any]] = {}
                    for _ in range(args.repeats):
                        for op in ("upload", "download"):
                            if client == "boto3-stream" and op == "upload":
                                continue
                            got = _run(client, op, path, endpoint)
                            if op not in best or got["seconds"] < best[op]["seconds"]:
                                best[op] = got
                    rows.append((mib, client, best))
                    for out in Path(tmp).glob(path.name + ".*"):
                        out.unlink()
                path.unlink()
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)

    print(
        f"endpoint: {'moto (local)' if server else endpoint}, part size {PART >> 20} MiB, "
        f"best of {args.repeats}, {os.cpu_count()} CPU cores"
    )
    print("| size | client | upload MB/s | download MB/s | peak RSS up / down (MB) |")
    print("|---|---|---|---|---|")
    for mib, client, best in rows:
        cells = []
        for op in ("upload", "download"):
            got = best.get(op)
            cells.append(f"{mib * 1.048576 / got['seconds']:.0f}" if got else "—")
        rss = " / ".join(
            f"{best[op]['peak_rss_mb']:.0f}" if op in best else "—" for op in ("upload", "download")
        )
        print(f"| {mib} MiB | {client} | {cells[0]} | {cells[1]} | {rss} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
