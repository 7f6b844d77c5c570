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
import time
from collections.abc import Iterable

from kafka import TopicPartition

from worker.config import KafkaSettings
from worker.core.engine import Recommender
from worker.core.state import encode_state
from worker.errors import StateError
from worker.kafkaio import Publisher, make_consumer

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

    Reads each partition until its position reaches the high watermark reported
    by a fetch. Raises :class:`StateError` past the deadline.
    """
    tps = [TopicPartition(topic, p) for p in partitions]
    latest: dict[int, dict[str, bytes]] = {tp.partition: {} for tp in tps}
    if not tps:
        return latest, {}
    consumer = make_consumer(
        kafka,
        group_id=None,
        fetch_max_wait_ms=fetch_max_wait_ms,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    try:
        consumer.assign(tps)
        for tp in tps:
            start = (start_offsets or {}).get(tp.partition)
            if start is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, start)
        todo = set(tps)
        end = time.monotonic() + deadline_s
        while todo:
            if time.monotonic() > end:
                raise StateError(
                    f"changelog restore of {sorted(t.partition for t in todo)} timed out"
                )
            batch = consumer.poll(timeout_ms=200, max_records=50_000)
            for tp, recs in batch.items():
                part = latest[tp.partition]
                for r in recs:
                    key = r.key.decode("utf-8")
                    if r.value is None:
                        part.pop(key, None)
                    else:
                        part[key] = r.value
            for tp in list(todo):
                hw = consumer.highwater(tp)
                if hw is not None and consumer.position(tp) >= hw:
                    todo.discard(tp)
        positions = {tp.partition: consumer.position(tp) for tp in tps}
    finally:
        consumer.close()
    return latest, positions
