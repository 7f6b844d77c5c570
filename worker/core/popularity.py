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

import numpy as np
import numpy.typing as npt

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
        self.half_life_us = float(half_life_s) * _US
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
            self._scaled *= _exp2(-x)
            self.t_ref_us = int(ts_us)

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


def decayed_counts_reference(
    items: list[int], ts_us: list[int], n_items: int, *, half_life_s: float, now_us: int
) -> F64:
    """Obviously correct decayed counts: sum ``2 ** -((now - t) / half_life)`` per event."""
    out = np.zeros(n_items, dtype=np.float64)
    for i, t in zip(items, ts_us, strict=True):
        out[i] += 1.0 if half_life_s == 0 else 2.0 ** (-(now_us - t) / (half_life_s * _US))
    return out
