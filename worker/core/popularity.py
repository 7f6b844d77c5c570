"""Live popularity: a time-decayed count of positive events per video.

Each positive event at time ``t`` contributes ``2 ** -((now - t) / half_life)`` to its
video's count at time ``now``. Instead of decaying every count as time passes, counts are
held scaled to a reference time ``t_ref``: an event adds ``2 ** ((t - t_ref) / half_life)``
and a read at ``now`` multiplies by ``2 ** ((t_ref - now) / half_life)``. That is O(1) per
event, and the ranking at any instant equals the decayed ranking. ``t_ref`` moves forward
(and the counts are rescaled) before the scale factors could overflow.

``half_life_s = 0`` means no decay: a plain count of positive events.

This is the definition the replay's ``popularity`` baseline uses, the values the item
owners share with every worker, and what cold-start lists and the ranking blend read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.errors import DecodeError

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_US = 1_000_000
# Rescale when an exponent passes this: 2**60 ~ 1e18 keeps float64 counts far from overflow
# and far from losing the small ones in sums with large ones (53-bit mantissa, relative).
_RESCALE_EXPONENT = 60.0
#: A count below this share of one pair's weight after a removal is rounding error.
_RESIDUE = 1e-6


def _exp2(x: F64 | float) -> float:
    """``2 ** x`` as a float: 0 where it underflows, the largest float where it overflows
    (a read far before the reference time), never an exception."""
    with np.errstate(over="ignore", under="ignore"):
        return float(min(np.exp2(float(x)), np.finfo(np.float64).max))


def _exp2_array(x: F64 | float) -> F64:
    with np.errstate(over="ignore", under="ignore"):
        out: F64 = np.minimum(np.exp2(x), np.finfo(np.float64).max)
        return out


class LivePopularity:
    """Decayed positive-event counts per item index, growable as videos are added."""

    def __init__(self, n_items: int, *, half_life_s: float, t_ref_us: int = 0) -> None:
        if half_life_s < 0:
            raise ValueError(f"half_life_s must be >= 0, got {half_life_s}")
        # Whole microseconds, so that ``t_ref`` and the owners' as-of times sit on one grid
        # of whole half-lives: rescaling by a whole number of half-lives is a multiplication
        # by a power of two, exact in float64, so every worker holds the same bits.
        self.half_life_us = float(half_life_us_of(half_life_s))
        self.t_ref_us = int(t_ref_us)
        self._scaled = np.zeros(max(16, n_items), dtype=np.float64)
        self.n_items = n_items

    # ---- write side ------------------------------------------------------------------------

    def grow(self, n_items: int) -> None:
        """Make room for item indices below ``n_items`` (new videos start at 0)."""
        if n_items > len(self._scaled):
            out = np.zeros(max(n_items, 2 * len(self._scaled)), dtype=np.float64)
            out[: len(self._scaled)] = self._scaled
            self._scaled = out
        self.n_items = max(self.n_items, n_items)

    def _exponent(self, ts_us: int | I64) -> F64 | float:
        if self.half_life_us == 0:
            return 0.0
        return (np.asarray(ts_us, dtype=np.float64) - self.t_ref_us) / self.half_life_us

    def _rebase(self, ts_us: int) -> None:
        """Move ``t_ref`` forward to ``ts_us`` when its exponent would pass the rescale bound.

        Only forward: an event far older than ``t_ref`` has a weight that underflows towards
        0 (it has decayed away), which is the right value, while moving ``t_ref`` back would
        scale every newer count up past float range."""
        if self.half_life_us == 0:
            return
        x = (ts_us - self.t_ref_us) / self.half_life_us
        if x > _RESCALE_EXPONENT:
            # On the grid of whole half-lives (see __init__): the factor is a power of two.
            hl = int(self.half_life_us)
            t_new = int(ts_us) - int(ts_us) % hl
            self._scaled *= _exp2(-((t_new - self.t_ref_us) // hl))
            self.t_ref_us = t_new

    def add(self, item: int, ts_us: int, weight: float = 1.0) -> None:
        """Count one positive event on ``item`` at ``ts_us``."""
        self.grow(item + 1)
        self._rebase(ts_us)
        self._scaled[item] += weight * _exp2(self._exponent(ts_us))

    def remove(self, item: int, since_us: int) -> None:
        """Take back a positive pair counted at ``since_us`` (a later reaction made it
        negative: :class:`worker.core.scoring.PairState`). A count left with nothing but
        rounding error is 0, so the video leaves :meth:`order`."""
        self.grow(item + 1)
        amount = _exp2(self._exponent(since_us))
        left = self._scaled[item] - amount
        # Below a millionth of one pair's weight is float residue of adds and removes.
        self._scaled[item] = left if left > _RESIDUE * amount else 0.0

    def add_many(self, items: I64, ts_us: I64) -> None:
        """Count positive events (vectorised :meth:`add` with weight 1)."""
        if len(items) == 0:
            return
        self.grow(int(np.max(items)) + 1)
        self._rebase(int(np.max(ts_us)))
        np.add.at(self._scaled, items, _exp2_array(self._exponent(ts_us)))

    def set(self, item: int, value: float, asof_us: int) -> None:
        """Install a count shared by the video's owner: ``value`` decayed to ``asof_us``."""
        self.grow(item + 1)
        self._rebase(asof_us)
        self._scaled[item] = value * _exp2(self._exponent(asof_us))

    def seed(self, values: F64, asof_us: int) -> None:
        """Install counts for items ``0 .. len(values) - 1`` as of ``asof_us`` (replacing
        theirs): the model's popularity when a worker starts or swaps models."""
        n = len(values)
        self.grow(n)
        self._rebase(asof_us)
        self._scaled[:n] = np.asarray(values, dtype=np.float64) * _exp2(self._exponent(asof_us))

    # ---- read side -------------------------------------------------------------------------

    def value(self, item: int, now_us: int) -> float:
        """The decayed count of ``item`` at ``now_us``."""
        if item >= self.n_items:
            return 0.0
        return float(self._scaled[item] * _exp2(-self._exponent(now_us)))

    def values(self, now_us: int) -> F64:
        """Decayed counts of every item at ``now_us`` (a new array)."""
        out: F64 = self._scaled[: self.n_items] * _exp2(-self._exponent(now_us))
        return out

    def order(self) -> I64:
        """Items with a positive count, most popular first (ties by index); time-invariant."""
        scaled = self._scaled[: self.n_items]
        eligible = np.flatnonzero(scaled > 0)
        out: I64 = eligible[np.argsort(-scaled[eligible], kind="stable")].astype(np.int64)
        return out


def half_life_us_of(half_life_s: float) -> int:
    """The half-life in whole microseconds (0: no decay)."""
    return round(float(half_life_s) * _US)


def decayed_counts_reference(
    items: list[int], ts_us: list[int], n_items: int, *, half_life_s: float, now_us: int
) -> F64:
    """Obviously correct decayed counts: sum ``2 ** -((now - t) / half_life)`` per event."""
    out = np.zeros(n_items, dtype=np.float64)
    for i, t in zip(items, ts_us, strict=True):
        out[i] += 1.0 if half_life_s == 0 else 2.0 ** (-(now_us - t) / (half_life_s * _US))
    return out


# ---- shared popularity: records and the owner ------------------------------------------------
#
# Every worker sends, for each (user, video) pair whose positivity or ``since`` changed, a
# :class:`PopularityPair` keyed ``(video, user)`` on the partition of the video
# (:func:`worker.core.items.contribution_partition`) of a compacted topic; a pair that is
# not positive is a tombstone. The owner of the partition keeps each owned video's positive
# pairs ``{user: since}`` (:class:`PopularityOwner`) and publishes the video's decayed count
# as a :class:`PopularityUpdate`. A pair is a *state*: the latest record per key wins, so a
# record sent twice or re-read after a rebalance changes nothing.
#
# Exactness: a pair's weight ``2 ** ((since - 0) / half_life)`` is held exactly as an
# integer mantissa times a power of two (:func:`pair_weight`), and a video's count as the
# exact integer sum of its pairs' weights. Adding and removing are then exact inverses, and
# the count is a function of the set of pairs alone, whatever order they arrived in: a
# rebuilt owner publishes the same bits as the one that kept the count incrementally.

_FORMAT = 1
#: Bits of the mantissa of a pair weight in [1, 2): float64 has 52 after the point.
_MANTISSA_BITS = 52


def pair_weight(since_us: int, half_life_us: int) -> tuple[int, int]:
    """``(m, q)`` with ``2 ** (since / half_life) == m * 2 ** (q - 52)`` up to the one
    rounding of the fractional part's ``exp2`` (``m`` is an integer below ``2 ** 53``).

    ``q`` counts whole half-lives since the epoch (exact, integer division) and ``m`` is
    ``exp2`` of the remaining fraction scaled to an integer; half-life 0 weighs 1."""
    if half_life_us <= 0:
        return 1 << _MANTISSA_BITS, 0
    q, r = divmod(int(since_us), half_life_us)
    m = math.ldexp(math.exp2(r / half_life_us), _MANTISSA_BITS)  # in [2**52, 2**53]: exact
    return int(m), q


@dataclass(frozen=True, slots=True)
class PopularityPair:
    """One (user, video) pair's part in the video's popularity: the time it became
    positive, or None (a tombstone on the wire) when it is not positive."""

    video_id: str
    user_id: str
    since_us: int | None

    def key(self) -> bytes:
        """Compaction key: only the latest record per ``(video, user)`` counts."""
        return json.dumps([self.video_id, self.user_id]).encode("utf-8")

    def encode(self) -> bytes | None:
        """The record value; None (a tombstone) for a pair that is not positive."""
        if self.since_us is None:
            return None
        return json.dumps({"v": _FORMAT, "since_us": self.since_us}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, key: bytes | None, value: bytes | None) -> PopularityPair:
        try:
            video_id, user_id = json.loads(key or b"")
            if not isinstance(video_id, str) or not isinstance(user_id, str):
                raise TypeError("key is not [video_id, user_id]")
        except (ValueError, TypeError) as exc:
            raise DecodeError("bad_popularity_pair", f"popularity pair key: {exc!r}") from exc
        if value is None:
            return cls(video_id, user_id, None)
        doc = _load(value, "popularity pair")
        since = doc.get("since_us")
        if type(since) is not int:
            raise DecodeError("bad_popularity_pair", "popularity pair: since_us is not an integer")
        return cls(video_id, user_id, since)


@dataclass(frozen=True, slots=True)
class PopularityUpdate:
    """A video's decayed count as its owner publishes it: ``value`` as of ``asof_us`` (a
    whole number of half-lives since the epoch), over ``pairs`` positive pairs."""

    video_id: str
    value: float
    asof_us: int
    seq: int  # per video, increasing with each publish of the same owner lineage
    pairs: int

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": _FORMAT,
                "video_id": self.video_id,
                "value": self.value.hex(),  # exact bits
                "asof_us": self.asof_us,
                "seq": self.seq,
                "pairs": self.pairs,
            },
            separators=(",", ":"),
        ).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes | None) -> PopularityUpdate:
        doc = _load(raw, "popularity update")
        try:
            value = float.fromhex(str(doc["value"]))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"value {value!r} is not a finite count")
            return cls(
                video_id=str(doc["video_id"]),
                value=value,
                asof_us=_int(doc["asof_us"]),
                seq=_int(doc["seq"]),
                pairs=_int(doc["pairs"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise DecodeError("bad_popularity_update", f"popularity update: {exc!r}") from exc


def _int(x: Any) -> int:
    if type(x) is not int:
        raise TypeError(f"{x!r} is not an integer")
    return x


def _load(raw: bytes | None, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw or b"")
    except ValueError as exc:
        raise DecodeError("bad_json", f"{what}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("v") != _FORMAT:
        raise DecodeError("bad_format", f"{what}: not a version-{_FORMAT} object")
    return doc


@dataclass(slots=True)
class _OwnedCount:
    """One owned video: its positive pairs and the exact sum of their weights,
    ``total * 2 ** (base - 52)``."""

    pairs: dict[str, int] = field(default_factory=dict)  # user -> since (µs)
    total: int = 0
    base: int = 0  # the lowest whole-half-life exponent ``total`` is held in
    top: int = 0  # the highest exponent of a pair seen (the as-of of what is published)
    seq: int = 0
    dirty: bool = False

    def shift(self, q: int, m: int, sign: int) -> None:
        if not self.pairs and self.total == 0:
            self.base = self.top = q
        if q < self.base:
            self.total <<= self.base - q
            self.base = q
        self.top = max(self.top, q)
        self.total += sign * (m << (q - self.base))


class PopularityOwner:
    """The owner side of shared popularity: positive pairs per owned video, exact counts."""

    def __init__(self, *, half_life_s: float) -> None:
        self.half_life_us = half_life_us_of(half_life_s)
        self.videos: dict[str, _OwnedCount] = {}
        self._seq_seen: dict[str, int] = {}

    def apply(self, pair: PopularityPair) -> bool:
        """Take one pair's latest state; True when the video's count changed."""
        video = self.videos.get(pair.video_id)
        old = None if video is None else video.pairs.get(pair.user_id)
        if old == pair.since_us:
            return False  # a replay or a re-read: nothing changes
        if video is None:
            video = self.videos[pair.video_id] = _OwnedCount(
                seq=self._seq_seen.get(pair.video_id, 0)
            )
        if old is not None:
            m, q = pair_weight(old, self.half_life_us)
            video.shift(q, m, -1)
            del video.pairs[pair.user_id]
        if pair.since_us is not None:
            m, q = pair_weight(pair.since_us, self.half_life_us)
            video.shift(q, m, +1)
            video.pairs[pair.user_id] = pair.since_us
        video.dirty = True
        return True

    def value(self, video_id: str) -> tuple[float, int]:
        """``(count, asof_us)``: the video's decayed count at ``asof_us``, correctly rounded
        from the exact sum (so it depends on the set of pairs only, up to the power of two
        the as-of time scales it by)."""
        video = self.videos.get(video_id)
        if video is None or video.total == 0:
            return 0.0, 0
        if self.half_life_us == 0:
            return float(video.total >> _MANTISSA_BITS), 0
        top = video.top + 1  # every weight is below 2 ** (top - 1 + 1): the value is < pairs
        # value = total * 2 ** (base - 52 - top), one correctly rounded int division.
        shift = video.base - _MANTISSA_BITS - top
        value = video.total * (1 << shift) if shift >= 0 else video.total / (1 << -shift)
        return float(value), top * self.half_life_us

    def saw_update(self, update: PopularityUpdate) -> None:
        """Note a published seq (from any owner), so a new owner's seqs continue it."""
        seen = max(self._seq_seen.get(update.video_id, 0), update.seq)
        self._seq_seen[update.video_id] = seen
        video = self.videos.get(update.video_id)
        if video is not None:
            video.seq = max(video.seq, seen)

    def updates(self, video_ids: Iterable[str] | None = None) -> list[PopularityUpdate]:
        """The counts changed since the last call (or of ``video_ids``), next seq each."""
        chosen = (
            [v for v, st in self.videos.items() if st.dirty]
            if video_ids is None
            else [v for v in video_ids if v in self.videos]
        )
        out: list[PopularityUpdate] = []
        for vid in sorted(chosen):
            st = self.videos[vid]
            st.dirty = False
            st.seq += 1
            self._seq_seen[vid] = st.seq
            value, asof = self.value(vid)
            out.append(PopularityUpdate(vid, value, asof, st.seq, len(st.pairs)))
            if not st.pairs:  # published as 0; nothing left to keep
                del self.videos[vid]
        return out

    def drop(self, keep: Callable[[str], bool]) -> int:
        """Forget every video for which ``keep(video_id)`` is false (partitions revoked)."""
        gone = [v for v in self.videos if not keep(v)]
        for v in gone:
            del self.videos[v]
        return len(gone)

    @property
    def pairs(self) -> int:
        return sum(len(v.pairs) for v in self.videos.values())


def owner_counts_reference(
    pairs: Iterable[tuple[str, int]], *, half_life_s: float, now_us: int
) -> dict[str, float]:
    """Obviously correct shared counts: per video, ``sum 2 ** -((now - since) / half_life)``
    over its positive pairs ``(video_id, since_us)``, with :func:`math.fsum`."""
    hl = half_life_us_of(half_life_s)
    by_video: dict[str, list[float]] = {}
    for video, since in pairs:
        w = 1.0 if hl == 0 else 2.0 ** (-(now_us - since) / hl)
        by_video.setdefault(video, []).append(w)
    return {v: math.fsum(ws) for v, ws in by_video.items()}
