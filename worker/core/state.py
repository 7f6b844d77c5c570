"""Per-user state: the interaction row, its folded-in factors, and dedup memory.

The row is the user's full history as one value per video (see
:mod:`worker.core.scoring`); fold-in always refits from the full row, never
from a delta. The state also remembers the last source offset it reflects, so
that a restore from the changelog can skip events that were already applied.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.core.decay import UNKNOWN

F32 = npt.NDArray[np.float32]

#: Event ids remembered per user for deduplication of app retries. Retries come
#: within seconds; 1,000 ids cover far more than one user's retry window.
DEFAULT_DEDUP_WINDOW = 1000


@dataclass(slots=True)
class UserState:
    """One user's live state inside a worker.

    Kept to one object the cyclic garbage collector tracks: the row (int -> float)
    and the recent ids (str -> None, insertion-ordered) are plain dicts of atomic
    values, which CPython leaves untracked. A worker holding a million users then
    does not pay for them in every full collection.
    """

    row: dict[int, float] = field(default_factory=dict)  # item_idx -> value
    factors: F32 | None = None  # None: must be folded in before scoring
    events_applied: int = 0
    recent_ids: dict[str, None] = field(default_factory=dict)  # oldest first
    partition: int = -1
    offset: int = -1  # last applied source offset in ``partition``
    # item_idx -> time (µs) of the latest event on it, for recency decay; an item missing
    # here has an unknown time (see worker.core.decay.UNKNOWN). Kept for every model, so
    # that a model swap to one with decay finds the times.
    touched: dict[int, int] = field(default_factory=dict)
    # item_idx -> the pair's state (:func:`pair_flags`: last reaction and whether a view
    # reached positive_fraction), for every pair with an event since the state began (not
    # the bootstrap row's pairs, whose state is unknown: the model's popularity counts them).
    pairs: dict[int, int] = field(default_factory=dict)
    # item_idx -> when the pair became positive (µs), for the positive pairs among ``pairs``.
    since: dict[int, int] = field(default_factory=dict)

    def seen(self, event_id: str) -> bool:
        return event_id in self.recent_ids

    def remember(self, event_id: str, window: int) -> None:
        ids = self.recent_ids
        ids[event_id] = None
        while len(ids) > window:
            del ids[next(iter(ids))]  # dicts keep insertion order: the oldest goes

    def has_positive(self) -> bool:
        return any(v > 0 for v in self.row.values())

    def to_record(self, video_id_of: Any) -> dict[str, Any]:
        """A JSON-ready snapshot, with videos by id (item indices differ across workers)."""
        items = list(self.row.items())
        return {
            "v": 4,
            "videos": [video_id_of(i) for i, _ in items],
            "values": [float(x) for _, x in items],
            "events_applied": self.events_applied,
            "recent_ids": list(self.recent_ids),
            "partition": self.partition,
            "offset": self.offset,
            "times": [self.touched.get(i, UNKNOWN) for i, _ in items],
            "pairs": [self.pairs.get(i, NO_PAIR) for i, _ in items],
            "since": [self.since.get(i, UNKNOWN) for i, _ in items],
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], item_idx_of: Any) -> UserState:
        idx = [int(item_idx_of(v)) for v in record["videos"]]
        row = dict(zip(idx, (float(x) for x in record["values"]), strict=True))
        # Records before version 3 carry no times: every entry's is unknown (decay then
        # treats the history as touched together, at its oldest known time).
        times = record.get("times") or [UNKNOWN] * len(idx)
        touched = {i: int(t) for i, t in zip(idx, times, strict=True) if int(t) != UNKNOWN}
        # Records before version 4 carry no pair states: every pair's is unknown, and a
        # pair with an unknown state counts as one without events (not positive) until its
        # next event. Popularity then counts it from the event that makes it positive.
        flags = record.get("pairs") or [NO_PAIR] * len(idx)
        since = record.get("since") or [UNKNOWN] * len(idx)
        return cls(
            touched=touched,
            pairs={i: int(f) for i, f in zip(idx, flags, strict=True) if int(f) != NO_PAIR},
            since={i: int(t) for i, t in zip(idx, since, strict=True) if int(t) != UNKNOWN},
            row=row,
            factors=None,
            events_applied=int(record["events_applied"]),
            recent_ids=dict.fromkeys(str(e) for e in record["recent_ids"]),
            partition=int(record["partition"]),
            offset=int(record["offset"]),
        )


#: ``pairs`` flag of a row entry without a pair state (bootstrap rows, older records).
NO_PAIR = -1
_REACTIONS = (None, "like", "neutral", "dislike")


def pair_flags(reaction: str | None, reached: bool) -> int:
    """A pair state (:class:`worker.core.scoring.PairState`) as a small int:
    ``reaction code << 1 | reached`` (codes: none 0, like 1, neutral 2, dislike 3)."""
    return _REACTIONS.index(reaction) << 1 | int(reached)


def pair_of_flags(flags: int) -> tuple[str | None, bool]:
    """The inverse of :func:`pair_flags`: ``(reaction, reached)``."""
    return _REACTIONS[flags >> 1], bool(flags & 1)


# Changelog value layout (version 4): a fixed header, the row values as float64, the
# row's latest event times as int64 µs (UNKNOWN: not known), the row's pair states as
# int8 (NO_PAIR: none) and the times they became positive as int64 µs (UNKNOWN: not
# positive), then the row's video ids and the recent event ids, each joined by NUL. Wire
# ids are validated to hold no control characters, so NUL never occurs inside one.
# Version 3 (no pair states), version 2 (no times either) and version 1 (compact JSON, a
# value starting with ``{``) are still read; what they lack is unknown.
_MAGIC = b"RF\x04"
_MAGIC_V3 = b"RF\x03"
_MAGIC_V2 = b"RF\x02"
_HEAD = struct.Struct("<3sqiqII")  # magic, events_applied, partition, offset, n_items, ids_len
_SEP = "\x00"


class RecordError(ValueError):
    """A changelog value that is not a valid state record."""


def encode_state(state: UserState, video_id_of: Any) -> bytes:
    """A user's state as a compact binary changelog value (see :func:`decode_record`)."""
    return _pack(
        state.events_applied,
        state.partition,
        state.offset,
        [video_id_of(i) for i in state.row],
        state.row.values(),
        state.recent_ids,
        [state.touched.get(i, UNKNOWN) for i in state.row],
        [state.pairs.get(i, NO_PAIR) for i in state.row],
        [state.since.get(i, UNKNOWN) for i in state.row],
    )


def encode_record(record: dict[str, Any]) -> bytes:
    """A state record (as :meth:`UserState.to_record` gives) as a changelog value."""
    return _pack(
        int(record["events_applied"]),
        int(record["partition"]),
        int(record["offset"]),
        record["videos"],
        record["values"],
        record["recent_ids"],
        record.get("times") or [UNKNOWN] * len(record["videos"]),
        record.get("pairs") or [NO_PAIR] * len(record["videos"]),
        record.get("since") or [UNKNOWN] * len(record["videos"]),
    )


def _pack(
    applied: int,
    partition: int,
    offset: int,
    videos: Sequence[str],
    values: Iterable[float],
    recent: Iterable[str],
    times: Sequence[int],
    pairs: Sequence[int],
    since: Sequence[int],
) -> bytes:
    n = len(videos)
    video_bytes = _SEP.join(videos).encode("utf-8")
    head = _HEAD.pack(_MAGIC, applied, partition, offset, n, len(video_bytes))
    return b"".join(
        (
            head,
            struct.pack(f"<{n}d", *values),
            struct.pack(f"<{n}q", *times),
            struct.pack(f"<{n}b", *pairs),
            struct.pack(f"<{n}q", *since),
            video_bytes,
            _SEP.join(recent).encode("utf-8"),
        )
    )


def decode_record(raw: bytes) -> dict[str, Any]:
    """A changelog value as a state record dict; reads both the binary and the JSON form."""
    if raw[:1] == b"{":
        record: dict[str, Any] = json.loads(raw)
        return record
    try:
        magic, applied, partition, offset, n, ids_len = _HEAD.unpack_from(raw)
        if magic not in (_MAGIC, _MAGIC_V3, _MAGIC_V2):
            raise RecordError(f"unknown state record version {magic!r}")
        at = _HEAD.size
        values = list(struct.unpack_from(f"<{n}d", raw, at))
        at += 8 * n
        times = [UNKNOWN] * n
        pairs = [NO_PAIR] * n
        since = [UNKNOWN] * n
        if magic in (_MAGIC, _MAGIC_V3):
            times = list(struct.unpack_from(f"<{n}q", raw, at))
            at += 8 * n
        if magic == _MAGIC:
            pairs = list(struct.unpack_from(f"<{n}b", raw, at))
            at += n
            since = list(struct.unpack_from(f"<{n}q", raw, at))
            at += 8 * n
        videos = raw[at : at + ids_len].decode("utf-8").split(_SEP) if n else []
        tail = raw[at + ids_len :]
        recent = tail.decode("utf-8").split(_SEP) if tail else []
    except (struct.error, UnicodeDecodeError) as exc:
        raise RecordError(f"corrupt state record: {exc}") from exc
    if len(videos) != n or at + ids_len > len(raw):
        raise RecordError("corrupt state record: lengths do not match")
    return {
        "v": {_MAGIC: 4, _MAGIC_V3: 3, _MAGIC_V2: 2}[magic],
        "videos": videos,
        "values": values,
        "events_applied": applied,
        "recent_ids": recent,
        "partition": partition,
        "offset": offset,
        "times": times,
        "pairs": pairs,
        "since": since,
    }
