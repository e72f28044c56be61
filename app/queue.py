"""The Celery side of the service that both the API (publisher) and workers (consumers) share.

The API never imports the task code: it publishes by name. A message only says "look at job
X"; the job row is the truth (status, attempts, heartbeat), because the embedded transport
delivers at most once and a redelivered Redis message may race a sweeper re-queue.
"""

from __future__ import annotations

import logging

from celery import Celery

from app.settings import Settings, get_settings

RUN_JOB_TASK = "grait.run_job"
# "Help with job X's feature shards": the worker that takes it claims shards until none is left
FEATURE_SHARDS_TASK = "grait.feature_shards"
log = logging.getLogger(__name__)


def make_celery(settings: Settings) -> Celery:
    celery = Celery("grait", broker=settings.broker_url, set_as_current=False)
    transport_options: dict[str, object] = {}
    conf: dict[str, object] = {}
    if settings.embedded_broker:
        folder = str(settings.broker_dir / "queue")
        transport_options = {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "processed_folder": str(settings.broker_dir / "processed"),
            "store_processed": False,
            "polling_interval": settings.broker_polling_interval,
        }
        # Broadcast control needs fanout exchanges; the embedded worker has no use for them.
        conf["worker_enable_remote_control"] = False
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        transport_options = {"visibility_timeout": 6 * 3600}
        if settings.broker_key_prefix:
            transport_options["global_keyprefix"] = settings.broker_key_prefix
    celery.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        task_default_queue=settings.worker_queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        **conf,
    )
    return celery


_clients: dict[str, Celery] = {}


def _client(settings: Settings) -> Celery:
    key = settings.model_dump_json()
    if key not in _clients:
        _clients[key] = make_celery(settings)
    return _clients[key]


def publish_job(job_id: str, settings: Settings | None = None, queue: str | None = None) -> bool:
    """Wake a worker of the job's class; call only after the job row is committed.

    The message is a turn, not an assignment: the worker that takes it claims the fairest
    queued job of its class (`lifecycle.claim_next`), which may be another tenant's.
    """
    settings = settings or get_settings()
    try:
        target = queue or settings.worker_queue  # the job row's queue; none: this class's
        _client(settings).send_task(RUN_JOB_TASK, args=[job_id], queue=target)
        return True
    except Exception:  # the sweeper republishes queued jobs that were never sent
        log.exception("could not publish job %s", job_id)
        return False


BROKER_MARKER = "grait:broker-epoch"


def invite_shard_workers(job_id: str, count: int, queue: str, settings: Settings) -> int:
    """Ask up to `count` workers of the job's queue to help with its feature shards.

    An invitation is not an assignment (the shard rows are): one that is lost, or taken by a
    worker after the shards are done, costs nothing. Returns how many were sent.
    """
    client = _client(settings)
    sent = 0
    for _ in range(count):
        try:
            client.send_task(FEATURE_SHARDS_TASK, args=[job_id], queue=queue)
            sent += 1
        except Exception:  # the job's own worker computes what nobody else takes
            log.exception("could not invite a worker to job %s's feature shards", job_id)
            break
    return sent


def broker_lost_messages(settings: Settings) -> bool:
    """True once after the broker came back without its data (Redis restarted empty).

    A marker key lives next to the queue: if it is gone, so are the messages that were queued
    with it. Setting it again (SET NX) makes the answer True exactly once per loss — and once on
    the very first check against a fresh Redis, which only costs duplicate (no-op) messages.
    The embedded queue is a folder on disk and never answers True.
    """
    if not settings.redis_broker:
        return False
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.set(settings.broker_key_prefix + BROKER_MARKER, "1", nx=True))
    except redis.RedisError:
        return False  # unreachable: nothing can be republished now anyway
    finally:
        client.close()
