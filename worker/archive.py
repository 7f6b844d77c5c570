"""``refold archive``: the ``ratings`` and ``videos`` streams as Parquet, exactly once.

Layout of ``--out DIR`` (what ``refold bootstrap --logs DIR/logs --reactions
DIR/reactions --videos DIR/videos`` reads)::

    DIR/logs/<roll>.parquet       views: event_timestamp, viewer_uid, rutube_video_id,
                                  total_watchtime (s), event_id, kafka_partition, kafka_offset
    DIR/reactions/<roll>.parquet  like/dislike/neutral: ts, user_id, video_id, action,
                                  event_id, kafka_partition, kafka_offset
    DIR/videos/<roll>.parquet     announced videos: published_at, video_id, duration (s),
                                  category, author_id, title, kafka_partition, kafka_offset

A *roll* is what one topic consumed since the previous roll, cut by rows
(``--roll-rows``) or age (``--roll-seconds``): one file per kind that has rows, all
named ``<roll>.parquet`` (``<seq>-<UTC time>``: names sort in write order). Each
file carries the roll's :class:`~worker.core.archive.RollMeta` in its Parquet key-value
metadata (``refold.archive``): the kinds written and, per partition, the offsets the
roll consumed (valid, duplicate and invalid messages alike).

Exactly once:

* a file is written under ``.<roll>.parquet.tmp`` (ignored by bootstrap, which reads
  ``*.parquet`` without a leading dot), fsynced, then renamed; directories are fsynced
  after the renames. A reader never sees a partial file;
* the files are the truth, not committed offsets: on every assignment the archive
  removes temporary files, removes *incomplete* rolls (a kill between the renames of one
  roll's files left some listed kind without its file), and seeks each partition to one
  past the highest offset of the complete rolls; it rebuilds the per-user dedup windows
  from the archived event ids, in offset order, so a restart drops exactly the retries
  an uninterrupted run drops (per user, the last ``REFOLD_DEDUP_WINDOW`` ids, as the
  worker). Offsets are also committed after each roll, for lag monitoring only;
* on revocation the pending rows are rolled before the partitions go; lost partitions
  (session expired) drop them and the next assignment reads the files again;
* end offsets are never asked for (the embedded broker gets them wrong);
* one process writes a directory: it holds an exclusive ``flock`` on ``DIR/.lock``
  (released by the kernel when the process dies, kill -9 included); a second
  ``refold archive`` on the same directory exits with an error.

Invalid messages (as the worker's dead letters: undecodable, failing validation, or
a key that differs from ``user_id``) are counted and logged, never archived.

Retention (``--keep-days N``): after each roll, rating rolls whose newest event is more
than N days older than the newest archived rating event are deleted (event time, not
the wall clock: a replayed or stalled stream does not lose its archive); the roll
holding each partition's highest offsets is kept, and video rolls are never deleted.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from worker.config import ArchiveSettings, KafkaSettings, TopicSettings, WorkerSettings
from worker.core.archive import (
    KINDS,
    META_KEY,
    USER_COLUMN,
    Archiver,
    Kind,
    Roll,
    RollMeta,
    expired_rolls,
    incomplete_rolls,
    next_seq,
    overlapping_spans,
    resume_offsets,
    summarize,
)
from worker.errors import ArchiveError
from worker.kafkaio import (
    ensure_topics,
    make_group_consumer,
    poll_batch,
    position,
    topic_partitions,
    wait_for_topics,
)

log = logging.getLogger(__name__)

_TS = pa.timestamp("us", tz="UTC")
SCHEMAS: dict[Kind, pa.Schema] = {
    "logs": pa.schema(
        [
            ("event_timestamp", _TS),
            ("viewer_uid", pa.string()),
            ("rutube_video_id", pa.string()),
            ("total_watchtime", pa.float64()),
            ("event_id", pa.string()),
            ("kafka_partition", pa.int32()),
            ("kafka_offset", pa.int64()),
        ]
    ),
    "reactions": pa.schema(
        [
            ("ts", _TS),
            ("user_id", pa.string()),
            ("video_id", pa.string()),
            ("action", pa.string()),
            ("event_id", pa.string()),
            ("kafka_partition", pa.int32()),
            ("kafka_offset", pa.int64()),
        ]
    ),
    "videos": pa.schema(
        [
            ("published_at", _TS),
            ("video_id", pa.string()),
            ("duration", pa.float64()),
            ("category", pa.string()),
            ("author_id", pa.string()),
            ("title", pa.string()),
            ("kafka_partition", pa.int32()),
            ("kafka_offset", pa.int64()),
        ]
    ),
}
_TMP_SUFFIX = ".parquet.tmp"
# Poll timeout when idle: short enough to notice SIGTERM and a due roll promptly.
_POLL_TIMEOUT_S = 0.2


@dataclass
class ArchiveFiles:
    """The complete rolls found in an archive directory."""

    metas: dict[str, RollMeta] = field(default_factory=dict)
    files: dict[str, dict[Kind, Path]] = field(default_factory=dict)


class ArchiveStore:
    """The archive directory: its lock, atomic roll writes, scans, retention deletes."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.dirs: dict[Kind, Path] = {k: self.out / k for k in KINDS}
        self._lock_fd: int | None = None

    def ensure(self) -> None:
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)

    def lock(self) -> None:
        """Take the directory's writer lock, or raise :class:`ArchiveError` if another
        process holds it. The kernel drops it when this process exits, however it exits."""
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ArchiveError(f"another refold archive is writing {self.out}") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove_temporaries(self) -> int:
        n = 0
        for d in self.dirs.values():
            for p in d.glob(f".*{_TMP_SUFFIX}"):
                p.unlink(missing_ok=True)
                n += 1
        return n

    def scan(self, *, repair: bool) -> ArchiveFiles:
        """Read every file's roll metadata (footers only). With ``repair``, temporary files
        and incomplete rolls are deleted; without, incomplete rolls are only left out.

        A visible file that cannot be read is an error (files appear by rename, so it
        is damage from outside): archiving on without it would duplicate its events.
        """
        if repair:
            removed = self.remove_temporaries()
            if removed:
                log.info("removed %d temporary files of an interrupted roll", removed)
        present: dict[str, set[str]] = {}
        metas: dict[str, RollMeta] = {}
        files: dict[str, dict[Kind, Path]] = {}
        for kind, d in self.dirs.items():
            if not d.is_dir():
                continue
            for p in sorted(d.glob("*.parquet")):
                if p.name.startswith((".", "_")):
                    continue
                meta = read_meta(p)
                present.setdefault(meta.roll, set()).add(kind)
                metas[meta.roll] = meta
                files.setdefault(meta.roll, {})[kind] = p
        broken = incomplete_rolls(present, metas)
        for roll in sorted(broken):
            if repair:
                log.warning(
                    "removing incomplete roll %s (has %s of %s)",
                    roll,
                    sorted(present[roll]),
                    list(metas[roll].kinds),
                )
                for p in files[roll].values():
                    p.unlink(missing_ok=True)
                self._sync_dirs()
            metas.pop(roll)
            files.pop(roll)
        overlaps = overlapping_spans(metas.values())
        if overlaps:
            a, b, span = overlaps[0]
            raise ArchiveError(
                f"archive {self.out}: rolls {a} and {b} both hold offsets {span.first}.."
                f"{span.last} of {span.topic}/{span.partition} (written by another tool?)"
            )
        return ArchiveFiles(metas=metas, files=files)

    def write(self, roll: Roll) -> dict[Kind, Path]:
        """Write a roll's files: each to a temporary name, fsynced, then all renamed."""
        self.ensure()
        meta = roll.meta
        staged: list[tuple[Path, Path]] = []
        for kind in meta.kinds:
            final = self.dirs[kind] / f"{meta.roll}.parquet"
            tmp = self.dirs[kind] / f".{meta.roll}{_TMP_SUFFIX}"
            table = pa.Table.from_pylist(roll.rows[kind], schema=SCHEMAS[kind])
            table = table.replace_schema_metadata({META_KEY: meta.to_json()})
            with open(tmp, "wb") as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
            staged.append((tmp, final))
        for tmp, final in staged:
            os.replace(tmp, final)
        self._sync_dirs()
        return {k: self.dirs[k] / f"{meta.roll}.parquet" for k in meta.kinds}

    def delete(self, paths: Iterable[Path]) -> None:
        for p in paths:
            p.unlink(missing_ok=True)
        self._sync_dirs()

    def _sync_dirs(self) -> None:
        for d in self.dirs.values():
            if d.is_dir():
                fd = os.open(d, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def read_meta(path: Path) -> RollMeta:
    """The roll metadata of one archive file; :class:`ArchiveError` if it has none."""
    try:
        md = pq.read_metadata(path).metadata or {}
        return RollMeta.from_json(md[META_KEY])
    except KeyError:
        raise ArchiveError(f"{path} is not an archive file (no refold.archive metadata)") from None
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ArchiveError(f"archive file {path} cannot be read: {exc}") from None


def accepted_ids(
    found: ArchiveFiles, topic: str, partitions: set[int]
) -> Iterator[tuple[str, str]]:
    """The archived (user_id, event_id) pairs of ``partitions``, in write order.

    Streams one roll at a time (rolls by ``seq``, rows of a roll by offset), so
    restoring costs the dedup windows' memory, not the archive's.
    """
    for meta in sorted(found.metas.values(), key=lambda m: m.seq):
        if meta.topic != topic or not {s.partition for s in meta.spans} & partitions:
            continue
        rows: list[tuple[int, str, str]] = []
        for kind in ("logs", "reactions"):
            path = found.files[meta.roll].get(kind)
            if path is None:
                continue
            cols = [USER_COLUMN[kind], "event_id", "kafka_partition", "kafka_offset"]
            t = pq.read_table(path, columns=cols)
            users, eids, parts, offs = (t.column(c).to_pylist() for c in cols)
            rows += [
                (o, u, e) for u, e, p, o in zip(users, eids, parts, offs, strict=True)
                if p in partitions
            ]  # fmt: skip
        rows.sort()  # one user lives in one partition: offset order is enough
        yield from ((u, e) for _, u, e in rows)


def summary(out: Path) -> dict[str, Any]:
    """``refold archive summary``: rolls, rows, time range and offsets per partition of
    the complete rolls in ``out`` (footers only), plus temporary and incomplete files."""
    store = ArchiveStore(out)
    if not store.out.is_dir():
        raise ArchiveError(f"{out} is not a directory")
    found = store.scan(repair=False)
    doc = summarize(found.metas.values())
    visible = {p for d in store.dirs.values() if d.is_dir() for p in d.glob("*.parquet")}
    counted = {p for files in found.files.values() for p in files.values()}
    return {
        "out": str(out),
        **doc,
        "files": len(counted),
        "incomplete_files": len(visible - counted),
        "temporary_files": sum(
            1 for d in store.dirs.values() if d.is_dir() for _ in d.glob(f".*{_TMP_SUFFIX}")
        ),
    }


class ArchiveRunner:
    """The ``refold archive`` process: one member of the archive's consumer group."""

    def __init__(
        self,
        *,
        settings: ArchiveSettings,
        worker: WorkerSettings,
        kafka: KafkaSettings,
        topics: TopicSettings,
        stopping: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.kafka = kafka
        self.topics = topics
        self.stopping = stopping or threading.Event()
        self.store = ArchiveStore(settings.out)
        self.archiver = Archiver(
            ratings_topic=topics.ratings,
            videos_topic=topics.videos,
            dedup_window=worker.dedup_window,
            roll_rows=settings.roll_rows,
            roll_seconds=settings.roll_seconds,
        )
        self.found = ArchiveFiles()
        self.owned: set[tuple[str, int]] = set()
        self.seq = 1
        self.rolls_written = 0

    def _setup(self) -> None:
        t = self.topics
        self.store.lock()
        self.store.ensure()
        self.consumer: Consumer = make_group_consumer(
            self.kafka,
            self.settings.group,
            **{
                "client.id": self.settings.group,
                "fetch.wait.max.ms": self.worker.fetch_max_wait_ms,
                "session.timeout.ms": self.worker.session_timeout_ms,
                "heartbeat.interval.ms": self.worker.heartbeat_interval_ms,
            },
        )
        n = topic_partitions(self.consumer, t.ratings) or self.worker.create_topics_partitions
        ensure_topics(self.kafka, {t.ratings: n, t.videos: 1}, compacted={t.videos})
        if wait_for_topics(self.consumer, [t.ratings, t.videos], deadline_s=60.0) is None:
            raise ArchiveError(f"no metadata for topics {t.ratings}, {t.videos} after 60s")
        self.consumer.subscribe(
            [t.ratings, t.videos],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def run(self) -> int:
        if self.stopping.is_set():
            return 0
        self._setup()
        log.info("archive started: group %s, out %s", self.settings.group, self.settings.out)
        try:
            while not self.stopping.is_set():
                due = self.archiver.seconds_to_roll(time.monotonic())
                timeout = _POLL_TIMEOUT_S if due is None else min(_POLL_TIMEOUT_S, due)
                for m in poll_batch(self.consumer, self.worker.max_poll_records, timeout):
                    topic, partition, offset = position(m)
                    now = time.monotonic()
                    outcome, reason = self.archiver.offer(
                        topic, partition, offset, m.key(), m.value(), now
                    )
                    if outcome == "invalid":
                        log.warning(
                            "not archived: %s at %s/%d/%d", reason, topic, partition, offset
                        )
                    elif outcome == "archived" and self.archiver.should_roll(topic, now):
                        self._roll_topic(topic)  # full: a roll never exceeds --roll-rows
                self._roll(force=False)
            self._roll(force=True)
        finally:
            try:
                self.consumer.close()
            except Exception:
                log.exception("error while closing the consumer")
            self.store.unlock()
        return 0

    # ---- rolls ---------------------------------------------------------------------------

    def _roll(self, *, force: bool) -> None:
        now = time.monotonic()
        for topic in (self.topics.ratings, self.topics.videos):
            if force or self.archiver.should_roll(topic, now):
                self._roll_topic(topic)

    def _roll_topic(self, topic: str) -> None:
        roll = self.archiver.take(topic, self.seq, datetime.now(timezone.utc))
        if roll is None:
            return
        paths = self.store.write(roll)
        self.seq += 1
        self.found.metas[roll.meta.roll] = roll.meta
        self.found.files[roll.meta.roll] = paths
        self.rolls_written += 1
        c = self.archiver.counts
        log.info(
            "roll %s: %s rows of %s, offsets %s (so far: %d archived, %d duplicates, invalid %s)",
            roll.meta.roll,
            roll.meta.rows,
            topic,
            [(s.partition, s.first, s.last) for s in roll.meta.spans],
            c.archived,
            c.duplicate,
            c.invalid or "none",
        )
        self._expire()
        self._commit()

    def _commit(self) -> None:
        """Committed offsets follow the files, for lag monitoring only (a restart reads
        its position from the files)."""
        offsets = [
            TopicPartition(t, p, self.archiver.next_offsets[(t, p)])
            for t, p in self.owned
            if (t, p) in self.archiver.next_offsets
        ]
        if offsets:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=True)
            except Exception:  # monitoring only: never worth stopping the archive for
                log.debug("offset commit failed", exc_info=True)

    def _expire(self) -> None:
        keep_days = self.settings.keep_days
        if not keep_days:
            return
        victims = expired_rolls(
            self.found.metas.values(),
            rating_topic=self.topics.ratings,
            keep_days=keep_days,
            now=datetime.now(timezone.utc),
        )
        for roll in victims:
            self.store.delete(self.found.files[roll].values())
            self.found.metas.pop(roll)
            self.found.files.pop(roll)
        if victims:
            log.info("retention: deleted %d rolls older than %g days", len(victims), keep_days)

    # ---- rebalance -----------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        started = time.monotonic()
        self.archiver.reset()
        self.found = self.store.scan(repair=True)
        self.seq = next_seq(self.found.metas.values())
        nexts = resume_offsets(self.found.metas.values())
        mine = {(tp.topic, tp.partition) for tp in tps}
        rating_parts = {p for t, p in mine if t == self.topics.ratings}
        self.archiver.restore(
            {k: v for k, v in nexts.items() if k in mine},
            accepted_ids(self.found, self.topics.ratings, rating_parts),
        )
        self.owned = mine
        seek = [TopicPartition(t, p, nexts.get((t, p), OFFSET_BEGINNING)) for t, p in sorted(mine)]
        consumer.assign(seek)
        log.info(
            "partitions assigned; resuming at %s from %d rolls (%d users' ids) in %.2fs",
            [(tp.topic, tp.partition, tp.offset) for tp in seek],
            len(self.found.metas),
            len(self.archiver.dedup),
            time.monotonic() - started,
        )

    def _on_revoke(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        try:
            self._roll(force=True)
        finally:
            self.archiver.reset()
            self.owned = set()
            log.info("partitions revoked")

    def _on_lost(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        # Another member may own them already: what is pending is read again later.
        self.archiver.reset()
        self.owned = set()
        log.warning("partitions lost; pending rows dropped, they are read again on assignment")
