"""Typed settings for the API and the workers, read once from `GRAIT_*` environment variables.

The defaults describe the embedded one-machine mode: SQLite for the database and Celery's
filesystem transport for the queue, both under `./var`, so `python -m app` needs no servers.
Production sets `GRAIT_DATABASE_URL` (Postgres) and `GRAIT_BROKER_URL` (Redis).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

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
        Path("./var/storage"), description="Uploaded datasets and job artifacts."
    )
    runs_dir: Path = Field(
        Path("./var/runs"), description="Worker scratch: per-job stage checkpoints."
    )

    # Queue
    queue: str = Field("gpu", description="Queue the API publishes jobs to and workers consume.")
    compute_class: str = Field(
        "cpu",
        description="What the workers run on (`grait.planning` classes, e.g. cpu, "
        "gpu-h100-80g): jobs are planned against it at submit, and refused when they won't fit.",
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
