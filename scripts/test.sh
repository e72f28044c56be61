#!/usr/bin/env bash
# One command to the full test suite on a fresh machine: setup, make sure Postgres and Redis
# answer (starting them where this machine has them installed), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

ensure_postgres() {
  pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && return 0
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && return 0; sleep 1; done
  fi
  echo "PostgreSQL is not reachable at 127.0.0.1:5432" >&2
}
ensure_redis() {
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && return 0
  if command -v redis-server >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
    for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && return 0; sleep 1; done
  fi
  echo "Redis is not reachable at 127.0.0.1:6379" >&2
}
ensure_browser() {
  # The dashboard's browser test drives Debian's headless Chromium.
  command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; } \
      || true
  fi
  command -v chromedriver >/dev/null 2>&1 || echo "Chromium/chromedriver missing: the browser test will fail" >&2
}
ensure_postgres
ensure_redis
ensure_browser
# The service tests fail (never skip) on a missing Postgres/Redis/redis-server here.
export GRAIT_REQUIRE_SERVICES=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
