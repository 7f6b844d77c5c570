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
            "v": 3,
            "videos": [video_id_of(i) for i, _ in items],
            "values": [float(x) for _, x in items],
            "events_applied": self.events_applied,
            "recent_ids": list(self.recent_ids),
            "partition": self.partition,
            "offset": self.offset,
            "times": [self.touched.get(i, UNKNOWN) for i, _ in items],
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], item_idx_of: Any) -> UserState:
        idx = [int(item_idx_of(v)) for v in record["videos"]]
        row = dict(zip(idx, (float(x) for x in record["values"]), strict=True))
        # Records before version 3 carry no times: every entry's is unknown (decay then
        # treats the history as touched together, at its oldest known time).
        times = record.get("times") or [UNKNOWN] * len(idx)
        touched = {i: int(t) for i, t in zip(idx, times, strict=True) if int(t) != UNKNOWN}
        return cls(
            touched=touched,
            row=row,
            factors=None,
            events_applied=int(record["events_applied"]),
            recent_ids=dict.fromkeys(str(e) for e in record["recent_ids"]),
            partition=int(record["partition"]),
            offset=int(record["offset"]),
        )


# Changelog value layout (version 3): a fixed header, the row values as float64, the
# row's latest event times as int64 µs (UNKNOWN: not known), then the row's video ids
# and the recent event ids, each joined by NUL. Wire ids are validated to hold no
# control characters, so NUL never occurs inside one. Version 2 (no times) and version
# 1 (compact JSON, a value starting with ``{``) are still read; their entries' times
# are unknown.
_MAGIC = b"RF\x03"
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
    )


def _pack(
    applied: int,
    partition: int,
    offset: int,
    videos: Sequence[str],
    values: Iterable[float],
    recent: Iterable[str],
    times: Sequence[int],
) -> bytes:
    n = len(videos)
    video_bytes = _SEP.join(videos).encode("utf-8")
    head = _HEAD.pack(_MAGIC, applied, partition, offset, n, len(video_bytes))
    return b"".join(
        (
            head,
            struct.pack(f"<{n}d", *values),
            struct.pack(f"<{n}q", *times),
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
        if magic not in (_MAGIC, _MAGIC_V2):
            raise RecordError(f"unknown state record version {magic!r}")
        at = _HEAD.size
        values = list(struct.unpack_from(f"<{n}d", raw, at))
        at += 8 * n
        times = [UNKNOWN] * n
        if magic == _MAGIC:
            times = list(struct.unpack_from(f"<{n}q", raw, at))
            at += 8 * n
        videos = raw[at : at + ids_len].decode("utf-8").split(_SEP) if n else []
        tail = raw[at + ids_len :]
        recent = tail.decode("utf-8").split(_SEP) if tail else []
    except (struct.error, UnicodeDecodeError) as exc:
        raise RecordError(f"corrupt state record: {exc}") from exc
    if len(videos) != n or at + ids_len > len(raw):
        raise RecordError("corrupt state record: lengths do not match")
    return {
        "v": 3 if magic == _MAGIC else 2,
        "videos": videos,
        "values": values,
        "events_applied": applied,
        "recent_ids": recent,
        "partition": partition,
        "offset": offset,
        "times": times,
    }
