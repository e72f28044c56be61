"""The embedded mode's worker: one Celery worker subprocess owned by the API process.

It gets its own session (so a Ctrl-C to the terminal reaches the API, which then stops the
worker's whole group) and asks the kernel to SIGKILL it if the API dies without cleaning up:
SIGTERM would be Celery's warm shutdown, which finishes the running job as an orphan while
the next API's worker resumes the same job. A watchdog restarts the worker if it exits on its
own; its start-up sweep resumes what it held.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from app.settings import Settings

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
EMBEDDED_WORKER_NAME = "embedded@%h"


try:  # loaded here, not in the forked child, so the child only makes one libc call
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not Linux/glibc: the lifespan shutdown still stops the worker
    _LIBC = None


def die_with_parent() -> None:
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def stop_process_group(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM to a child started in its own session (and its children), SIGKILL after
    `timeout`; nothing if it already exited."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def worker_command(settings: Settings, *, name: str = EMBEDDED_WORKER_NAME) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "-Q",
        settings.worker_queue,
        "-n",
        name,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel",
        "INFO",
    ]


class EmbeddedWorker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._watchdog = threading.Thread(
            target=self._watch, name="embedded-worker-watchdog", daemon=True
        )
        self._watchdog.start()

    def _spawn(self) -> None:
        # PDEATHSIG fires when the *thread* that forked exits: spawn only from the lifespan
        # thread or the watchdog, which both live as long as the API does.
        self.proc = subprocess.Popen(
            worker_command(self.settings),
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - a single prctl call in the child
            env=os.environ.copy(),
        )
        log.info("embedded worker started (pid %s)", self.proc.pid)

    def _watch(self) -> None:
        restarts: list[float] = []
        while not self._stopping.wait(2.0):
            if self.proc is not None and self.proc.poll() is not None:
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > 5:
                    log.error(
                        "embedded worker keeps exiting (code %s); not restarting",
                        self.proc.returncode,
                    )
                    self._stopping.wait()  # stay alive: the thread is the worker's PDEATHSIG parent
                    return
                log.warning("embedded worker exited with %s; restarting", self.proc.returncode)
                self._spawn()

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        stop_process_group(self.proc, timeout)
