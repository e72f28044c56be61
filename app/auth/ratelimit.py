"""A token bucket per API key: `rate_limit_burst` tokens, refilled at `rate_limit_per_second`.

With a Redis broker the buckets live in Redis (one Lua script, Redis's own clock), so every
API replica shares them; otherwise they live in this process (the embedded mode runs one API
process). If Redis cannot be reached the request is let through: a broker blip must not turn
into an API outage.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache
from typing import Any, Protocol

from app.settings import Settings

log = logging.getLogger(__name__)

# KEYS[1] = bucket; ARGV = rate, burst. Returns the seconds to wait ("0" = allowed).
_TAKE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


class Limiter(Protocol):
    def take(self, key_id: str) -> float:
        """0 when the request may go ahead, else the seconds until a token is back."""
        ...


class LocalLimiter:
    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key_id: str) -> float:
        now = time.monotonic()
        with self._lock:
            tokens, ts = self._buckets.get(key_id, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - ts) * self.rate)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / self.rate
            self._buckets[key_id] = (tokens, now)
            return wait


class RedisLimiter:
    def __init__(self, settings: Settings):
        import redis

        self.rate, self.burst = settings.rate_limit_per_second, settings.rate_limit_burst
        self.prefix = f"{settings.broker_key_prefix}grait:ratelimit:"
        self.client: Any = redis.Redis.from_url(
            settings.broker_url, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        self.script = self.client.register_script(_TAKE)
        self._last_warning = 0.0

    def take(self, key_id: str) -> float:
        try:
            return float(self.script(keys=[self.prefix + key_id], args=[self.rate, self.burst]))
        except Exception as exc:  # noqa: BLE001 - fail open, see the module docstring
            if time.monotonic() - self._last_warning > 30:
                self._last_warning = time.monotonic()
                log.warning("rate limiter: Redis unavailable (%s); not limiting", exc)
            return 0.0


class NoLimiter:
    def take(self, key_id: str) -> float:
        return 0.0


@lru_cache
def _limiter_for(settings_json: str) -> Limiter:
    settings = Settings.model_validate_json(settings_json)
    if settings.rate_limit_per_second <= 0:
        return NoLimiter()
    if settings.redis_broker:
        return RedisLimiter(settings)
    return LocalLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)


def get_limiter(settings: Settings) -> Limiter:
    return _limiter_for(settings.model_dump_json())
