"""Configuration: one pydantic-settings model, read from flags and ``REFOLD_*`` variables.

Every knob an operator may need lives here, with its environment variable
name derived from the field (``REFOLD_BOOTSTRAP_SERVERS``, ``REFOLD_TOPIC_RATINGS``…).
Topic names come from here, never from literals elsewhere.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.core.scoring import Weights

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]


class KafkaSettings(BaseSettings):
    """How to reach the brokers, including TLS and SASL."""

    model_config = SettingsConfigDict(env_prefix="REFOLD_", extra="ignore")

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Comma-separated HOST:PORT list of brokers."
    )
    security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT", description="Kafka security.protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = (
        Field(default=None, description="SASL mechanism when the protocol is SASL_*.")
    )
    sasl_username: str | None = Field(default=None, description="SASL username.")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password.")
    ssl_cafile: Path | None = Field(default=None, description="CA bundle for TLS.")
    ssl_certfile: Path | None = Field(default=None, description="Client certificate (mTLS).")
    ssl_keyfile: Path | None = Field(default=None, description="Client private key (mTLS).")
    ssl_check_hostname: bool = Field(default=True, description="Verify the broker hostname.")

    def rdkafka_config(self) -> dict[str, Any]:
        """The settings as librdkafka properties (every refold Kafka client is confluent-kafka)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": ",".join(
                s.strip() for s in self.bootstrap_servers.split(",") if s.strip()
            ),
            "security.protocol": self.security_protocol,
        }
        if self.security_protocol.startswith("SASL"):
            conf["sasl.mechanism"] = self.sasl_mechanism or "PLAIN"
            if self.sasl_username is not None:
                conf["sasl.username"] = self.sasl_username
            if self.sasl_password is not None:
                conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.security_protocol.endswith("SSL"):
            conf["ssl.endpoint.identification.algorithm"] = (
                "https" if self.ssl_check_hostname else "none"
            )
            for key, prop in (
                ("ssl_cafile", "ssl.ca.location"),
                ("ssl_certfile", "ssl.certificate.location"),
                ("ssl_keyfile", "ssl.key.location"),
            ):
                value = getattr(self, key)
                if value is not None:
                    conf[prop] = str(value)
        return conf


class TopicSettings(BaseSettings):
    """Topic names."""

    model_config = SettingsConfigDict(env_prefix="REFOLD_TOPIC_", extra="ignore")

    ratings: str = Field(default="ratings", description="Rating events in, keyed by user_id.")
    recommendations: str = Field(
        default="recommendations", description="Top-10 lists out, keyed by user_id."
    )
    videos: str = Field(default="videos", description="New or updated videos, keyed by video_id.")
    dlq: str = Field(default="ratings.dlq", description="Dead letters: bad messages, raw bytes.")
    changelog: str = Field(
        default="refold.state-changelog",
        description="Compacted per-user state changelog, keyed by user_id.",
    )
    control: str = Field(
        default="refold.models", description="Model versions to hot-swap to (compacted)."
    )
    item_contributions: str = Field(
        default="refold.item-contributions",
        description="What the owner of a new video needs to solve it: each user's row value "
        "and factors, keyed by (video_id, user_id), on the partition of video_id (compacted).",
    )
    item_updates: str = Field(
        default="refold.item-updates",
        description="New videos' solved factors from their owners, keyed by video_id "
        "(compacted); every worker reads it.",
    )
    popularity_pairs: str = Field(
        default="refold.popularity-pairs",
        description="Positive (user, video) pairs for live popularity: the time each became "
        "positive, keyed by (video_id, user_id), on the partition of video_id; a tombstone "
        "when not positive (compacted).",
    )
    popularity: str = Field(
        default="refold.popularity",
        description="Videos' live popularity from their owners, keyed by video_id "
        "(compacted); every worker reads it.",
    )


class WorkerSettings(BaseSettings):
    """The worker process."""

    model_config = SettingsConfigDict(env_prefix="REFOLD_", extra="ignore")

    model: Path = Field(default=Path("model"), description="Model directory to start from.")
    group: str = Field(default="refold-worker", description="Consumer group id.")
    client_id: str = Field(default="refold-worker", description="Kafka client id prefix.")
    group_instance_id: str | None = Field(
        default=None,
        description="Static group membership id: a restarted worker with the same id takes its "
        "partitions back without a rebalance. Unset on the embedded broker, which never "
        "reassigns a departed static member's partitions.",
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="Bind address of /metrics and /healthz."
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Port of /metrics and /healthz; 0 disables."
    )
    # Low latency on both brokers: Tansu's fetch latency follows fetch_max_wait_ms
    # (0 returns nothing), Apache Kafka answers as soon as data arrives anyway.
    fetch_max_wait_ms: int = Field(default=10, ge=1, description="Fetch long-poll wait.")
    max_poll_records: int = Field(default=1000, ge=1, description="Largest batch per poll.")
    # Tansu joins a group in about session_timeout/2; Apache Kafka's minimum is 6 s.
    session_timeout_ms: int = Field(default=6000, ge=1000, description="Group session timeout.")
    heartbeat_interval_ms: int = Field(default=1000, ge=100, description="Group heartbeat.")
    commit_interval_ms: int = Field(
        default=200,
        ge=0,
        description="Least time between two offset commits (only acknowledged batches are "
        "committed); 0 commits after every batch.",
    )
    durable: bool = Field(
        default=True, description="Write the per-user state changelog and restore from it."
    )
    state_dir: Path | None = Field(
        default=None, description="Local snapshot directory that speeds up restarts (optional)."
    )
    snapshot_interval_s: float = Field(
        default=30.0, gt=0, description="Seconds between local state snapshots."
    )
    dedup_window: int = Field(
        default=1000, ge=1, description="Event ids remembered per user for deduplication."
    )
    popularity_half_life_s: float = Field(
        default=86_400.0,
        ge=0,
        description="Half-life in seconds of live popularity (cold-start lists); 0: plain count.",
    )
    shared_items: bool = Field(
        default=True,
        description="Share new videos' factors between workers: one owner per video solves "
        "them from every worker's users (False: each worker solves from its own users).",
    )
    shared_popularity: bool = Field(
        default=True,
        description="Share live popularity between workers: one owner per video counts its "
        "positive pairs from every worker's events (False: each worker counts its own).",
    )
    item_group: str | None = Field(
        default=None,
        description="Consumer group of the video owners on item_contributions and "
        "popularity_pairs (default: the worker group's name + '-items').",
    )
    items_dump: Path | None = Field(
        default=None,
        description="On a clean stop, write the new videos' factors and every video's "
        "popularity here as JSON (checks).",
    )
    items_trace: Path | None = Field(
        default=None,
        description="Append one JSON line per installed item update (freshness benchmark).",
    )
    create_topics_partitions: int = Field(
        default=1, ge=1, description="Partitions for topics the worker creates when missing."
    )

    # Scoring weights (see worker.core.scoring). Unset: the weights the model was trained with.
    weight_view: float | None = Field(default=None, ge=0, description="Weight of a full view.")
    weight_like: float | None = Field(default=None, ge=0, description="Weight of a like.")
    weight_neutral: float | None = Field(default=None, ge=0, description="Weight of a neutral.")
    weight_dislike: float | None = Field(
        default=None, ge=0, description="Weight of a dislike (applied negatively)."
    )
    watch_cap: float | None = Field(default=None, gt=0, description="Cap of the watched fraction.")

    def weights(self, manifest: dict[str, Any] | None = None) -> Weights:
        """Training weights from the model manifest, overridden by any weight set here."""
        trained = ((manifest or {}).get("data_summary") or {}).get("training", {}).get("weights")
        base = Weights(**trained) if isinstance(trained, dict) else Weights()
        over = {
            "view": self.weight_view,
            "like": self.weight_like,
            "neutral": self.weight_neutral,
            "dislike": self.weight_dislike,
            "watch_cap": self.watch_cap,
        }
        return replace(base, **{k: v for k, v in over.items() if v is not None})


class ArchiveSettings(BaseSettings):
    """``refold archive``: the stream to Parquet. It also reads the worker's client
    settings (``REFOLD_FETCH_MAX_WAIT_MS``, ``REFOLD_SESSION_TIMEOUT_MS``, ...) and its
    ``REFOLD_DEDUP_WINDOW``, so it drops exactly the retries the worker drops."""

    model_config = SettingsConfigDict(env_prefix="REFOLD_ARCHIVE_", extra="ignore")

    out: Path = Field(default=Path("archive"), description="Archive directory.")
    group: str = Field(
        default="refold-archive", description="Consumer group (and client) id of the archive."
    )
    roll_rows: int = Field(
        default=100_000, ge=1, description="Rows per roll at most (the rows held in memory)."
    )
    roll_seconds: float = Field(
        default=60.0, gt=0, description="Seconds after its first row that a roll is written."
    )
    keep_days: float = Field(
        default=0.0,
        ge=0,
        description="Delete rating rolls this many days older than the newest archived "
        "event; 0 keeps everything.",
    )


ENV_PREFIXES = ("REFOLD_", "REFOLD_TOPIC_", "REFOLD_ARCHIVE_")


def env_names() -> set[str]:
    """Every environment variable name the settings read (for the compose check)."""
    names: set[str] = set()
    for cls in (KafkaSettings, TopicSettings, WorkerSettings, ArchiveSettings):
        prefix = cls.model_config.get("env_prefix", "")
        names |= {f"{prefix}{f}".upper() for f in cls.model_fields}
    return names
