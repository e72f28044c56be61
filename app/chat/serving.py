"""The API's side of the model-serving process (`worker.serving`): find it, start it, ask it.

With `GRAIT_SERVING_URL` set (the server deployment: its own compose service) the API only
talks to it. Unset (embedded mode, tests), the API starts one of its own on the first chat
request, on a free local port, and stops it at shutdown; one that died is started again by
the next request. Like the embedded worker it runs in its own session and is SIGKILLed by
the kernel if the API dies without cleaning up. Torch lives in that process only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from app.chat.service import ServedModel
from app.embedded import die_with_parent, stop_process_group
from app.errors import APIError
from app.settings import Settings

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 120.0
# A generation may wait for the model behind others and a first request loads the base.
TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=30.0, pool=30.0)


@dataclass(frozen=True)
class Generation:
    """One chat turn being generated: usage so far and the text events still to come."""

    prompt_tokens: int
    events: AsyncIterator[dict[str, Any]]  # `delta` events, then one `end`


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unavailable(message: str) -> APIError:
    return APIError(503, "model_unavailable", message, headers={"Retry-After": "5"})


class ModelServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self._url = settings.serving_url.rstrip("/") if settings.serving_url else None
        self._starting = asyncio.Lock()
        self._client = httpx.AsyncClient(timeout=TIMEOUT)

    @property
    def embedded(self) -> bool:
        return self.settings.serving_url is None

    async def url(self) -> str:
        if not self.embedded:
            assert self._url is not None
            return self._url
        async with self._starting:
            if self.proc is None or self.proc.poll() is not None:
                await self._start()
            assert self._url is not None
            return self._url

    async def _start(self) -> None:
        port = _free_port()
        started = time.monotonic()
        # Forked from the event loop's thread, which lives as long as the API (PDEATHSIG), not
        # from a thread pool's thread that may exit; Popen itself returns at once.
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "worker.serving", "--host", "127.0.0.1", "--port", str(port)],
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - a single prctl call in the child
            env=os.environ.copy(),
        )
        url = f"http://127.0.0.1:{port}"
        log.info("model server starting (pid %s, %s)", self.proc.pid, url)
        while time.monotonic() - started < START_TIMEOUT_SECONDS:
            if self.proc.poll() is not None:
                raise unavailable(f"the model server exited with {self.proc.returncode}")
            try:
                if (await self._client.get(url + "/healthz", timeout=1.0)).status_code == 200:
                    self._url = url
                    log.info("model server up in %.1fs", time.monotonic() - started)
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
        self.stop()
        raise unavailable("the model server did not start in time")

    async def generate(
        self,
        served: ServedModel,
        *,
        messages: list[dict[str, str]],
        prompt_format: str,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> Generation:
        """Starts the generation; errors of loading are raised here, before any text."""
        body = {
            "base_model": served.base_model,
            "adapter": (
                {"id": served.adapter_id, "key": served.adapter_key} if served.adapter_id else None
            ),
            "messages": messages,
            "prompt_format": prompt_format,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        }
        url = await self.url()
        request = self._client.build_request("POST", url + "/generate", json=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise unavailable(f"the model server is unreachable ({type(exc).__name__})") from exc
        lines = response.aiter_lines()
        try:
            if response.status_code != 200:
                await response.aread()
                raise unavailable(f"the model server refused the request: {response.text[:300]}")
            first = json.loads(await anext(lines, "null"))
        except httpx.HTTPError as exc:
            await response.aclose()
            raise unavailable(f"the model server failed ({type(exc).__name__})") from exc
        except BaseException:
            await response.aclose()
            raise
        if first is None or first["event"] == "error":
            await response.aclose()
            why = first["message"] if first else "it closed the stream"
            raise unavailable(f"the model could not be loaded: {why}")

        async def rest() -> AsyncIterator[dict[str, Any]]:
            try:
                async for line in lines:
                    if line.strip():
                        yield json.loads(line)
            except httpx.HTTPError as exc:  # the serving process died mid-answer
                yield {"event": "error", "message": f"the model server failed ({exc!r})"}
            finally:
                await response.aclose()  # a client that went away stops the generation

        return Generation(prompt_tokens=first["prompt_tokens"], events=rest())

    def stop(self, timeout: float = 10.0) -> None:
        stop_process_group(self.proc, timeout)

    async def close(self) -> None:
        self.stop()
        await self._client.aclose()
