"""The worker loop: poll → decode → handle → publish lists and state → commit.

It only orchestrates; the work is in :func:`worker.core.handler.handle_batch`.
Checkpoint order per batch, so that nothing is lost or counted twice:

1. queue the lists, the dead letters and the changed users' state (changelog),
   then wait until every one of them is acknowledged (one flush);
2. only then commit the consumed offsets.

A crash before the state is acknowledged replays the batch onto the old state
(its lists are published again, identical). A crash after it replays the batch
onto the new state: the per-user source offset makes each event a no-op, and
the user's list is published again, since the crash may have come before that
list was acknowledged.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from worker.changelog import read_partitions, write_changes
from worker.config import KafkaSettings, TopicSettings, WorkerSettings
from worker.core.engine import Prepared, Recommender
from worker.core.handler import Source, handle_batch
from worker.core.items import ItemUpdate
from worker.core.model import Model
from worker.core.popularity import PopularityUpdate
from worker.core.wire import RatingEvent, decode_rating, decode_video
from worker.errors import BrokerError, DecodeError
from worker.items import (
    ItemRole,
    decode_popularity,
    decode_update,
    dump_new_items,
    on_update_record,
    send_contributions,
    send_popularity_pairs,
    trace_install,
)
from worker.kafkaio import (
    Publisher,
    dead_letter_headers,
    drain,
    ensure_topics,
    make_group_consumer,
    make_producer,
    make_reader,
    poll_batch,
    position,
    topic_partitions,
    wait_for_topics,
)
from worker.metrics import WorkerMetrics
from worker.snapshots import Snapshot, load_snapshot, save_snapshot
from worker.storage import load_model

log = logging.getLogger(__name__)

# A restore that read more changelog records than this writes a snapshot at once, so that
# the next restart does not read them again.
_SNAPSHOT_AFTER_TAIL = 10_000
# Seconds between two reads of the videos and control topics.
_BROADCAST_EVERY_S = 0.2
_BROADCAST_FETCH_WAIT_MS = 100
# Poll timeout when idle: short enough to notice SIGTERM and broadcasts promptly.
_POLL_TIMEOUT_S = 0.1
# A poll (beyond its own timeout) or a batch slower than this is logged as a warning.
_SLOW_TURN_S = 0.25
# Users moved to a swapped-in model's catalog per loop turn besides those who send events
# (~30 µs each): 100k users settle in half a minute of busy turns or three idle minutes.
_SETTLE_PER_TURN = 64


def install_stop_handlers(stopping: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stopping``: the loop finishes its batch, commits, exits 0."""

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: finishing the current batch, then stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


class Worker:
    """One refold worker process: a member of the consumer group on ``ratings``."""

    def __init__(
        self,
        *,
        settings: WorkerSettings,
        kafka: KafkaSettings,
        topics: TopicSettings,
        model: Model,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        stopping: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        self.topics = topics
        self.clock = clock
        self.engine = Recommender(
            model,
            weights=settings.weights(model.manifest),
            dedup_window=settings.dedup_window,
            popularity_half_life_s=settings.popularity_half_life_s,
            shared_items=settings.shared_items,
            shared_popularity=settings.shared_popularity,
        )
        self.items: ItemRole | None = None
        self.metrics = WorkerMetrics()
        self.metrics.model_info.labels(model.version).set(1)
        self.stopping = stopping or threading.Event()
        self.owned: set[int] = set()
        # Per owned partition: the latest changelog record of each user (what the compacted
        # changelog holds) and the next changelog offset; snapshots are written from these.
        self.records: dict[int, dict[str, bytes]] = {}
        self.changelog_next: dict[int, int] = {}
        self._last_snapshot = time.monotonic()
        self._dirty: set[int] = set()  # partitions changed since their last snapshot
        self._preloaded: dict[int, Snapshot] = {}
        self._preloader: threading.Thread | None = None
        # (topic, partition) -> next offset: processed and acknowledged, not committed yet
        self._uncommitted: dict[tuple[str, int], int] = {}
        self._next_commit = 0.0
        self._pending_model: Prepared | None = None
        self._loading: threading.Thread | None = None
        self._model_source: str | None = None
        self.batches = 0

    # ---- lifecycle -----------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT finish the batch in hand, then stop; SIGHUP reloads --model."""
        install_stop_handlers(self.stopping)

        def reload(signum: int, frame: FrameType | None) -> None:
            self.request_model(str(self.settings.model))

        signal.signal(signal.SIGHUP, reload)

    def _setup(self) -> None:
        t = self.topics
        self.producer = make_producer(
            self.kafka, **{"client.id": f"{self.settings.client_id}-producer"}
        )
        self.publisher = Publisher(self.producer)
        n = topic_partitions(self.producer, t.ratings) or self.settings.create_topics_partitions
        ensure_topics(
            self.kafka,
            {
                t.ratings: n,
                t.recommendations: n,
                t.dlq: 1,
                t.videos: 1,
                t.changelog: n,
                t.control: 1,
                t.item_contributions: n,
                t.item_updates: 1,
                t.popularity_pairs: n,
                t.popularity: 1,
            },
            compacted={
                t.changelog, t.videos, t.control, t.item_contributions, t.item_updates,
                t.popularity_pairs, t.popularity,
            },
        )  # fmt: skip
        if self.settings.shared_items or self.settings.shared_popularity:
            n_items = topic_partitions(self.producer, t.item_contributions) or n
            self.items = ItemRole(
                kafka=self.kafka,
                topics=t,
                settings=self.settings,
                engine=self.engine,
                publisher=self.publisher,
                n_partitions=n_items,
                metrics=self.metrics,
                n_pair_partitions=topic_partitions(self.producer, t.popularity_pairs) or n,
            )
        outputs = (t.recommendations, t.changelog, t.dlq)
        if wait_for_topics(self.producer, outputs, deadline_s=10.0) is None:
            log.warning("output topics have no leader yet; the first lists may be slow")
        group_conf: dict[str, Any] = {
            "client.id": self.settings.client_id,
            "fetch.wait.max.ms": self.settings.fetch_max_wait_ms,
            "session.timeout.ms": self.settings.session_timeout_ms,
            "heartbeat.interval.ms": self.settings.heartbeat_interval_ms,
            "max.poll.interval.ms": 300_000,
        }
        if self.settings.group_instance_id:
            group_conf["group.instance.id"] = self.settings.group_instance_id
        self.consumer: Consumer = make_group_consumer(self.kafka, self.settings.group, **group_conf)
        # Every worker needs every video, every model announcement and every new video's
        # shared factors: a group-less reader assigns these topics in full, and reads them
        # to their end before the worker joins its group and serves.
        self.broadcast: Consumer = make_reader(
            self.kafka,
            **{
                "client.id": f"{self.settings.client_id}-broadcast",
                # librdkafka keeps fetching assigned partitions in the background; on the
                # embedded broker every fetch costs CPU that grows with the partition, and
                # these topics are only read every _BROADCAST_EVERY_S anyway.
                "fetch.wait.max.ms": max(self.settings.fetch_max_wait_ms, _BROADCAST_FETCH_WAIT_MS),
            },
        )
        self.broadcast.assign(
            [
                TopicPartition(topic, p, OFFSET_BEGINNING)
                for topic in (t.videos, t.control, t.item_updates, t.popularity)
                for p in range(topic_partitions(self.broadcast, topic) or 1)
            ]
        )
        self._drain_broadcast(until_caught_up=True)
        # Know the ratings topic's partitions before joining: a group leader that joins
        # without them assigns nothing and only notices at the next metadata refresh.
        if wait_for_topics(self.consumer, [t.ratings], deadline_s=60.0) is None:
            raise BrokerError(f"no metadata for topic {t.ratings} after 60s")
        self.consumer.subscribe(
            [t.ratings],
            on_assign=lambda c, tps: self.on_assigned({tp.partition for tp in tps}),
            on_revoke=lambda c, tps: self.on_revoked({tp.partition for tp in tps}),
            on_lost=lambda c, tps: self.on_revoked({tp.partition for tp in tps}),
        )
        if self.items is not None:
            self.items.start()

    def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        if self.stopping.is_set():
            return 0
        self._start_preload()
        self._setup()
        # The model, the id maps and the restored state live as long as the process: move
        # them out of the collector's generations, so a full collection does not walk
        # millions of long-lived objects in the middle of a batch.
        gc.collect()
        gc.freeze()
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
        log.info(
            "worker started: model %s, group %s", self.engine.model_version, self.settings.group
        )
        try:
            next_broadcast = 0.0
            while not self.stopping.is_set():
                self.metrics.beat()
                if time.monotonic() >= next_broadcast:
                    # A poll of the broadcast consumer costs milliseconds (network I/O and
                    # GIL hand-offs); videos and model announcements need no faster pickup.
                    self._drain_broadcast(until_caught_up=False)
                    next_broadcast = time.monotonic() + _BROADCAST_EVERY_S
                self._maybe_swap()
                if self.items is not None:
                    self.items.poll()
                polled = time.monotonic()
                batch = poll_batch(self.consumer, self.settings.max_poll_records, _POLL_TIMEOUT_S)
                started = time.monotonic()
                if batch:
                    self.process(batch)
                self._warn_if_slow(batch, started - polled, time.monotonic() - started)
                self._commit(force=False)
                if self.engine.settle(_SETTLE_PER_TURN) and not self.engine.unsettled:
                    log.info("every live user moved to model %s", self.engine.model_version)
                if time.monotonic() - self._last_snapshot > self.settings.snapshot_interval_s:
                    self._snapshot(set(self.owned))
            self._snapshot(set(self.owned))
            if self.settings.items_dump is not None:
                self._read_item_updates()
                dump_new_items(self.settings.items_dump, self.engine)
        finally:
            self._close()
        return 0

    def _warn_if_slow(self, batch: list[Message], poll_s: float, process_s: float) -> None:
        """Log a loop turn slow enough to show in end-to-end latency (for operators)."""
        if poll_s > _SLOW_TURN_S + _POLL_TIMEOUT_S or process_s > _SLOW_TURN_S:
            log.warning(
                "slow loop turn: poll %.0f ms, %d records processed in %.0f ms",
                poll_s * 1000.0,
                len(batch),
                process_s * 1000.0,
            )

    def _commit(self, *, force: bool, partitions: set[int] | None = None) -> None:
        """Commit the acknowledged offsets, at most every ``commit_interval_ms`` unless forced.

        Asynchronous in the loop: the changelog records each user's source offset, so a
        commit that is late or lost only makes a restart re-read events, which are then
        no-ops that republish the user's list. Synchronous on revocation and shutdown.
        """
        now = time.monotonic()
        if not self._uncommitted or (not force and now < self._next_commit):
            return
        chosen = self.owned if partitions is None else partitions & self.owned
        offsets = [
            TopicPartition(topic, p, offset)
            for (topic, p), offset in self._uncommitted.items()
            if p in chosen
        ]
        # What stays: owned partitions not committed now. Offsets of partitions this worker
        # no longer owns are dropped: the new owner commits its own.
        kept = set() if partitions is None else self.owned - partitions
        self._uncommitted = {tp: o for tp, o in self._uncommitted.items() if tp[1] in kept}
        self._next_commit = now + self.settings.commit_interval_ms / 1000.0
        if offsets and force:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        elif offsets:
            self.consumer.commit(offsets=offsets, asynchronous=True)

    def _close(self) -> None:
        closers: list[Callable[[], object]] = [
            lambda: self._commit(force=True),
            self.consumer.close,
            self.broadcast.close,
            lambda: self.items.close() if self.items is not None else None,
            lambda: self.publisher.close(timeout_s=10),
        ]
        for closer in closers:
            try:
                closer()
            except Exception:  # closing after a failure must not hide the original error
                log.exception("error while closing a Kafka client")

    # ---- broadcast topics ----------------------------------------------------------------

    def _drain_broadcast(self, *, until_caught_up: bool) -> None:
        def on_record(r: Message) -> None:
            if r.topic() == self.topics.videos:
                self._on_video(r)
            elif r.topic() == self.topics.item_updates:
                self._on_item_update(r)
            elif r.topic() == self.topics.popularity:
                self._install_popularity(decode_popularity(r.value(), where=f"{r.offset()}"))
            else:
                self._on_control(r)

        if until_caught_up:
            if drain(self.broadcast, on_record, deadline_s=60.0) is None:
                log.warning("videos/control topics not caught up after 60s; going on")
        else:
            for r in poll_batch(self.broadcast, 10_000, 0):
                on_record(r)

    def _on_video(self, r: Message) -> None:
        try:
            video = decode_video(r.value())
        except DecodeError as exc:
            self._dead_letter(r, exc.reason, exc.message)
            return
        self.engine.register_video(video)
        self.metrics.videos_in.inc()

    def _read_item_updates(self) -> None:
        """Install every item update published so far (a fresh read of the topic: the
        broadcast reader reports a partition's end once, so a second drain would wait)."""
        self.publisher.producer.flush(10)
        t = self.topics
        parts = range(topic_partitions(self.producer, t.item_updates) or 1)
        latest, _ = read_partitions(
            self.kafka, t.item_updates, parts, fetch_max_wait_ms=self.settings.fetch_max_wait_ms
        )
        for records in latest.values():
            for raw in records.values():
                self._install_item_update(decode_update(raw))
        parts = range(topic_partitions(self.producer, t.popularity) or 1)
        latest, _ = read_partitions(
            self.kafka, t.popularity, parts, fetch_max_wait_ms=self.settings.fetch_max_wait_ms
        )
        for records in latest.values():
            for raw in records.values():
                self._install_popularity(decode_popularity(raw))

    def _install_popularity(self, update: PopularityUpdate | None) -> None:
        if update is None:
            return
        self.engine.install_popularity(update)
        self.metrics.popularity_updates_in.inc()
        if self.items is not None:
            self.items.saw_popularity(update)

    def _on_item_update(self, r: Message) -> None:
        self._install_item_update(on_update_record(r))

    def _install_item_update(self, update: ItemUpdate | None) -> None:
        if update is None:
            return
        installed = self.engine.install_item_update(update)
        if installed:
            self.metrics.item_updates_in.inc()
        if self.items is not None:
            self.items.saw_update(update)
        if self.settings.items_trace is not None:
            trace_install(self.settings.items_trace, update, installed, self.settings.client_id)

    def _on_control(self, r: Message) -> None:
        try:
            doc = json.loads(r.value() or b"")
            path = str(doc["model_dir"])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("ignoring malformed model announcement at offset %s: %s", r.offset(), exc)
            return
        self.request_model(path)

    # ---- model hot swap ------------------------------------------------------------------

    def request_model(self, path: str) -> None:
        """Load and prepare a model in the background; it is swapped in between two batches.

        The swap itself then costs the loop milliseconds: the catalog, the top-k index
        and the user gramian are built here (~0.5 s for 100k videos × 200k users), and
        live states move to the new catalog one by one, on their users' next event.
        """
        if self._loading is not None and self._loading.is_alive():
            self._model_source = path  # the newest request wins once the load ends
            return
        self._model_source = path

        def load() -> None:
            try:
                model = load_model(Path(path))
                # Unset weights follow the model's training, as on a restart with it.
                weights = self.settings.weights(model.manifest)
                prepared = self.engine.prepare(model, weights=weights)
            except Exception:
                log.exception("model at %s could not be loaded; keeping the current one", path)
                return
            self._pending_model = prepared

        self._loading = threading.Thread(target=load, name="model-loader", daemon=True)
        self._loading.start()

    def _maybe_swap(self, wait: bool = False) -> None:
        if wait and self._loading is not None:
            self._loading.join()
        prepared, self._pending_model = self._pending_model, None
        if prepared is None or prepared.model.version == self.engine.model_version:
            return
        old, new = self.engine.model_version, prepared.model.version
        started = time.monotonic()
        self.engine.swap_model(prepared)
        if self.items is not None:
            self.items.swap()
        self.metrics.model_info.labels(old).set(0)
        self.metrics.model_info.labels(new).set(1)
        log.info("model swapped: %s -> %s in %.1f ms", old, new, (time.monotonic() - started) * 1e3)

    # ---- rebalance -----------------------------------------------------------------------

    def on_revoked(self, partitions: set[int]) -> None:
        try:
            self._commit(force=True, partitions=partitions)
        except Exception:  # the group may already have moved on; a replay is harmless
            log.exception("offset commit on revocation failed")
        self._snapshot(partitions & self.owned)
        gone = [u for u, st in self.engine.live_users() if st.partition in partitions]
        for p in partitions:
            gone += list(self.records.pop(p, {}))
            self.changelog_next.pop(p, None)
        self.engine.forget(gone)
        self.owned -= partitions
        log.info("partitions %s revoked; %d users dropped", sorted(partitions), len(set(gone)))

    def on_assigned(self, partitions: set[int]) -> None:
        new = partitions - self.owned
        self.owned |= partitions
        if not self.settings.durable or not new:
            # The replay's harness reads the group's state from these lines (LiveWorker).
            log.info("partitions %s assigned; no state to restore", sorted(partitions))
            return
        started = time.monotonic()
        snaps: dict[int, Snapshot] = {}
        if self._preloader is not None:
            self._preloader.join()
            self._preloader = None
            snaps = {p: s for p, s in self._preloaded.items() if p in new}
            self._preloaded = {}
        elif self.settings.state_dir is not None:
            for p in new:
                snap = load_snapshot(self.settings.state_dir, self.topics.changelog, p)
                if snap is not None:
                    snaps[p] = snap
        tail, positions = read_partitions(
            self.kafka,
            self.topics.changelog,
            sorted(new),
            start_offsets={p: snap.next_offset for p, snap in snaps.items()},
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
        )
        # Changelog partition p holds the users of ratings partition p; the tail wins.
        by_partition = {p: {**snaps[p].records, **tail[p]} if p in snaps else tail[p] for p in new}
        for p in new:
            self.records[p] = by_partition[p]
            self.changelog_next[p] = positions[p]
            if p not in snaps or tail[p]:
                self._dirty.add(p)
            self.engine.restore_lazy(by_partition[p])
        restored = sum(len(r) for r in by_partition.values())
        self.metrics.restored.inc(restored)
        log.info(
            "partitions %s assigned; %d users restored (%d from local snapshots, %d changelog "
            "records) in %.2fs",
            sorted(new),
            restored,
            sum(len(s.records) for s in snaps.values()),
            sum(len(t) for t in tail.values()),
            time.monotonic() - started,
        )
        if sum(len(t) for t in tail.values()) > _SNAPSHOT_AFTER_TAIL:
            self._snapshot(new)

    def _start_preload(self) -> None:
        """Load local snapshots in the background while the group join runs."""
        state_dir = self.settings.state_dir
        if state_dir is None or not self.settings.durable or not Path(state_dir).is_dir():
            return
        prefix = f"{self.topics.changelog}-"
        found = sorted(
            int(p.name[len(prefix) : -len(".json")])
            for p in Path(state_dir).glob(f"{prefix}*.json")
            if p.name[len(prefix) : -len(".json")].isdigit()
        )

        def preload() -> None:
            for p in found:
                snap = load_snapshot(state_dir, self.topics.changelog, p)
                if snap is not None:
                    self._preloaded[p] = snap

        self._preloader = threading.Thread(target=preload, name="snapshot-preload", daemon=True)
        self._preloader.start()

    def _snapshot(self, partitions: set[int]) -> None:
        """Write local snapshots of ``partitions`` (no-op without a state dir)."""
        if self.settings.state_dir is None or not self.settings.durable:
            return
        started = time.monotonic()
        partitions = partitions & self._dirty
        for p in sorted(partitions):
            if p in self.records:
                save_snapshot(
                    self.settings.state_dir,
                    self.topics.changelog,
                    p,
                    self.records[p],
                    self.changelog_next.get(p, 0),
                )
        self._dirty -= partitions
        self._last_snapshot = time.monotonic()
        if partitions:
            log.info(
                "snapshot of partitions %s in %.2fs",
                sorted(partitions),
                self._last_snapshot - started,
            )

    # ---- one batch -----------------------------------------------------------------------

    def _dead_letter(self, r: Message, reason: str, message: str) -> None:
        self.publisher.send(
            self.topics.dlq,
            key=r.key(),
            value=r.value(),
            headers=dead_letter_headers(reason, message, *position(r)),
        )
        self.metrics.dead_letters.labels(reason).inc()

    def process(self, batch: list[Message]) -> None:
        """Handle one polled batch end to end, then commit its offsets."""
        started = time.monotonic()
        polled_ms = time.time() * 1000.0
        ratings: list[tuple[RatingEvent, Source]] = []
        kafka_ts: dict[str, int] = {}
        offsets: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset
        for r in batch:
            topic, partition, offset = position(r)
            offsets[topic, partition] = offset + 1
            ts = r.timestamp()[1]
            if ts > 0:  # clocks of other hosts may run ahead: clamp at zero
                self.metrics.event_wait.observe(max(0.0, (polled_ms - ts) / 1000.0))
            value, key = r.value(), r.key()
            try:
                event = decode_rating(value)
            except DecodeError as exc:
                self._dead_letter(r, exc.reason, exc.message)
                continue
            if key is not None and key != event.user_id.encode("utf-8"):
                # A wrong key would put the user's events on another worker's partition.
                self._dead_letter(r, "key_mismatch", "message key differs from user_id")
                continue
            ratings.append((event, Source(topic, partition, offset)))
            kafka_ts[event.user_id] = ts
        self.metrics.batch_size.observe(len(batch))
        self.metrics.events_in.inc(len(ratings))

        t0 = time.monotonic()
        outcome = handle_batch(self.engine, ratings, (), now=self.clock())
        self.metrics.fold_in_seconds.observe(time.monotonic() - t0)
        for rec in outcome.recommendations:
            self.publisher.send(
                self.topics.recommendations, key=rec.user_id.encode("utf-8"), value=rec.payload
            )
        if self.items is not None and self.settings.shared_popularity:
            # Pairs that turned positive or stopped being positive, and those of replayed
            # events (their records may not have been acknowledged before a crash).
            pairs = self.engine.take_popularity_pairs()
            send_popularity_pairs(
                self.publisher, self.topics.popularity_pairs, self.items.n_pair_partitions, pairs
            )
            self.metrics.popularity_pairs_out.inc(len(pairs))
        if self.items is not None and self.settings.shared_items:
            # Every reflected user (replayed ones too: their contribution may not have been
            # acknowledged before a crash) tells the owners of the new videos in their row.
            touched = [rec.user_id for rec in outcome.recommendations]
            contributions = self.engine.contributions(touched, kafka_ts)
            send_contributions(
                self.publisher,
                self.topics.item_contributions,
                self.items.n_partitions,
                contributions,
            )
            self.metrics.item_contributions_out.inc(len(contributions))
        written: dict[str, tuple[int, bytes]] = {}
        if self.settings.durable and outcome.changed_users:
            written = write_changes(
                self.publisher, self.topics.changelog, self.engine, outcome.changed_users
            )
        # One flush for lists, dead letters and state: all acknowledged before the commit.
        t1 = time.monotonic()
        acks = self.publisher.confirm()
        self.metrics.publish_confirm_seconds.observe(time.monotonic() - t1)
        for ack in acks:
            if ack.topic == self.topics.changelog:
                nxt = self.changelog_next.get(ack.partition, 0)
                self.changelog_next[ack.partition] = max(nxt, ack.offset + 1)
        acked_ms = time.time() * 1000.0
        for rec in outcome.recommendations:
            self.metrics.lists_out.labels(rec.strategy).inc()
            event_ts = kafka_ts.get(rec.user_id)
            if event_ts is not None and event_ts > 0:
                self.metrics.e2e_latency.observe(max(0.0, (acked_ms - event_ts) / 1000.0))
        for user_id, (p, raw) in written.items():
            self.records.setdefault(p, {})[user_id] = raw
            self._dirty.add(p)
        # Offsets are committed only now, after every record above was acknowledged.
        self._uncommitted.update(offsets)
        self._commit(force=False)
        self.metrics.events_applied.inc(outcome.applied)
        self.metrics.duplicates.inc(outcome.duplicates)
        self.metrics.replayed.inc(outcome.replayed)
        self.metrics.users.set(self.engine.n_live_users)
        self.metrics.batch_seconds.observe(time.monotonic() - started)
        lag = 0
        for (t, p), nxt in offsets.items():
            # The high watermark of the last fetch response (no request is sent).
            _, hw = self.consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
            if hw >= 0:
                lag += max(0, hw - nxt)
        self.metrics.lag.set(lag)
        self.batches += 1
