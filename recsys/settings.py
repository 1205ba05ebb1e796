"""One typed settings object, read from ``RECSYS_*`` environment variables."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore")

    # Where everything the local stack and the pipeline write lives (ignored by git).
    home: Path = Field(default=Path(".recsys"), description="state folder: stack data, archive, models")
    stack_cache: Path = Field(default=Path(".stack"), description="cached Kafka jars")
    archive_dir: Path = Field(default=Path(".recsys/archive"), description="Parquet event log")
    registry_dir: Path = Field(default=Path(".recsys/models"), description="model versions")

    kafka_bootstrap: str = "127.0.0.1:19092"
    kafka_controller_port: int = 19093
    kafka_version: str = "4.1.1"
    events_topic: str = "user-events"
    dlq_topic: str = "user-events.dlq"
    events_partitions: int = 4

    redis_host: str = "127.0.0.1"
    redis_port: int = 16379
    redis_prefix: str = "recsys"

    # Online features.
    recent_items: int = 50
    trending_half_life_s: float = 24 * 3600.0
    dedup_ttl_s: int = 14 * 24 * 3600

    # Consumers.
    stream_group: str = "features"
    archive_group: str = "archive"
    stream_batch: int = 500

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis_host}:{self.redis_port}/0"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
