"""One typed settings object, read from ``RECSYS_*`` environment variables."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore")

    # Where everything the local stack and the pipeline write lives (ignored by git).
    home: Path = Field(default=Path(".recsys"), description="state folder: stack data, archive, models")
    stack_cache: Path = Field(default=Path(".stack"), description="cached Kafka jars")
    archive_dir: Path = Field(default=Path(".recsys/archive"), description="Parquet event log")
    registry_dir: Path = Field(default=Path(".recsys/models"), description="model versions")

    # Ports stay clear of Ray's defaults (GCS 6379, worker ports 10002-19999).
    kafka_bootstrap: str = "127.0.0.1:29092"
    kafka_controller_port: int = 29093
    kafka_version: str = "4.1.1"
    events_topic: str = "user-events"
    dlq_topic: str = "user-events.dlq"
    events_partitions: int = 4

    redis_host: str = "127.0.0.1"
    redis_port: int = 26379
    redis_prefix: str = "recsys"

    # Ray and Serve.
    ray_num_cpus: float = 4  # logical CPUs for the local Ray cluster; replicas and train workers take fractions
    ray_port: int = 26380  # the local cluster's GCS; `ray start --head --port`
    ray_metrics_port: int = 28080
    serve_host: str = "127.0.0.1"
    serve_port: int = 28000
    # The API's Redis client: a read that takes longer than the timeout is tried again this many
    # times, then the request gets a 503. A busy machine stalls Redis replies past 0.5 s now and
    # then; a refused connection (Redis down) still fails within milliseconds per try.
    serving_redis_timeout_s: float = 1.0
    serving_redis_retries: int = 1
    # Serve kills a proxy whose ready or health check takes longer than this (Ray's defaults:
    # 5 s and 10 s), which a busy 2-core machine exceeds; the deploy then fails with ActorDiedError.
    serve_proxy_ready_check_timeout_s: float = 30.0
    serve_proxy_health_check_timeout_s: float = 30.0
    # Ray starts its workers (Serve's proxy and replicas, Train workers) at nice 15, so any other
    # process on the machine takes the CPU first; a serving node's API must not yield that way.
    ray_worker_niceness: int = 0

    # Online features.
    recent_items: int = 50
    trending_half_life_s: float = 24 * 3600.0
    dedup_ttl_s: int = 14 * 24 * 3600

    # Consumers.
    stream_group: str = "features"
    archive_group: str = "archive"
    stream_batch: int = 500
    # A group consumer that holds no partition this long is recreated; after this many
    # recreations it exits non-zero (recsys.kafka_io.GroupMember). 0 s turns the bound off.
    consumer_assignment_timeout_s: float = 30.0
    consumer_recreate_attempts: int = 1

    # Retraining schedule (training/scheduler.py).
    retrain_interval_s: float = 24 * 3600.0
    retrain_cron: str | None = None  # e.g. "0 3 * * *"; takes precedence over the interval
    retrain_min_new_events: int = 50_000  # new archived events since the current model's data that trigger a run
    retrain_window_days: float = 30.0  # sliding training window, back from the newest event; 0 = everything
    retrain_workers: int = 2
    retrain_epochs: int | None = None  # None: the model config's
    gate_tolerance: float = 0.02  # publish if candidate HR@10 >= current HR@10 * (1 - tolerance)
    retrain_lock_ttl_s: float = 30.0  # the run lock expires this long after its holder stops renewing it
    scheduler_poll_s: float = 10.0

    @field_validator("home", "stack_cache", "archive_dir", "registry_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        """Absolute at load time, so Ray workers (another working directory) see the same folders."""
        return path.expanduser().resolve()

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis_host}:{self.redis_port}/0"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
