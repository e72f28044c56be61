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
from app.settings import Settings, get_settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.migrate import upgrade

    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    upgrade(settings)
    _bootstrap_api_key(settings)
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
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        log_level="info",
        timeout_keep_alive=settings.keep_alive_seconds,
    )
    return 0


def _bootstrap_api_key(settings: Settings) -> None:
    """First start with no API key: register GRAIT_BOOTSTRAP_API_KEY, or make one and print it."""
    from app.auth.service import bootstrap_key
    from app.db import session_factory

    wanted = settings.bootstrap_api_key.get_secret_value() if settings.bootstrap_api_key else None
    with session_factory(settings)() as session:
        generated = bootstrap_key(session=session, key=wanted)
    if generated:
        print(
            "\nNo API key existed, so one was created for tenant 'default'. It is shown only "
            f"this once:\n\n    GRAIT_API_KEY={generated}\n\n"
            "Send it as 'Authorization: Bearer <key>'; more with `grait-service keys create`.\n",
            flush=True,
        )


def _keys(args: argparse.Namespace) -> int:
    import json

    from app.auth import service
    from app.db import session_factory

    with session_factory(get_settings())() as session:
        if args.keys_command == "create":
            row, key, tenant, created = service.create_key(
                session=session, tenant_name=args.tenant, name=args.name
            )
            out = {
                "id": row.id,
                "tenant": tenant.name,
                "tenant_id": tenant.id,
                "prefix": row.prefix,
                "key": key,
                **({"webhook_secret": tenant.webhook_secret} if created else {}),
            }
            if args.json:
                print(json.dumps(out))
            else:
                print(f"API key for tenant {tenant.name!r} (shown only now, store it):\n{key}")
                print(f"id {row.id}, prefix {row.prefix}")
                if created:
                    print(f"new tenant; its webhook signing secret: {tenant.webhook_secret}")
        elif args.keys_command == "list":
            rows = [
                {
                    "id": key.id,
                    "tenant": tenant.name,
                    "prefix": key.prefix,
                    "name": key.name,
                    "created_at": key.created_at.isoformat(),
                    "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
                }
                for key, tenant in service.list_keys(session=session, tenant_name=args.tenant)
            ]
            if args.json:
                print(json.dumps(rows))
            else:
                for r in rows:
                    state = f"revoked {r['revoked_at']}" if r["revoked_at"] else "active"
                    print(
                        f"{r['id']}  {r['prefix']}…  {r['tenant']:<20} {r['name'] or '':<20} {state}"
                    )
        else:
            row = service.revoke_key(session=session, key=args.key)
            if row is None:
                print(f"no single key with id or prefix {args.key!r}", file=sys.stderr)
                return 1
            print(f"revoked {row.id} ({row.prefix}…)")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from app.embedded import worker_command

    settings = get_settings()
    cmd = worker_command(settings, name=args.name or f"worker-{os.getpid()}@%h")
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
    worker = sub.add_parser(
        "worker",
        help="run a Celery worker on its class's job queue (GRAIT_QUEUE.GRAIT_COMPUTE_CLASS)",
    )
    worker.add_argument(
        "--name",
        default=None,
        help="Celery node name. Default worker-<pid>@%%h: unique per process, so two workers "
        "never take each other for dead; give a stable name per GPU slot (gpu0@%%h) to have a "
        "restarted worker resume its own interrupted job at once instead of after the stale "
        "window. Never run two processes under one name.",
    )
    worker.add_argument("--pool", default="solo", choices=["solo", "prefork"])
    worker.set_defaults(func=_worker)
    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="apply Alembic migrations")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=_db)
    keys = sub.add_parser("keys", help="API keys and their tenants (talks to the database)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="new key (and the tenant, if it is new)")
    create.add_argument("--tenant", required=True, help="tenant name, e.g. a team")
    create.add_argument("--name", help="label for the key")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=_keys)
    listing = keys_sub.add_parser("list", help="keys (prefix, tenant, state); never the keys")
    listing.add_argument("--tenant")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_keys)
    revoke = keys_sub.add_parser("revoke", help="revoke by key id or shown prefix")
    revoke.add_argument("key")
    revoke.set_defaults(func=_keys)
    settings = get_settings()
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    add_client_commands(sub, settings.url, api_key)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point for `grait-service` (and for `grait serve|worker|db|keys|datasets|jobs`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
