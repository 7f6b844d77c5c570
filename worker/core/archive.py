"""The archive's pure logic: what ``refold archive`` keeps, and which offsets each roll holds.

No Kafka and no files here (:mod:`worker.archive` is the edge). The pieces:

* **Rows.** :func:`rating_row` turns a valid :class:`RatingEvent` into a row of the
  bootstrap's layout: a ``view`` into a watch-log row (``logs``), a like, dislike or
  neutral into a reaction row (``reactions``); :func:`video_row` turns a
  :class:`VideoEvent` into a metadata row (``videos``). Every row also carries its event
  time, its ``event_id`` (ratings) and its Kafka partition and offset.
* **Rolls.** One roll is the rows of one topic consumed since the previous roll, written
  as one file per kind that has rows (all under the same roll id) and described by a
  :class:`RollMeta`: the kinds it wrote and, per partition, the span of offsets it
  *consumed* (valid, duplicate and invalid messages alike). A roll counts only when every
  kind it lists is present (:func:`incomplete_rolls`); then the next offset to read from a
  partition is one past the highest span end (:func:`resume_offsets`).
* **Dedup.** :class:`Dedup` drops an app's retries exactly as the worker does: per user,
  an event id among the last ``window`` accepted ids of that user is a duplicate.
* **The archiver.** :class:`Archiver` decodes and classifies each consumed message and
  collects the pending rows and spans of each topic; :meth:`Archiver.should_roll` decides
  when a roll is due (rows or age) and :meth:`Archiver.take` hands the roll over.
* **Retention.** :func:`expired_rolls` picks the rating rolls whose newest event is more
  than ``keep_days`` older than the newest archived rating event, keeping, for every
  partition, the roll with the highest offsets (the resume point lives in it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from itertools import pairwise
from typing import Any, Literal

from worker.core.wire import RatingEvent, VideoEvent, decode_rating, decode_video
from worker.errors import DecodeError

Kind = Literal["logs", "reactions", "videos"]
KINDS: tuple[Kind, ...] = ("logs", "reactions", "videos")
#: Parquet key-value metadata key of a roll's :class:`RollMeta` (JSON).
META_KEY = b"refold.archive"
META_VERSION = 1

#: Column names per kind: the bootstrap's seed layout (logs, videos) and its reaction
#: defaults, plus the event id and the Kafka position. The event-time column comes first.
COLUMNS: dict[Kind, tuple[str, ...]] = {
    "logs": (
        "event_timestamp",
        "viewer_uid",
        "rutube_video_id",
        "total_watchtime",
        "event_id",
        "kafka_partition",
        "kafka_offset",
    ),
    "reactions": (
        "ts",
        "user_id",
        "video_id",
        "action",
        "event_id",
        "kafka_partition",
        "kafka_offset",
    ),
    "videos": (
        "published_at",
        "video_id",
        "duration",
        "category",
        "author_id",
        "title",
        "kafka_partition",
        "kafka_offset",
    ),
}
#: The event-time column of each kind.
TIME_COLUMN: dict[Kind, str] = {k: cols[0] for k, cols in COLUMNS.items()}
#: The user-id column of each rating kind (dedup state is rebuilt from these).
USER_COLUMN: dict[Kind, str] = {"logs": "viewer_uid", "reactions": "user_id"}

Row = dict[str, Any]


def rating_row(event: RatingEvent, partition: int, offset: int) -> tuple[Kind, Row]:
    """The kind and row of a valid rating event (a view is a watch-log row)."""
    if event.action == "view":
        return "logs", {
            "event_timestamp": event.ts,
            "viewer_uid": event.user_id,
            "rutube_video_id": event.video_id,
            "total_watchtime": float(event.watch_seconds or 0.0),
            "event_id": event.event_id,
            "kafka_partition": partition,
            "kafka_offset": offset,
        }
    return "reactions", {
        "ts": event.ts,
        "user_id": event.user_id,
        "video_id": event.video_id,
        "action": event.action,
        "event_id": event.event_id,
        "kafka_partition": partition,
        "kafka_offset": offset,
    }


def video_row(event: VideoEvent, partition: int, offset: int) -> Row:
    """The metadata row of an announced video (duration in seconds)."""
    return {
        "published_at": event.published_at,
        "video_id": event.video_id,
        "duration": float(event.duration_seconds),
        "category": event.category,
        "author_id": event.author_id,
        "title": event.title,
        "kafka_partition": partition,
        "kafka_offset": offset,
    }


# ---- offsets ---------------------------------------------------------------------------------


TopicPartition = tuple[str, int]


@dataclass(frozen=True)
class Span:
    """Offsets ``first``..``last`` (inclusive) of one partition, all consumed by one roll."""

    topic: str
    partition: int
    first: int
    last: int


@dataclass(frozen=True)
class RollMeta:
    """What one roll holds; every file of the roll carries it.

    ``seq`` numbers the rolls of an archive directory in the order they were written
    (one past the highest found when the archive starts): per partition, a higher
    ``seq`` holds higher offsets, whatever the wall clock did.
    """

    roll: str
    seq: int
    topic: str
    kinds: tuple[Kind, ...]
    spans: tuple[Span, ...]
    rows: dict[str, int]
    min_ts: datetime | None
    max_ts: datetime | None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": META_VERSION,
                "roll": self.roll,
                "seq": self.seq,
                "topic": self.topic,
                "kinds": list(self.kinds),
                "spans": [[s.topic, s.partition, s.first, s.last] for s in self.spans],
                "rows": self.rows,
                "min_ts": None if self.min_ts is None else self.min_ts.isoformat(),
                "max_ts": None if self.max_ts is None else self.max_ts.isoformat(),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RollMeta:
        doc = json.loads(raw)
        if doc.get("version") != META_VERSION:
            raise ValueError(f"archive metadata version {doc.get('version')!r} is not supported")
        return cls(
            roll=str(doc["roll"]),
            seq=int(doc["seq"]),
            topic=str(doc["topic"]),
            kinds=tuple(doc["kinds"]),
            spans=tuple(Span(str(t), int(p), int(a), int(b)) for t, p, a, b in doc["spans"]),
            rows={str(k): int(v) for k, v in doc["rows"].items()},
            min_ts=None if doc["min_ts"] is None else datetime.fromisoformat(doc["min_ts"]),
            max_ts=None if doc["max_ts"] is None else datetime.fromisoformat(doc["max_ts"]),
        )


def incomplete_rolls(present: Mapping[str, set[str]], metas: Mapping[str, RollMeta]) -> set[str]:
    """Rolls some of whose listed kinds have no file (a kill between two renames, or
    between two deletions): they do not count, and the archive removes them."""
    return {roll for roll, kinds in present.items() if set(metas[roll].kinds) - kinds}


def resume_offsets(metas: Iterable[RollMeta]) -> dict[TopicPartition, int]:
    """Per partition, the next offset to archive: one past the highest offset consumed."""
    out: dict[TopicPartition, int] = {}
    for meta in metas:
        for s in meta.spans:
            key = (s.topic, s.partition)
            out[key] = max(out.get(key, 0), s.last + 1)
    return out


def next_seq(metas: Iterable[RollMeta]) -> int:
    """The ``seq`` of the next roll: one past the highest in the archive (1 when empty)."""
    return max((m.seq for m in metas), default=0) + 1


def roll_name(seq: int, at: datetime) -> str:
    """``0000000042-20261129T101500Z``: file names sort in write order (seq first), and
    the UTC time says when the roll was written."""
    return f"{seq:010d}-{at.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}"


def overlapping_spans(metas: Iterable[RollMeta]) -> list[tuple[str, str, Span]]:
    """Pairs of rolls that hold a common offset of one partition (never, when the archive
    is written by this code): ``(roll, other roll, span)`` per overlap."""
    by_part: dict[TopicPartition, list[tuple[int, int, str]]] = {}
    for m in metas:
        for s in m.spans:
            by_part.setdefault((s.topic, s.partition), []).append((s.first, s.last, m.roll))
    out = []
    for (topic, part), spans in sorted(by_part.items()):
        spans.sort()
        for (_a1, b1, r1), (a2, b2, r2) in pairwise(spans):
            if a2 <= b1:
                out.append((r1, r2, Span(topic, part, a2, min(b1, b2))))
    return out


def expired_rolls(
    metas: Iterable[RollMeta], *, rating_topic: str, keep_days: float, now: datetime
) -> list[str]:
    """Rating rolls whose newest event is more than ``keep_days`` before the reference
    time: the newest archived rating event, or ``now`` if that is earlier (event time, so
    a replayed or stalled stream keeps its archive; capped by the wall clock, so one event
    stamped far in the future cannot expire everything).

    The roll that holds a partition's highest offsets is always kept (it is where a
    restart resumes from); video rolls are never expired (small, and a log row of any age
    may name their videos). ``keep_days <= 0`` keeps everything.
    """
    rolls = [m for m in metas if m.topic == rating_topic]
    newest = max((m.max_ts for m in rolls if m.max_ts is not None), default=None)
    if newest is None or keep_days <= 0:
        return []
    cutoff = min(newest, now) - timedelta(days=keep_days)
    top: dict[TopicPartition, tuple[int, str]] = {}
    for m in rolls:
        for s in m.spans:
            key = (s.topic, s.partition)
            if key not in top or s.last > top[key][0]:
                top[key] = (s.last, m.roll)
    keep = {roll for _, roll in top.values()}
    return sorted(
        m.roll for m in rolls if m.roll not in keep and m.max_ts is not None and m.max_ts < cutoff
    )


def summarize(metas: Iterable[RollMeta]) -> dict[str, Any]:
    """Rolls, rows per kind, event-time range per topic and offsets per partition, from
    the rolls' metadata alone (no row is read)."""
    metas = sorted(metas, key=lambda m: m.seq)
    rows = {k: sum(m.rows.get(k, 0) for m in metas) for k in KINDS}
    topics: dict[str, dict[str, Any]] = {}
    for m in metas:
        t = topics.setdefault(m.topic, {"rolls": 0, "min_ts": None, "max_ts": None, "offsets": {}})
        t["rolls"] += 1
        if m.min_ts is not None:
            t["min_ts"] = m.min_ts if t["min_ts"] is None else min(t["min_ts"], m.min_ts)
        if m.max_ts is not None:
            t["max_ts"] = m.max_ts if t["max_ts"] is None else max(t["max_ts"], m.max_ts)
        for s in m.spans:
            p = t["offsets"].setdefault(s.partition, {"first": s.first, "last": s.last})
            p["first"], p["last"] = min(p["first"], s.first), max(p["last"], s.last)
    for t in topics.values():
        for k in ("min_ts", "max_ts"):
            t[k] = None if t[k] is None else t[k].isoformat()
        t["offsets"] = {str(p): t["offsets"][p] for p in sorted(t["offsets"])}
    return {"rolls": len(metas), "rows": rows, "topics": topics}


# ---- dedup -----------------------------------------------------------------------------------


class Dedup:
    """Per-user windows of accepted event ids, as the worker keeps them (UserState)."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self._ids: dict[str, dict[str, None]] = {}

    def seen(self, user_id: str, event_id: str) -> bool:
        ids = self._ids.get(user_id)
        return ids is not None and event_id in ids

    def accept(self, user_id: str, event_id: str) -> None:
        ids = self._ids.setdefault(user_id, {})
        ids[event_id] = None
        while len(ids) > self.window:
            del ids[next(iter(ids))]  # insertion order: the oldest goes

    def forget(self, users: Iterable[str]) -> None:
        for u in users:
            self._ids.pop(u, None)

    def __len__(self) -> int:
        return len(self._ids)


# ---- the archiver ----------------------------------------------------------------------------

Outcome = Literal["archived", "duplicate", "invalid", "behind"]


@dataclass
class Pending:
    """What one topic consumed since its last roll."""

    rows: dict[Kind, list[Row]] = field(default_factory=dict)
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> first, last
    first_row_at: float | None = None  # clock time of the first pending row

    @property
    def n_rows(self) -> int:
        return sum(len(r) for r in self.rows.values())

    def consumed(self, partition: int, offset: int) -> None:
        first, last = self.spans.get(partition, (offset, offset))
        self.spans[partition] = (min(first, offset), max(last, offset))

    def add(self, kind: Kind, row: Row, now: float) -> None:
        self.rows.setdefault(kind, []).append(row)
        if self.first_row_at is None:
            self.first_row_at = now


@dataclass(frozen=True)
class Roll:
    """Rows to write as one roll, with their metadata."""

    meta: RollMeta
    rows: dict[Kind, list[Row]]


@dataclass
class Counts:
    archived: int = 0
    duplicate: int = 0
    behind: int = 0
    invalid: dict[str, int] = field(default_factory=dict)


class Archiver:
    """Classifies consumed messages and collects each topic's pending roll.

    ``next_offsets`` (from :func:`resume_offsets`) says where the files end: a message
    below its partition's next offset is already archived (``behind``) and ignored.
    """

    def __init__(
        self,
        *,
        ratings_topic: str,
        videos_topic: str,
        dedup_window: int,
        roll_rows: int,
        roll_seconds: float,
    ) -> None:
        if roll_rows < 1 or roll_seconds <= 0:
            raise ValueError("roll_rows must be >= 1 and roll_seconds > 0")
        self.ratings_topic = ratings_topic
        self.videos_topic = videos_topic
        self.roll_rows = roll_rows
        self.roll_seconds = roll_seconds
        self.dedup = Dedup(dedup_window)
        self.next_offsets: dict[TopicPartition, int] = {}
        self.pending: dict[str, Pending] = {ratings_topic: Pending(), videos_topic: Pending()}
        self.counts = Counts()

    def reset(self) -> None:
        """Forget everything (on a rebalance: the files are read again)."""
        self.dedup = Dedup(self.dedup.window)
        self.next_offsets = {}
        self.pending = {self.ratings_topic: Pending(), self.videos_topic: Pending()}

    def restore(
        self, next_offsets: Mapping[TopicPartition, int], accepted: Iterable[tuple[str, str]]
    ) -> None:
        """Set the resume points and replay the archived (user_id, event_id) pairs, in
        offset order, into the dedup windows."""
        self.next_offsets.update(next_offsets)
        for user_id, event_id in accepted:
            if not self.dedup.seen(user_id, event_id):
                self.dedup.accept(user_id, event_id)

    def offer(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        now: float,
    ) -> tuple[Outcome, str]:
        """Handle one consumed message: its outcome, and the reason when it is invalid."""
        if offset < self.next_offsets.get((topic, partition), 0):
            self.counts.behind += 1
            return "behind", ""
        pending = self.pending[topic]
        pending.consumed(partition, offset)
        try:
            if topic == self.videos_topic:
                video = decode_video(value)
                pending.add("videos", video_row(video, partition, offset), now)
                self.counts.archived += 1
                return "archived", ""
            event = decode_rating(value)
        except DecodeError as exc:
            return self._invalid(exc.reason)
        if key is not None and key != event.user_id.encode("utf-8"):
            return self._invalid("key_mismatch")  # the worker dead-letters it too
        if self.dedup.seen(event.user_id, event.event_id):
            self.counts.duplicate += 1
            return "duplicate", ""
        self.dedup.accept(event.user_id, event.event_id)
        kind, row = rating_row(event, partition, offset)
        pending.add(kind, row, now)
        self.counts.archived += 1
        return "archived", ""

    def _invalid(self, reason: str) -> tuple[Outcome, str]:
        self.counts.invalid[reason] = self.counts.invalid.get(reason, 0) + 1
        return "invalid", reason

    def should_roll(self, topic: str, now: float) -> bool:
        """A roll is due when the topic's pending rows reach ``roll_rows`` or its oldest
        pending row is ``roll_seconds`` old. Consumed messages without rows (invalid,
        duplicate) never start a roll: their offsets join the next one."""
        p = self.pending[topic]
        if not p.rows:
            return False
        assert p.first_row_at is not None
        return p.n_rows >= self.roll_rows or now - p.first_row_at >= self.roll_seconds

    def seconds_to_roll(self, now: float) -> float | None:
        """Seconds until the earliest time-based roll, None when nothing is pending."""
        due = [
            p.first_row_at + self.roll_seconds - now
            for p in self.pending.values()
            if p.first_row_at is not None
        ]
        return max(0.0, min(due)) if due else None

    def take(self, topic: str, seq: int, at: datetime) -> Roll | None:
        """The topic's pending roll as roll number ``seq`` written at ``at`` (None when it
        has no rows); the topic starts afresh."""
        p = self.pending[topic]
        if not p.rows:
            return None
        self.pending[topic] = Pending()
        spans = tuple(
            Span(topic, part, first, last) for part, (first, last) in sorted(p.spans.items())
        )
        for s in spans:
            self.next_offsets[(topic, s.partition)] = s.last + 1
        times = [row[TIME_COLUMN[kind]] for kind, rows in p.rows.items() for row in rows]
        kinds = tuple(k for k in KINDS if k in p.rows)
        meta = RollMeta(
            roll=roll_name(seq, at),
            seq=seq,
            topic=topic,
            kinds=kinds,
            spans=spans,
            rows={k: len(p.rows[k]) for k in kinds},
            min_ts=min(times),
            max_ts=max(times),
        )
        return Roll(meta=meta, rows=p.rows)
