"""`python -m app [serve|worker|db upgrade|datasets ...|jobs ...]`: the service's commands.

`serve` (the default) migrates the database, then runs uvicorn; with the default settings
that is the whole embedded service on one machine (SQLite, embedded queue, one worker).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from app.client import add_client_commands
from app.settings import get_settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.migrate import upgrade

    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    upgrade(settings)
    mode = (
        "embedded (SQLite + local queue + 1 worker)"
        if settings.starts_embedded_worker
        else "API only"
    )
    print(
        f"GRAIT service ({mode}) on http://{host}:{port}  - docs at http://{host}:{port}/docs",
        flush=True,
    )
    # One API process: in embedded mode each uvicorn worker would start its own Celery worker.
    uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level="info")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from app.embedded import worker_command

    settings = get_settings()
    cmd = worker_command(settings, name=args.name)
    if args.pool != "solo":
        cmd[cmd.index("--pool") + 1] = args.pool
    os.execv(sys.executable, cmd)
    return 0  # pragma: no cover


def _db(args: argparse.Namespace) -> int:
    from app.migrate import upgrade

    upgrade(get_settings(), args.revision)
    print(f"database at {args.revision}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grait-service", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="migrate, then run the API (and the embedded worker)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=_serve)
    worker = sub.add_parser("worker", help="run a Celery worker on the job queue (GRAIT_QUEUE)")
    worker.add_argument(
        "--name", default="worker@%h", help="Celery node name; keep it stable per machine"
    )
    worker.add_argument("--pool", default="solo", choices=["solo", "prefork"])
    worker.set_defaults(func=_worker)
    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="apply Alembic migrations")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=_db)
    add_client_commands(sub, get_settings().url)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point for `grait-service` (and for `grait serve|worker|db|datasets|jobs`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
