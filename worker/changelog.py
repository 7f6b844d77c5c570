"""Durable per-user state: a compacted changelog topic, the Kafka Streams way.

Each changed user's full state is written, keyed by ``user_id``, to the
changelog partition with the same number as the ratings partition it came
from. The record carries the source offset it reflects, so that after a
restore the loop skips events that were already applied.

A restore reads a changelog partition from the beginning (or from a local
snapshot's position) up to the high watermark that a fetch reports; end
offsets are not used because the embedded broker answers them wrongly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from confluent_kafka import OFFSET_BEGINNING, Message, TopicPartition

from worker.config import KafkaSettings
from worker.core.engine import Recommender
from worker.core.state import encode_state
from worker.errors import StateError
from worker.kafkaio import Publisher, drain, make_reader

log = logging.getLogger(__name__)


def write_changes(
    publisher: Publisher, topic: str, engine: Recommender, users: Iterable[str]
) -> dict[str, tuple[int, bytes]]:
    """Queue each user's full state on the changelog partition of its source partition.

    Returns ``{user_id: (partition, record bytes)}`` of what was queued.
    """
    out: dict[str, tuple[int, bytes]] = {}
    for user_id in users:
        st = engine.users[user_id]
        value = encode_state(st, engine.catalog.items.id_of)
        publisher.send(
            topic,
            key=user_id.encode("utf-8"),
            value=value,
            partition=st.partition if st.partition >= 0 else None,
        )
        out[user_id] = (st.partition, value)
    return out


def read_partitions(
    kafka: KafkaSettings,
    topic: str,
    partitions: Iterable[int],
    *,
    start_offsets: dict[int, int] | None = None,
    deadline_s: float = 300.0,
    fetch_max_wait_ms: int = 10,
) -> tuple[dict[int, dict[str, bytes]], dict[int, int]]:
    """Per partition, the latest raw record per key; and the next offset per partition.

    Reads each partition up to the high watermark reported by a fetch. Raises
    :class:`StateError` past the deadline.
    """
    parts = sorted(set(partitions))
    latest: dict[int, dict[str, bytes]] = {p: {} for p in parts}
    if not parts:
        return latest, {}
    starts = start_offsets or {}
    consumer = make_reader(
        kafka,
        **{
            "fetch.wait.max.ms": fetch_max_wait_ms,
            "max.partition.fetch.bytes": 8 * 1024 * 1024,
        },
    )

    def on_record(r: Message) -> None:
        part = latest[r.partition() or 0]
        key = (r.key() or b"").decode("utf-8")
        value = r.value()
        if value is None:
            part.pop(key, None)
        else:
            part[key] = value

    try:
        consumer.assign([TopicPartition(topic, p, starts.get(p, OFFSET_BEGINNING)) for p in parts])
        ends = drain(consumer, on_record, deadline_s=deadline_s, max_records=50_000)
    finally:
        consumer.close()
    if ends is None:
        raise StateError(f"changelog restore of partitions {parts} timed out")
    return latest, {p: ends[(topic, p)] for p in parts}
