"""Kafka I/O: client factories, topic creation, acknowledged publishing, dead letters.

This module only wraps kafka-python; it knows nothing of state or models.
Deserializers stay raw bytes: decoding happens in the loop, so that a bad
message can be dead-lettered instead of being retried forever.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.producer.future import FutureRecordMetadata

from worker.config import KafkaSettings
from worker.errors import BrokerError

log = logging.getLogger(__name__)

#: Header names on dead-letter records.
DLQ_HEADERS = (
    "refold.error.type",
    "refold.error.message",
    "refold.source.topic",
    "refold.source.partition",
    "refold.source.offset",
)
# Kafka header values are bytes; keep the reason short enough to read in a console.
_MAX_REASON_BYTES = 1024


class PublishError(BrokerError):
    """A record was not acknowledged by the brokers."""


def make_producer(kafka: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """A producer that waits for all in-sync replicas and sends raw bytes."""
    kw: dict[str, Any] = {
        **kafka.client_kwargs(),
        "acks": "all",
        # The loop flushes after queueing a whole batch, and flush() sends at once: a long
        # linger only lets a batch's records share requests, it never delays them.
        "linger_ms": 50,
        "batch_size": 1024 * 1024,
        "retries": 5,
        "max_request_size": 4 * 1024 * 1024,
    }
    kw.update(overrides)
    return KafkaProducer(**kw)


def make_consumer(kafka: KafkaSettings, **overrides: Any) -> KafkaConsumer:
    """A consumer with manual commits and raw-bytes values."""
    kw: dict[str, Any] = {
        **kafka.client_kwargs(),
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
    }
    kw.update(overrides)
    return KafkaConsumer(**kw)


def ensure_topics(
    kafka: KafkaSettings,
    partitions: Mapping[str, int],
    *,
    compacted: Iterable[str] = (),
) -> None:
    """Create the topics that are missing; existing ones are left as they are."""
    compact = set(compacted)
    admin = KafkaAdminClient(**kafka.client_kwargs())
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(
                name=name,
                num_partitions=n,
                replication_factor=1
                if len(kafka.client_kwargs()["bootstrap_servers"]) == 1
                else -1,
                topic_configs={"cleanup.policy": "compact"} if name in compact else {},
            )
            for name, n in partitions.items()
            if name not in existing
        ]
        if new:
            # Another worker may have created it first.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
    finally:
        admin.close()


def topic_partitions(consumer: KafkaConsumer, topic: str) -> int | None:
    """Number of partitions of ``topic`` as the cluster metadata says, or None."""
    parts = consumer.partitions_for_topic(topic)
    return len(parts) if parts else None


def dead_letter_headers(
    error_type: str, message: str, topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    """Reason and source position headers of a dead-letter record."""
    reason = message.encode("utf-8", "backslashreplace")[:_MAX_REASON_BYTES]
    return [
        ("refold.error.type", error_type.encode()),
        ("refold.error.message", reason),
        ("refold.source.topic", topic.encode()),
        ("refold.source.partition", str(partition).encode()),
        ("refold.source.offset", str(offset).encode()),
    ]


class Publisher:
    """Sends records and later verifies that every one of them was acknowledged."""

    def __init__(self, producer: KafkaProducer) -> None:
        self.producer = producer
        self._pending: list[FutureRecordMetadata] = []

    def send(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> None:
        self._pending.append(
            self.producer.send(topic, key=key, value=value, headers=headers, partition=partition)
        )

    def confirm(self, timeout_s: float = 30.0) -> list[Any]:
        """Flush; raise :class:`PublishError` unless every pending record was acknowledged.

        Returns the ``RecordMetadata`` (topic, partition, offset) of each record, in send order.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return []
        try:
            self.producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise PublishError(f"flush failed: {exc}") from exc
        acked = []
        for fut in pending:
            try:
                acked.append(fut.get(timeout=0))
            except KafkaError as exc:
                raise PublishError(f"record not acknowledged: {exc!r}") from exc
        return acked

    def discard(self) -> None:
        self._pending = []
