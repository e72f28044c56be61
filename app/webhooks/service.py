"""Webhooks: a job's terminal state POSTed, signed, to the URL it named; retried with backoff.

Standard Webhooks style: headers `webhook-id` (the delivery id, the same on every try),
`webhook-timestamp` (unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256>` over
`{id}.{timestamp}.{body}`, keyed with the tenant's `whsec_` secret (base64-decoded).

The delivery row is written in the same transaction as the job's terminal transition (API
cancel, worker finish, sweeper give-up), so no terminal state is missed; API processes send
due deliveries from a background thread. A try is claimed with a conditional UPDATE (a lease
on `next_attempt_at`), so several API replicas never send the same try twice.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import select, update

from app.db import short_session
from app.errors import APIError
from app.models import Job, Tenant, WebhookAttempt, WebhookDelivery, utcnow
from app.settings import Settings
from app.webhooks.outbox import enqueue_terminal  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)
RETRY_FACTOR = 4


class UnsafeURL(ValueError):
    pass


def resolve_public(url: str, *, allow_private: bool) -> list[str]:
    """The URL's addresses; UnsafeURL if it is not http(s) or resolves to a non-public one."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UnsafeURL(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeURL("must be an http:// or https:// URL with a host")
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UnsafeURL(f"host {parts.hostname!r} does not resolve ({exc})") from None
    addresses = sorted({info[4][0] for info in infos})
    if not allow_private:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if not ip.is_global or ip.is_multicast:
                raise UnsafeURL(
                    f"host {parts.hostname!r} resolves to {address}, a loopback, private, "
                    "link-local or reserved address (an operator may allow these with "
                    "GRAIT_WEBHOOK_ALLOW_PRIVATE)"
                )
    return addresses


def check_webhook_url(url: str, *, settings: Settings) -> None:
    try:
        resolve_public(url, allow_private=settings.webhook_allow_private)
    except UnsafeURL as exc:
        raise APIError(
            422, "invalid_webhook_url", f"webhook_url: {exc}", param="webhook_url"
        ) from None


def sign(secret: str, *, message_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def _claim(settings: Settings, delivery_id: str, attempts: int) -> tuple[str, dict, str] | None:
    """Lease the next try of a due delivery: (url, payload, tenant secret), or None if taken."""
    now = utcnow()
    lease = now + timedelta(seconds=settings.webhook_timeout_seconds + 30)
    with short_session(settings) as session:
        won = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == "pending",
                WebhookDelivery.attempts == attempts,
                WebhookDelivery.next_attempt_at <= now,
            )
            .values(next_attempt_at=lease)
        ).rowcount
        if not won:
            return None
        row = session.execute(
            select(WebhookDelivery.url, WebhookDelivery.payload, Tenant.webhook_secret)
            .join(Job, Job.id == WebhookDelivery.job_id)
            .join(Tenant, Tenant.id == Job.tenant_id)
            .where(WebhookDelivery.id == delivery_id)
        ).one()
        return row.url, row.payload, row.webhook_secret


def pinned_request(url: str, address: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The URL with its host replaced by the checked address, plus the Host header and TLS
    server name that keep the request (and certificate check) about the original name.

    Without this, httpx would resolve the name again to connect, and a name that answered
    with a public address for the check could answer with loopback for the connection.
    """
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + host
    if parts.port:
        netloc += f":{parts.port}"
    original_host = parts.netloc.rpartition("@")[2]
    pinned = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return pinned, {"host": original_host}, extensions


def _send(
    settings: Settings, *, delivery_id: str, url: str, payload: dict, secret: str
) -> tuple[int | None, str | None]:
    try:
        # Checked again at send time: the name may resolve elsewhere than at submit.
        addresses = resolve_public(url, allow_private=settings.webhook_allow_private)
    except UnsafeURL as exc:
        return None, f"refused: {exc}"
    target, host_header, extensions = pinned_request(url, addresses[0])
    body = json.dumps(payload, separators=(",", ":")).encode()
    timestamp = int(time.time())
    headers = {
        **host_header,
        "content-type": "application/json",
        "user-agent": "grait-service-webhooks",
        "webhook-id": delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message_id=delivery_id, timestamp=timestamp, body=body),
    }
    try:
        with httpx.Client(timeout=settings.webhook_timeout_seconds) as http:
            response = http.post(
                target,
                content=body,
                headers=headers,
                follow_redirects=False,
                extensions=extensions,
            )
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= response.status_code < 300:
        return response.status_code, None
    # The receiver's body is not kept: the tenant reads attempts back, and a body could hold
    # whatever the receiver (or something it fronts) chose to say.
    return response.status_code, f"HTTP {response.status_code}"


def deliver_due(settings: Settings, *, limit: int = 20) -> int:
    """Send every due try (at most `limit`); the number of tries made."""
    with short_session(settings) as session:
        due = session.execute(
            select(WebhookDelivery.id, WebhookDelivery.attempts)
            .where(
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at <= utcnow(),
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        ).all()
    sent = 0
    for delivery_id, attempts in due:
        claimed = _claim(settings, delivery_id, attempts)
        if claimed is None:
            continue
        url, payload, secret = claimed
        started = utcnow()
        t0 = time.perf_counter()
        status_code, error = _send(
            settings, delivery_id=delivery_id, url=url, payload=payload, secret=secret
        )
        attempt = attempts + 1
        values: dict[str, Any] = {"attempts": attempt}
        if error is None:
            values.update(status="delivered", finished_at=utcnow(), next_attempt_at=None)
        elif attempt >= settings.webhook_max_attempts:
            values.update(status="failed", finished_at=utcnow(), next_attempt_at=None)
        else:
            delay = settings.webhook_retry_base_seconds * RETRY_FACTOR ** (attempt - 1)
            values.update(next_attempt_at=utcnow() + timedelta(seconds=delay))
        with short_session(settings) as session:
            session.add(
                WebhookAttempt(
                    delivery_id=delivery_id,
                    attempt=attempt,
                    started_at=started,
                    duration_ms=round((time.perf_counter() - t0) * 1000, 1),
                    response_status=status_code,
                    error=error,
                )
            )
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempts)
                .values(**values)
            )
        sent += 1
    return sent


class Dispatcher:
    """Background thread of an API process: sends due deliveries every `webhook_poll_seconds`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        last_error = 0.0
        while not self._stop.wait(self.settings.webhook_poll_seconds):
            try:
                deliver_due(self.settings)
            except Exception:  # the database may be away; try again next round
                if time.monotonic() - last_error > 30:
                    last_error = time.monotonic()
                    log.warning("webhook dispatch failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.settings.webhook_timeout_seconds + 5)
