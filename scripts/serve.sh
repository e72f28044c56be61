#!/usr/bin/env bash
# One command to a running service: setup, migrations, API and a local worker (embedded mode:
# SQLite + a filesystem queue under ./var, no servers to install). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/grait-service "$@"
