"""Signed webhooks on terminal states, retried with backoff, every try recorded and visible."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from .conftest import Worker, wait_for

pytestmark = pytest.mark.timeout(60)


class Receiver:
    """A loopback HTTP endpoint answering the scripted statuses in turn (then 200)."""

    def __init__(self, statuses: list[int]):
        self.statuses = list(statuses)
        self.received: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append({"headers": dict(self.headers), "body": body})
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok" if status == 200 else b"try again")

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/grait"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver([500, 503])
    yield r
    r.close()


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does (Standard Webhooks): HMAC-SHA256 over id.timestamp.body."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(sig.split(",", 1)[1], expected)
        for sig in headers["webhook-signature"].split()
    )


def test_cancelled_job_is_announced_signed_and_retried_until_accepted(
    client: httpx.Client, datasets: dict[str, str], receiver: Receiver, no_worker: Worker
) -> None:
    job = client.post(
        "/v1/jobs",
        json={"train_dataset": datasets["mmlu"], "webhook_url": receiver.url, "suffix": "hooked"},
    ).json()
    assert job["webhook_url"] == receiver.url
    client.post(f"/v1/jobs/{job['id']}/cancel")

    def delivered() -> dict[str, Any] | None:
        rows = client.get(f"/v1/jobs/{job['id']}/webhook_deliveries").json()["data"]
        return rows[0] if rows and rows[0]["status"] == "delivered" else None

    delivery = wait_for(delivered, timeout=20, what="the webhook to be delivered")

    assert delivery["event_type"] == "job.cancelled" and delivery["url"] == receiver.url
    tries = delivery["attempts"]
    assert [t["response_status"] for t in tries] == [500, 503, 200]
    assert tries[0]["error"] == "HTTP 500" and tries[2]["error"] is None  # not its body
    gaps = [b["started_at"] - a["started_at"] for a, b in itertools.pairwise(tries)]
    assert gaps[0] >= 0.25 and gaps[1] >= 1.0  # 0.3 s, then 4x that (backoff)

    assert len(receiver.received) == 3
    secret = client.get("/v1/webhook_secret").json()["secret"]
    ids = {r["headers"]["webhook-id"] for r in receiver.received}
    assert ids == {delivery["id"]}  # one message id across the retries
    for request in receiver.received:
        assert verify(secret, request["headers"], request["body"])
        assert not verify(secret, request["headers"], request["body"] + b" ")  # tamper-evident
    payload = json.loads(receiver.received[-1]["body"])
    assert payload["type"] == "job.cancelled"
    assert payload["data"]["id"] == job["id"] and payload["data"]["status"] == "cancelled"
    assert payload["data"]["suffix"] == "hooked"


def test_deliveries_are_sent_once_per_terminal_state(
    client: httpx.Client, datasets: dict[str, str], receiver: Receiver, no_worker: Worker
) -> None:
    receiver.statuses = []
    job = client.post(
        "/v1/jobs", json={"train_dataset": datasets["mmlu"], "webhook_url": receiver.url}
    ).json()
    for _ in range(3):
        client.post(f"/v1/jobs/{job['id']}/cancel")  # repeated cancels: one terminal state
    wait_for(lambda: receiver.received, timeout=15, what="a delivery")
    import time

    time.sleep(1.0)
    assert len(receiver.received) == 1
    assert len(client.get(f"/v1/jobs/{job['id']}/webhook_deliveries").json()["data"]) == 1


def test_signature_helper_matches_the_service(service_env: dict[str, str]) -> None:
    from app.webhooks.service import sign

    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    signature = sign(secret, message_id="msg-1", timestamp=1700000000, body=b'{"a":1}')
    headers = {
        "webhook-id": "msg-1",
        "webhook-timestamp": "1700000000",
        "webhook-signature": signature,
    }
    assert signature.startswith("v1,") and verify(secret, headers, b'{"a":1}')


def test_a_name_that_rebinds_to_loopback_after_the_check_is_not_reached(
    receiver: Receiver, service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: public for the check, loopback for a second lookup. The connection goes
    to the checked address, so the loopback receiver never hears of it."""
    import socket

    from app.webhooks.service import _send

    from .conftest import settings_for

    real = socket.getaddrinfo
    port = int(receiver.url.split(":")[2].split("/")[0])
    lookups: list[str] = []

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.example":
            return real(host, *args, **kwargs)
        lookups.append(host)
        address = "192.88.99.77" if len(lookups) == 1 else "127.0.0.1"  # public, then loopback
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    settings = settings_for(
        {
            **service_env,
            "GRAIT_WEBHOOK_ALLOW_PRIVATE": "false",
            "GRAIT_WEBHOOK_TIMEOUT_SECONDS": "1",
        }
    )
    status, error = _send(
        settings,
        delivery_id="msg-rebind",
        url=f"http://rebind.example:{port}/hooks/grait",
        payload={"type": "job.succeeded"},
        secret="whsec_" + base64.b64encode(b"k" * 24).decode(),
    )

    assert receiver.received == [] and status is None and error, (status, error)
    assert lookups == ["rebind.example"]  # looked up once: for the check
