"""The new-video owner role inside a worker: Kafka I/O around :class:`ItemOwner`.

Each worker runs a second consumer, in a group of its own (``item_group``), on the
``item_contributions`` topic. The group gives every contributions partition, and so
every new video (:func:`worker.core.items.contribution_partition`), one owner among the
running workers. Why inside the worker rather than a process of its own: the owner needs
exactly what a worker already has (the model's user gramian and trained factors), it
scales and fails over with the workers, and a deployment has one process kind to run.

Durability needs no changelog of its own. A contribution is a state keyed by
``(video, user)`` on a compacted topic, so an owner that is given a partition (start,
rebalance, another worker's kill -9, a model swap) reads it from the beginning, keeps
the latest contribution per key, and publishes a solve of every video in it; a
contribution read twice changes nothing. Workers send their contributions in the same
flush as their lists and changelog records, before they commit: a batch replayed after
a crash sends them again (replayed users are folded in and contribute as well).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Message, TopicPartition

from worker.changelog import read_partitions
from worker.config import KafkaSettings, TopicSettings, WorkerSettings
from worker.core.engine import Recommender
from worker.core.items import Contribution, ItemOwner, ItemUpdate, contribution_partition
from worker.core.popularity import PopularityOwner, PopularityPair, PopularityUpdate
from worker.errors import DecodeError
from worker.kafkaio import Publisher, make_group_consumer, poll_batch
from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


def new_owner(engine: Recommender) -> ItemOwner:
    """An owner for the engine's current model (same gramian and trained factors)."""
    params = engine.model.params
    return ItemOwner(
        model_version=engine.model_version,
        user_gram=engine.user_gram,
        trained_of=engine.trained_factors,
        regularization=params.regularization,
        alpha=params.alpha,
        confidence_mode=params.confidence,
    )


class ItemRole:
    """Owns the videos of the partitions its group assigns it: new videos' solves from
    ``item_contributions`` (``shared_items``) and every video's live popularity from
    ``popularity_pairs`` (``shared_popularity``).

    One consumer is subscribed to both topics. The two owners need nothing from each
    other (a video's popularity needs its pairs only), so the two topics' assignments need
    not coincide; the range assignor still makes them coincide when their partition counts
    are equal, so one worker owns all of a video.
    """

    def __init__(
        self,
        *,
        kafka: KafkaSettings,
        topics: TopicSettings,
        settings: WorkerSettings,
        engine: Recommender,
        publisher: Publisher,
        n_partitions: int,
        metrics: WorkerMetrics | None = None,
        n_pair_partitions: int | None = None,
    ) -> None:
        self.kafka = kafka
        self.topics = topics
        self.settings = settings
        self.engine = engine
        self.publisher = publisher
        self.n_partitions = n_partitions
        self.metrics = metrics
        self.n_pair_partitions = n_pair_partitions or n_partitions
        self.owner = new_owner(engine)
        self.popularity = PopularityOwner(half_life_s=settings.popularity_half_life_s)
        self.owned: set[int] = set()
        self.owned_pairs: set[int] = set()
        self.bad = 0
        self.consumer: Consumer | None = None

    def start(self) -> None:
        group = self.settings.item_group or f"{self.settings.group}-items"
        self.consumer = make_group_consumer(
            self.kafka,
            group,
            **{
                "client.id": f"{self.settings.client_id}-items",
                "fetch.wait.max.ms": self.settings.fetch_max_wait_ms,
                "session.timeout.ms": self.settings.session_timeout_ms,
                "heartbeat.interval.ms": self.settings.heartbeat_interval_ms,
                "max.poll.interval.ms": 300_000,
                # Co-partitioned topics get the same partition numbers (see the class doc).
                "partition.assignment.strategy": "range",
            },
        )
        subscribed = [self.topics.item_contributions] if self.settings.shared_items else []
        if self.settings.shared_popularity:
            subscribed.append(self.topics.popularity_pairs)
        self.consumer.subscribe(
            subscribed,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    # ---- assignment ----------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        t = self.topics
        parts = {tp.partition for tp in tps if tp.topic == t.item_contributions}
        pair_parts = {tp.partition for tp in tps if tp.topic == t.popularity_pairs}
        positions = self._rebuild(parts) if parts else {}
        pair_positions = self._rebuild_popularity(pair_parts) if pair_parts else {}
        self.owned = set(parts)
        self.owned_pairs = set(pair_parts)
        consumer.assign(
            [TopicPartition(t.item_contributions, p, positions[p]) for p in parts]
            + [TopicPartition(t.popularity_pairs, p, pair_positions[p]) for p in pair_parts]
        )

    def _on_revoke(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        t = self.topics
        gone = {tp.partition for tp in tps if tp.topic == t.item_contributions}
        gone_pairs = {tp.partition for tp in tps if tp.topic == t.popularity_pairs}
        self.owned -= gone
        self.owned_pairs -= gone_pairs
        n = self.owner.drop(lambda v: self._partition(v) not in gone)
        k = self.popularity.drop(
            lambda v: contribution_partition(v, self.n_pair_partitions) not in gone_pairs
        )
        log.info(
            "video owner: partitions %s / %s given up; %d new videos, %d popularity counts "
            "handed over",
            sorted(gone),
            sorted(gone_pairs),
            n,
            k,
        )

    def _partition(self, video_id: str) -> int:
        return contribution_partition(video_id, self.n_partitions)

    def _rebuild_popularity(self, parts: set[int]) -> dict[int, int]:
        """Read ``parts`` of the pairs topic from the beginning into the popularity owner
        (the latest record per pair; a tombstone is a pair that is not positive) and
        publish the count of every video in it."""
        started = time.monotonic()
        latest, positions = read_partitions(
            self.kafka,
            self.topics.popularity_pairs,
            sorted(parts),
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
        )
        videos: set[str] = set()
        for records in latest.values():
            for key, raw in records.items():
                pair = self._decode_pair(key.encode("utf-8"), raw)
                if pair is not None:
                    self.popularity.apply(pair)
                    videos.add(pair.video_id)
        self._publish_popularity(self.popularity.updates(videos))
        log.info(
            "popularity owner: partitions %s taken; %d videos, %d positive pairs read in %.2fs",
            sorted(parts),
            len(videos),
            self.popularity.pairs,
            time.monotonic() - started,
        )
        return positions

    def _rebuild(self, parts: set[int]) -> dict[int, int]:
        """Read ``parts`` from the beginning into the owner; publish a solve of each video."""
        started = time.monotonic()
        latest, positions = read_partitions(
            self.kafka,
            self.topics.item_contributions,
            sorted(parts),
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
        )
        videos: set[str] = set()
        for records in latest.values():
            for raw in records.values():
                c = self._decode(raw)
                if c is not None and self.owner.apply(c):
                    videos.add(c.video_id)
        self._publish(self.owner.updates(videos))
        log.info(
            "item owner: partitions %s taken; %d new videos, %d contributions read in %.2fs",
            sorted(parts),
            len(videos),
            sum(len(r) for r in latest.values()),
            time.monotonic() - started,
        )
        return positions

    # ---- steady state --------------------------------------------------------------------

    def _decode(self, raw: bytes | None) -> Contribution | None:
        try:
            return Contribution.decode(raw)
        except DecodeError as exc:
            self.bad += 1
            log.warning("ignoring an undecodable item contribution: %s", exc)
            return None

    def _decode_pair(self, key: bytes | None, raw: bytes | None) -> PopularityPair | None:
        try:
            return PopularityPair.decode(key, raw)
        except DecodeError as exc:
            self.bad += 1
            log.warning("ignoring an undecodable popularity pair: %s", exc)
            return None

    def poll(self) -> int:
        """Apply the contributions and pairs that are ready; publish the changed videos'
        solves and counts (one batch per loop turn)."""
        if self.consumer is None:
            return 0
        for m in poll_batch(self.consumer, 10_000, 0):
            if m.topic() == self.topics.popularity_pairs:
                pair = self._decode_pair(m.key(), m.value())
                if pair is not None:
                    self.popularity.apply(pair)
                continue
            c = self._decode(m.value())
            if c is not None:
                self.owner.apply(c)
        updates = self.owner.updates()
        self._publish(updates)
        counts = self.popularity.updates()
        self._publish_popularity(counts)
        return len(updates) + len(counts)

    def _publish_popularity(self, updates: list[PopularityUpdate]) -> None:
        for u in updates:
            self.publisher.send(
                self.topics.popularity, key=u.video_id.encode("utf-8"), value=u.encode()
            )
        if updates:
            self.publisher.producer.poll(0)
        if self.metrics is not None:
            self.metrics.popularity_updates_out.inc(len(updates))

    def saw_popularity(self, update: PopularityUpdate) -> None:
        self.popularity.saw_update(update)

    def _publish(self, updates: list[ItemUpdate]) -> None:
        for u in updates:
            self.publisher.send(
                self.topics.item_updates, key=u.video_id.encode("utf-8"), value=u.encode()
            )
        if updates:
            self.publisher.producer.poll(0)
        if self.metrics is not None:
            self.metrics.item_updates_out.inc(len(updates))
            self.metrics.new_videos_owned.set(self.owner.n_videos)

    def saw_update(self, update: ItemUpdate) -> None:
        self.owner.saw_update(update)

    def swap(self) -> None:
        """The worker swapped models: a new owner starts from the new model's
        contributions that arrived before this worker swapped (no re-read of the topic;
        workers that swap later send theirs when their users come back)."""
        old, self.owner = self.owner, new_owner(self.engine)
        old.take_pending(self.owner)
        self._publish(self.owner.updates())

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None


def send_contributions(
    publisher: Publisher,
    topic: str,
    n_partitions: int,
    contributions: list[Contribution],
) -> None:
    """Queue contributions on the partition of their video (flushed with the batch)."""
    for c in contributions:
        publisher.send(
            topic,
            key=c.key(),
            value=c.encode(),
            partition=contribution_partition(c.video_id, n_partitions),
        )


def send_popularity_pairs(
    publisher: Publisher, topic: str, n_partitions: int, pairs: list[PopularityPair]
) -> None:
    """Queue pairs on the partition of their video (flushed with the batch); a pair that
    is not positive goes as a tombstone."""
    for pair in pairs:
        publisher.send(
            topic,
            key=pair.key(),
            value=pair.encode(),
            partition=contribution_partition(pair.video_id, n_partitions),
        )


def trace_install(path: Path, update: ItemUpdate, installed: bool, client_id: str) -> None:
    """One JSON line per update a worker read (the freshness benchmark's probe)."""
    doc: dict[str, Any] = {
        "worker": client_id,
        "video_id": update.video_id,
        "seq": update.seq,
        "event_ms": update.event_ms,
        "installed_ms": time.time() * 1000.0,
        "installed": installed,
    }
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(doc) + "\n")


def dump_new_items(path: Path, engine: Recommender) -> None:
    """Write the engine's new-video factors (hex of their float32 bytes) and every video's
    popularity (``float.hex``, at the newest shared as-of time, else the latest event's;
    videos with a count only) as JSON."""
    factors = engine.new_item_factors()
    asof = engine.popularity_asof()
    values = engine.popularity_at(asof) if asof is not None else engine.popularity_values()
    ids = engine.catalog.items
    doc = {
        "model_version": engine.model_version,
        "videos": {v: x.astype("<f4").tobytes().hex() for v, x in factors.items()},
        "popularity": {
            "asof_us": asof,
            "values": {ids.id_of(int(i)): float(values[i]).hex() for i in np.flatnonzero(values)},
        },
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc), encoding="utf-8")
    tmp.replace(path)


def decode_popularity(raw: bytes | None, *, where: str = "the topic") -> PopularityUpdate | None:
    """The popularity update, or None (logged) if it does not decode."""
    try:
        return PopularityUpdate.decode(raw)
    except DecodeError as exc:
        log.warning("ignoring an undecodable popularity update at %s: %s", where, exc)
        return None


def on_update_record(r: Message) -> ItemUpdate | None:
    return decode_update(r.value(), where=f"offset {r.offset()}")


def decode_update(raw: bytes | None, *, where: str = "the topic") -> ItemUpdate | None:
    """The update, or None (logged) if it does not decode."""
    try:
        return ItemUpdate.decode(raw)
    except DecodeError as exc:
        log.warning("ignoring an undecodable item update at %s: %s", where, exc)
        return None
