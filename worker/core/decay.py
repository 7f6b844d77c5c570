"""Recency decay of a user's row: older interactions weigh less.

An interaction's row value is multiplied by ``2 ** (-age / half_life)`` before it
becomes a confidence (:func:`worker.core.als.confidence`), identically in bootstrap
training (:func:`decay_matrix`) and in the live fold-in (:func:`decayed`). Its age is

* ``"items"``: the number of distinct items of the row whose last event is strictly
  later than this item's last event (so ties share an age, and the result does not
  depend on the order the row is stored in); ``half_life`` is in distinct items;
* ``"time"``: the time from this item's last event to the row's newest event, in days
  (relative to the user's own newest event, not a clock: deterministic);
* ``"none"``: no decay (factor 1).

Times are int64 microseconds since the epoch, one per row entry (its latest event).
:data:`UNKNOWN` marks an entry whose time is not known (a model or changelog record
written before times were kept): such entries count as touched at the row's oldest
known time, and a row with no known time is not decayed at all.

Every fast path here has a slow reference beside it (``*_reference``) for the tests.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

DecayMode = Literal["none", "items", "time"]
DECAYS: tuple[DecayMode, ...] = ("none", "items", "time")

#: An entry's time that is not known (see the module docstring).
UNKNOWN = int(np.iinfo(np.int64).min)
US_PER_DAY = 86_400_000_000


def ages(times: npt.ArrayLike, mode: DecayMode) -> F64:
    """Age of each row entry: distinct items touched later (``"items"``) or days before
    the newest entry (``"time"``); zeros for ``"none"``. O(n log n) for ``"items"``."""
    t = np.asarray(times, dtype=np.int64)
    n = len(t)
    known = t != UNKNOWN
    if mode == "none" or n == 0 or not known.any():
        if mode not in DECAYS:
            raise ValueError(f"unknown decay mode {mode!r}; expected one of {DECAYS}")
        return np.zeros(n, dtype=np.float64)
    if not known.all():
        t = np.where(known, t, t[known].min())
    if mode == "items":
        later = n - np.searchsorted(np.sort(t), t, side="right")
        out: F64 = later.astype(np.float64)
        return out
    if mode == "time":
        out = (t.max() - t).astype(np.float64) / US_PER_DAY
        return out
    raise ValueError(f"unknown decay mode {mode!r}; expected one of {DECAYS}")


def decay_factors(times: npt.ArrayLike, mode: DecayMode, half_life: float) -> F64:
    """``2 ** (-age / half_life)`` per entry (0 on underflow, never above 1)."""
    a = ages(times, mode)
    if mode == "none":
        return np.ones(len(a), dtype=np.float64)
    out: F64 = np.exp2(-a / float(half_life))
    return out


def decayed(values: npt.ArrayLike, times: npt.ArrayLike, mode: DecayMode, half_life: float) -> F32:
    """Row values times their decay factors, float32 (what training and fold-in use).

    The product is taken in float64 from the float32 values and rounded once, so the
    bootstrap matrix and a live row holding the same values give the same numbers.
    """
    v = np.asarray(values, dtype=np.float32)
    if mode == "none":
        return v
    out: F32 = (v.astype(np.float64) * decay_factors(times, mode, half_life)).astype(np.float32)
    return out


def decayed_rows(
    values: list[F32], times: list[I64], mode: DecayMode, half_life: float
) -> list[F32]:
    """:func:`decayed` of many rows at once, with a fixed number of numpy calls (the
    worker decays every user of a batch: per-row calls would cost more than the maths).
    Gives exactly the numbers of :func:`decayed` row by row (the same float64 ages)."""
    if mode == "none" or not values:
        return [np.asarray(v, dtype=np.float32) for v in values]
    if mode not in DECAYS:
        raise ValueError(f"unknown decay mode {mode!r}; expected one of {DECAYS}")
    lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    if lengths.sum() == 0:
        return [np.asarray(v, dtype=np.float32) for v in values]
    seg = np.repeat(np.arange(len(values)), lengths)
    t = np.concatenate(times).astype(np.int64)
    v = np.concatenate(values).astype(np.float32)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    nonempty = lengths > 0
    known = t != UNKNOWN
    # per-row oldest known time (rows with none known: no decay, age 0)
    big = np.iinfo(np.int64).max
    tk = np.where(known, t, big)
    row_min = np.full(len(values), big, dtype=np.int64)
    row_min[nonempty] = np.minimum.reduceat(tk, starts[nonempty])
    t = np.where(known, t, row_min[seg])
    none_known = row_min[seg] == big
    if mode == "items":
        _, rank = np.unique(t, return_inverse=True)
        key = seg * (int(rank.max()) + 1) + rank.reshape(-1)
        skey = np.sort(key)
        seg_end = np.cumsum(lengths)[seg]
        age = (seg_end - np.searchsorted(skey, key, side="right")).astype(np.float64)
    else:
        row_max = np.zeros(len(values), dtype=np.int64)
        row_max[nonempty] = np.maximum.reduceat(t, starts[nonempty])
        age = (row_max[seg] - t).astype(np.float64) / US_PER_DAY
    age = np.where(none_known, 0.0, age)
    out = (v.astype(np.float64) * np.exp2(-age / float(half_life))).astype(np.float32)
    return np.split(out, np.cumsum(lengths)[:-1])


def decay_matrix(
    matrix: sp.csr_matrix, times: I64 | None, mode: DecayMode, half_life: float
) -> sp.csr_matrix:
    """The users × items value matrix with every row decayed (:func:`decayed`).

    ``times`` is aligned with ``matrix.data`` (``None``: no entry's time is known, no
    decay). Entries that decay to exactly 0 (underflow) are dropped, as the live row
    drops zero values, so training and fold-in see the same rows.
    """
    if mode == "none" or times is None:
        return matrix
    csr = matrix.tocsr(copy=True)
    data = csr.data.astype(np.float32)
    for u in range(csr.shape[0]):
        lo, hi = int(csr.indptr[u]), int(csr.indptr[u + 1])
        if hi > lo:
            data[lo:hi] = decayed(data[lo:hi], times[lo:hi], mode, half_life)
    csr.data = data
    csr.eliminate_zeros()
    return csr


def decayed_reference(
    values: npt.ArrayLike, times: npt.ArrayLike, mode: DecayMode, half_life: float
) -> F32:
    """Slow reference of :func:`decayed`: the definition, entry by entry."""
    vals = [float(x) for x in np.asarray(values, dtype=np.float32)]
    ts = [int(x) for x in np.asarray(times, dtype=np.int64)]
    if mode == "none":
        return np.array(vals, dtype=np.float32)
    known = [x for x in ts if x != UNKNOWN]
    if not known:
        return np.array(vals, dtype=np.float32)
    ts = [x if x != UNKNOWN else min(known) for x in ts]
    out = []
    for v, t in zip(vals, ts, strict=True):
        if mode == "items":
            age = float(len({j for j, s in enumerate(ts) if s > t}))
        else:
            age = (max(ts) - t) / US_PER_DAY
        out.append(v * 2.0 ** (-age / half_life))
    return np.array(out, dtype=np.float32)
