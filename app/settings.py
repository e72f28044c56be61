"""Typed settings for the API and the workers, read once from `GRAIT_*` environment variables.

The defaults describe the embedded one-machine mode: SQLite for the database and Celery's
filesystem transport for the queue, both under `./var`, so `python -m app` needs no servers.
Production sets `GRAIT_DATABASE_URL` (Postgres), `GRAIT_BROKER_URL` (Redis) and, for more
than one machine, `GRAIT_STORAGE_BACKEND=s3` with a bucket.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

EMBEDDED_BROKER = "filesystem://"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRAIT_", extra="ignore")

    # Where things live
    database_url: str = "sqlite:///./var/grait.db"
    broker_url: str = Field(
        EMBEDDED_BROKER,
        description="Celery broker. `filesystem://` = embedded queue in `broker_dir` (one machine).",
    )
    broker_dir: Path = Path("./var/broker")
    storage_dir: Path = Field(
        Path("./var/storage"),
        description="Uploaded datasets and job artifacts (`storage_backend=local`); with an "
        "object store, this machine's staging and download cache.",
    )
    runs_dir: Path = Field(
        Path("./var/runs"), description="Worker scratch: per-job stage checkpoints."
    )

    # Object storage (`storage_backend=s3`): S3, MinIO, R2, GCS's XML API, ...
    storage_backend: Literal["local", "s3"] = Field(
        "local",
        description="`local`: files under `storage_dir` (one machine, or a shared volume); "
        "`s3`: an S3-compatible bucket shared by every API, worker and serving process.",
    )
    stage_checkpoints: Literal["auto", "store", "local"] = Field(
        "auto",
        description="`store`: each completed stage is also uploaded to the storage, so a job "
        "resumes on another worker that shares no disk; `local`: run folders only; auto = store "
        "when the storage is `s3`.",
    )
    feature_shard_min_rows: int = Field(
        4096,
        ge=0,
        description="Stage 2b of a job with at least this many feature rows (training "
        "questions + kept known ones) is computed in shards by every worker of the job's class "
        "that is free; needs stage checkpoints in the storage. 0 = never shard.",
    )
    feature_shard_rows: int = Field(
        1024, ge=1, description="Rows per shard (rounded up to whole feature batches)."
    )
    feature_shard_lease_seconds: int = Field(
        120,
        ge=5,
        description="A shard whose worker renewed nothing for this long is taken by another.",
    )
    feature_shard_wait_seconds: float = Field(
        0.0,
        ge=0,
        description="How long the job's own worker leaves a shard nobody claimed to the other "
        "workers before computing it itself (0: it computes shards alongside them).",
    )
    storage_endpoint_url: str | None = Field(
        None,
        description="The S3 endpoint as the service reaches it (`http://minio:9000`); unset: AWS.",
    )
    storage_public_endpoint_url: str | None = Field(
        None,
        description="The endpoint as clients reach it, for presigned download URLs (a proxy or "
        "public name in front of `storage_endpoint_url`); unset: `storage_endpoint_url`.",
    )
    storage_bucket: str | None = Field(None, description="The bucket; must exist.")
    storage_prefix: str = Field("", description="Key prefix in the bucket, to share one bucket.")
    storage_region: str = Field("us-east-1", description="The bucket's region (MinIO: any).")
    storage_access_key_id: SecretStr | None = Field(
        None, description="Unset: the client's default chain (AWS_* variables, instance role)."
    )
    storage_secret_access_key: SecretStr | None = None
    storage_presign_downloads: bool = Field(
        False,
        description="Download routes answer 307 to a presigned URL of the object store instead "
        "of streaming the file through the API.",
    )
    storage_presign_expires_seconds: int = Field(
        900, ge=1, le=7 * 24 * 3600, description="How long a presigned download URL is valid."
    )
    storage_part_bytes: int = Field(
        8 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        description="Multipart upload part size (S3's minimum is 5 MiB).",
    )
    storage_cache_max_bytes: int = Field(
        20 * 1024**3,
        ge=0,
        description="s3: this machine's copies of fetched objects (datasets, checkpoints) are "
        "trimmed, least recently used first, to this size; copies used in the last 10 minutes "
        "are kept whatever the size.",
    )

    # Queue
    queue: str = Field(
        "gpu",
        description="Queue name prefix: a job of compute class C goes to `<queue>.<C>`, which "
        "the workers of class C consume.",
    )
    compute_class: str = Field(
        "cpu",
        description="A worker: the class it runs on and serves (`grait.planning` classes, e.g. "
        "cpu, gpu-h100-80g). The API: the class of a job that names none.",
    )
    compute_classes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="The API: every class this deployment has workers for (`a,b` or a JSON "
        "list); a job naming another is refused at submit. Empty = only `compute_class`.",
    )
    broker_key_prefix: str = Field(
        "", description="Redis key prefix, to share one Redis between services."
    )
    broker_polling_interval: float = Field(
        0.2, gt=0, description="Embedded queue polling, seconds."
    )

    # API
    url: str = Field(
        "http://127.0.0.1:8000", description="Where the client commands reach the service."
    )
    host: str = "127.0.0.1"
    port: int = 8000
    # Idle keep-alive connections stay open this long. Above the usual 60 s idle timeout of
    # load balancers and client pools: with uvicorn's 5 s default, a client that reuses an
    # idle connection just as the server closes it gets a reset (seen as ReadError by
    # pollers on a busy machine).
    keep_alive_seconds: int = Field(65, ge=1, le=3600)
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    embedded_worker: Literal["auto", "true", "false"] = Field(
        "auto",
        description="Start a worker subprocess with the API; auto = when the broker is embedded.",
    )

    # Security
    bootstrap_api_key: SecretStr | None = Field(
        None,
        description="`serve` with no API key in the database registers this one (tenant `default`); "
        "unset: it generates one and prints it once.",
    )
    api_key: SecretStr | None = Field(
        None, description="What the client commands send as `Authorization: Bearer`."
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="GET /metrics needs `Authorization: Bearer <token>`; without one it is "
        "open only in embedded mode. Also unlocks /readyz's failure details.",
    )
    webhook_allow_private: bool = Field(
        False,
        description="Allow webhook URLs resolving to loopback/private/link-local addresses.",
    )
    webhook_max_attempts: int = Field(6, ge=1, description="Tries per webhook delivery.")
    webhook_retry_base_seconds: float = Field(
        5.0, gt=0, description="Delay before the 2nd try; each later delay is 4x the previous."
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0)
    webhook_poll_seconds: float = Field(1.0, gt=0, description="How often due deliveries are sent.")
    idempotency_ttl_seconds: int = Field(24 * 3600, ge=1)

    # Limits
    max_request_bytes: int = Field(
        1024 * 1024, ge=1, description="Body limit of every non-upload request."
    )
    max_dataset_rows: int = Field(200_000, ge=1)
    max_queued_jobs_per_tenant: int = Field(100, ge=1)
    max_job_seconds: int = Field(
        24 * 3600,
        ge=1,
        description="Wall-clock limit of one job attempt; a job may ask for less "
        "(`time_limit_seconds`). Over it the job fails with time_limit_exceeded.",
    )
    rate_limit_per_second: float = Field(
        20.0, ge=0, description="Token refill per API key; 0 disables rate limiting."
    )
    rate_limit_burst: int = Field(200, ge=1, description="Token bucket capacity per API key.")

    # Workers and crash recovery
    heartbeat_seconds: float = Field(
        10.0, gt=0, description="How often a running job proves it is alive."
    )
    stale_after_seconds: float = Field(
        120.0, gt=0, description="A running job silent this long is stale."
    )
    sweep_interval_seconds: float = Field(30.0, gt=0)
    republish_after_seconds: float = Field(
        600.0,
        gt=0,
        description="A job queued this long without a claim has its message sent again (a "
        "message can be lost between delivery and claim); duplicates are skipped by the claim.",
    )
    max_attempts: int = Field(
        3, ge=1, description="Starts of one job before it fails with worker_lost."
    )
    progress_write_seconds: float = Field(
        2.0, ge=0, description="Minimum gap between progress rows."
    )
    cancel_check_seconds: float = Field(
        1.0, ge=0, description="Minimum gap between cancel-flag reads."
    )
    worker_memory_limit_bytes: int | None = Field(
        None,
        ge=1,
        description="Cap the worker's address space (RLIMIT_AS): an over-large job fails with "
        "out_of_memory instead of taking the machine down.",
    )

    # Chat (POST /v1/chat/completions): the model-serving process, `python -m worker.serving`
    serving_url: str | None = Field(
        None,
        description="Where the model-serving process listens; unset: the API starts one of its "
        "own on the first chat request and stops it at shutdown.",
    )
    serving_host: str = Field("127.0.0.1", description="`python -m worker.serving` binds here.")
    serving_port: int = Field(8001, description="`python -m worker.serving` listens here.")
    serving_device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    serving_max_adapters: int = Field(
        4, ge=1, description="LoRA adapters kept loaded; the least recently used goes first."
    )
    serving_max_base_models: int = Field(
        1, ge=1, description="Base models kept loaded (each with its adapters)."
    )
    chat_max_tokens: int = Field(
        512, ge=1, description="Cap on (and default of) a chat request's max_tokens."
    )

    @field_validator("compute_classes", mode="before")
    @classmethod
    def _class_list(cls, value: Any) -> Any:
        """A JSON list, as the environment gives it, or `a,b` (also when passed as a string)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [c.strip() for c in text.split(",") if c.strip()]
        return value

    @property
    def checkpoints_in_storage(self) -> bool:
        if self.stage_checkpoints == "auto":
            return self.storage_backend != "local"
        return self.stage_checkpoints == "store"

    @property
    def offered_classes(self) -> list[str]:
        return list(dict.fromkeys([self.compute_class, *self.compute_classes]))

    def queue_for(self, compute_class: str | None) -> str:
        """The queue of a class's workers (a job row without a class: this deployment's)."""
        return f"{self.queue}.{compute_class or self.compute_class}"

    @property
    def worker_queue(self) -> str:
        """The queue a worker started with these settings consumes."""
        return self.queue_for(self.compute_class)

    @model_validator(mode="after")
    def _object_store_has_a_bucket(self) -> Settings:
        if self.storage_backend == "s3" and not self.storage_bucket:
            raise ValueError("GRAIT_STORAGE_BACKEND=s3 needs GRAIT_STORAGE_BUCKET")
        return self

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith(EMBEDDED_BROKER)

    @property
    def starts_embedded_worker(self) -> bool:
        if self.embedded_worker == "auto":
            return self.embedded_broker
        return self.embedded_worker == "true"

    @property
    def redis_broker(self) -> bool:
        return self.broker_url.startswith(("redis://", "rediss://"))

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def ensure_dirs(self) -> None:
        for folder in (self.storage_dir, self.runs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        if self.embedded_broker:
            (self.broker_dir / "queue").mkdir(parents=True, exist_ok=True)
            (self.broker_dir / "processed").mkdir(parents=True, exist_ok=True)
        if self.is_sqlite and self.database_url.startswith("sqlite:///"):
            db_path = self.database_url.removeprefix("sqlite:///")
            if db_path and db_path != ":memory:":
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
