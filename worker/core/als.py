"""ALS model math: exact fold-in of user (or item) factors and batched top-k.

Fold-in solves, for every touched user ``u`` with row ``r_u`` and confidence
``c`` (:func:`confidence`: ``alpha * r_u`` in the ``"implicit"`` mode,
``sign(r_u) * (1 + alpha * |r_u|)`` in the ``"one_plus"`` mode), the ALS normal
equations exactly as implicit's ``recalculate_user`` (``_als._least_squares``) does::

    A_u = YᵀY + λI + Σ_{i∈row} (|c_ui| − 1) y_i y_iᵀ
    b_u = Σ_{i∈row, c_ui>0} c_ui y_i
    x_u = A_u⁻¹ b_u

A negative value is a dislike: it adds confidence that ``p_ui = 0``.

Each fast path has a slow, obviously correct reference beside it
(``*_reference``), and the tests compare the two.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]

#: A sparse row: (column indices, values).
Row = tuple[npt.NDArray[np.integer], npt.NDArray[np.floating]]

#: How a row value becomes a confidence. ``"implicit"``: ``c = alpha * v`` (implicit's own
#: convention; an observed item with ``alpha * v < 1`` then weighs *less* than an unobserved
#: one, weight ``|c| - 1 < 0``). ``"one_plus"``: ``c = sign(v) * (1 + alpha * |v|)``, so every
#: observed item weighs at least as much as an unobserved one (Hu, Koren & Volinsky).
Confidence = Literal["implicit", "one_plus"]
CONFIDENCES: tuple[Confidence, ...] = ("implicit", "one_plus")


def confidence(
    values: npt.NDArray[np.floating], alpha: float, mode: Confidence = "implicit"
) -> npt.NDArray[np.float64]:
    """Signed confidences of row values (positive: preference 1, negative: preference 0).

    A value of 0 (padding) stays 0 in both modes. implicit, given these confidences as
    its matrix and ``alpha = 1``, solves the same normal equations as :func:`fold_in`.
    """
    v = np.asarray(values, dtype=np.float64)
    if mode == "implicit":
        out: npt.NDArray[np.float64] = alpha * v
        return out
    if mode == "one_plus":
        out = np.sign(v) * (1.0 + alpha * np.abs(v))
        return out
    raise ValueError(f"unknown confidence mode {mode!r}; expected one of {CONFIDENCES}")


# Rows are padded to the longest row of a group; grouping rows of similar length
# keeps the padding (and so the wasted multiply-adds) small.
_FOLD_GROUP = 64


def gramian(factors: F32) -> F32:
    """``FᵀF`` in float64 accumulation, returned as float32 (as implicit caches YtY)."""
    f64 = factors.astype(np.float64, copy=False)
    return (f64.T @ f64).astype(np.float32)


def fold_in(
    factors: F32,
    gram: F32,
    rows: Sequence[Row],
    *,
    regularization: float,
    alpha: float,
    confidence_mode: Confidence = "implicit",
) -> F32:
    """Exact ALS solve for each row against fixed ``factors``; batched solves.

    ``factors`` are the fixed side (item factors for a user fold-in), ``gram`` is
    ``factorsᵀ factors``. Returns one factor vector per row, float32.

    ``A_u = B + Y_uᵀ W_u Y_u`` with ``B = YᵀY + λI`` shared by every user, and a
    row of ``n`` videos changes ``B`` by rank ``n`` only. Short rows (``n < f``)
    are therefore solved through the Woodbury identity: an ``n × n`` system per
    user instead of ``f × f``. Long rows take the direct ``f × f`` solve. Both
    are exact, in float64; the tests hold them to ``np.linalg.solve``.
    """
    n = len(rows)
    f = factors.shape[1]
    out = np.zeros((n, f), dtype=np.float32)
    if n == 0:
        return out
    lengths = np.fromiter((len(r[0]) for r in rows), dtype=np.int64, count=n)
    order = np.argsort(lengths, kind="stable")
    base, base_inv = _normal_base(gram.tobytes(), f, float(regularization))
    for group in _length_groups(lengths[order], order, f):
        width = max(int(lengths[group].max()), 1)
        g = len(group)
        idx = np.zeros((g, width), dtype=np.int64)
        conf = np.zeros((g, width), dtype=np.float64)
        for j, u in enumerate(group):
            cols, vals = rows[u]
            m = len(cols)
            idx[j, :m] = cols
            conf[j, :m] = vals
        conf = confidence(conf, alpha, confidence_mode)
        y = factors[idx].astype(np.float64)  # (g, width, f); padding has conf 0 -> weight 0
        pad = np.arange(width)[None, :] >= lengths[group][:, None]
        weight = np.where(pad, 0.0, np.abs(conf) - 1.0)
        cpos = np.where(conf > 0, conf, 0.0)
        if width < f:
            out[group] = _solve_low_rank(base_inv, y, weight, cpos).astype(np.float32)
        else:
            # Σ w_i y_i y_iᵀ and Σ c_i y_i as batched matrix products (BLAS).
            a = base[None, :, :] + np.matmul((y * weight[:, :, None]).transpose(0, 2, 1), y)
            b = np.matmul(cpos[:, None, :], y)[:, 0, :]
            out[group] = np.linalg.solve(a, b[:, :, None])[:, :, 0].astype(np.float32)
    return out


@functools.lru_cache(maxsize=8)
def _normal_base(
    gram_bytes: bytes, f: int, regularization: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """``B = YᵀY + λI`` and its inverse, cached: the gramian changes far less often than
    fold-ins run (never for an item-side fold-in, only on item refits for a user one)."""
    gram = np.frombuffer(gram_bytes, dtype=np.float32).reshape(f, f)
    base = gram.astype(np.float64) + regularization * np.eye(f)
    inv: npt.NDArray[np.float64] = np.linalg.inv(base).astype(np.float64)
    base.setflags(write=False)
    inv.setflags(write=False)
    return base, inv


def _length_groups(sorted_lengths: I64, order: I64, f: int) -> list[I64]:
    """Split rows (sorted by length) into groups padded to a common width.

    A group holds at most ``_FOLD_GROUP`` rows and never mixes rows shorter than
    ``f`` (low-rank solve) with longer ones (direct solve). It also ends where
    padding every row to the next row's length would waste more than
    ``_PAD_BUDGET`` row slots: about what one more group's fixed cost buys. So a
    small batch stays one or two groups, and one long row does not make a whole
    group pay for its width.
    """
    groups: list[I64] = []
    lengths = sorted_lengths.tolist()
    start, n = 0, len(lengths)
    while start < n:
        total, end = 0, start
        while end < n and end - start < _FOLD_GROUP:
            width = lengths[end]
            if end > start and (lengths[start] < f) != (width < f):
                break
            if width * (end - start + 1) - (total + width) > _PAD_BUDGET:
                break
            total += width
            end += 1
        end = max(end, start + 1)
        groups.append(order[start:end])
        start = end
    return groups


# Padded row slots a fold-in group may waste before a new group is cheaper.
_PAD_BUDGET = 256


def _solve_low_rank(
    base_inv: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64],
    cpos: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """``(B + Yᵀ W Y)⁻¹ Yᵀ c`` per user by Woodbury, with ``B⁻¹`` given.

    ``A⁻¹ = B⁻¹ − B⁻¹Yᵀ (I + W Y B⁻¹ Yᵀ)⁻¹ W Y B⁻¹``; no inverse of ``W`` is
    needed, so zero weights (``|c| = 1``, or padding) are fine. The small matrix
    is singular exactly when ``A`` is.
    """
    n = y.shape[1]
    z_rows = np.matmul(y, base_inv)  # Y B⁻¹, (g, n, f)
    k = np.matmul(z_rows, y.transpose(0, 2, 1))  # Y B⁻¹ Yᵀ, (g, n, n)
    z = np.matmul(cpos[:, None, :], z_rows)[:, 0, :]  # B⁻¹ b, since b = Yᵀ c
    t = np.matmul(y, z[:, :, None])[:, :, 0]  # Y z
    small = np.eye(n)[None, :, :] + weight[:, :, None] * k
    s = np.linalg.solve(small, (weight * t)[:, :, None])[:, :, 0]
    solved: npt.NDArray[np.float64] = z - np.matmul(s[:, None, :], z_rows)[:, 0, :]
    return solved


def fold_in_reference(
    factors: F32,
    rows: Sequence[Row],
    *,
    regularization: float,
    alpha: float,
    confidence_mode: Confidence = "implicit",
) -> F32:
    """Slow reference: builds each normal equation with explicit loops and ``np.linalg.solve``."""
    f = factors.shape[1]
    y64 = factors.astype(np.float64)
    out = np.zeros((len(rows), f), dtype=np.float32)
    for u, (cols, vals) in enumerate(rows):
        a = y64.T @ y64 + regularization * np.eye(f)
        b = np.zeros(f)
        for i, v in zip(cols, vals, strict=True):
            if confidence_mode == "one_plus":
                c = (1.0 if v > 0 else -1.0 if v < 0 else 0.0) * (1.0 + alpha * abs(float(v)))
            else:
                c = alpha * float(v)
            yi = y64[int(i)]
            if c > 0:
                b += c * yi
            a += (abs(c) - 1.0) * np.outer(yi, yi)
        out[u] = np.linalg.solve(a, b)
    return out


@dataclass
class ItemIndex:
    """Item factors sorted by decreasing norm, for exact norm-pruned top-k.

    Scoring walks the items in chunks of decreasing norm. Since
    ``x·y ≤ |x|·|y|``, once a user's k-th best score is at least ``|x|`` times
    the largest norm left, no remaining item can enter the list, and that user
    stops. The result is exact; the pruning only saves work.

    Items refit or added at run time are updated in place (:meth:`update`,
    :meth:`extend`) instead of re-sorting: they keep their position, and
    ``bound`` (the largest norm at or after each position) keeps the pruning
    exact.
    """

    order: I64  # sorted position -> item index
    rank: I64  # item index -> sorted position
    factors: F32  # item factors in sorted order, C-contiguous
    norms: F32  # norm of the item at each sorted position
    bound: F32  # max(norms[p:]) for each position p (non-increasing)

    @classmethod
    def build(cls, item_factors: F32) -> ItemIndex:
        norms = np.linalg.norm(item_factors, axis=1).astype(np.float32)
        order = np.argsort(-norms, kind="stable").astype(np.int64)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order), dtype=np.int64)
        sorted_norms = norms[order]
        return cls(
            order=order,
            rank=rank,
            factors=np.ascontiguousarray(item_factors[order]),
            norms=sorted_norms,
            bound=_suffix_max(sorted_norms),
        )

    @property
    def n_items(self) -> int:
        return len(self.order)

    def update(self, items: npt.NDArray[np.integer], vectors: F32) -> None:
        """New factors for existing items, in place."""
        pos = self.rank[np.asarray(items, dtype=np.int64)]
        self.factors[pos] = vectors
        self.norms[pos] = np.linalg.norm(vectors, axis=1)
        self.bound = _suffix_max(self.norms)

    def extend(self, vectors: F32) -> None:
        """Append items ``n_items, n_items + 1, ...`` at the end of the order."""
        n, m = self.n_items, len(vectors)
        new = np.arange(n, n + m, dtype=np.int64)
        self.order = np.concatenate([self.order, new])
        self.rank = np.concatenate([self.rank, new])
        self.factors = np.ascontiguousarray(np.concatenate([self.factors, vectors]))
        self.norms = np.concatenate([self.norms, np.linalg.norm(vectors, axis=1)]).astype(
            np.float32
        )
        self.bound = _suffix_max(self.norms)


def _suffix_max(norms: F32) -> F32:
    out: F32 = np.maximum.accumulate(norms[::-1])[::-1].astype(np.float32)
    return out


# Items scored per step: the first step is small because ALS item norms are skewed
# (popular items are long), so most users stop after the first ~2k items of a 100k
# catalogue; later steps double up to _MAX_CHUNK so BLAS runs at full speed. Both
# are multiples of _BLOCK.
_FIRST_CHUNK = 2048
_MAX_CHUNK = 16384
# Columns per block for the block-max preselection inside a chunk.
_BLOCK = 128


def _chunk_top_k(scores: F32, k: int) -> tuple[I64, F32]:
    """Exact per-row top-k (unsorted) of a score matrix whose width is a multiple of _BLOCK.

    The k best entries of a row lie in the k blocks with the largest block maxima,
    so only k·_BLOCK candidates per row go through ``argpartition``.
    """
    rows, width = scores.shape
    nblocks = width // _BLOCK
    if nblocks <= k:
        part = np.argpartition(scores, width - k, axis=1)[:, width - k :]
        return part.astype(np.int64), np.take_along_axis(scores, part, axis=1)
    blocks = scores.reshape(rows, nblocks, _BLOCK)
    bmax = blocks.max(axis=2)
    top_blocks = np.argpartition(bmax, nblocks - k, axis=1)[:, nblocks - k :]  # (rows, k)
    cand = blocks[np.arange(rows)[:, None], top_blocks].reshape(rows, k * _BLOCK)
    part = np.argpartition(cand, k * _BLOCK - k, axis=1)[:, k * _BLOCK - k :]
    col = top_blocks[np.arange(rows)[:, None], part // _BLOCK] * _BLOCK + part % _BLOCK
    return col.astype(np.int64), np.take_along_axis(cand, part, axis=1)


def top_k(
    index: ItemIndex,
    user_factors: F32,
    exclude: Sequence[npt.NDArray[np.integer]],
    k: int,
) -> tuple[I64, F32]:
    """Exact top-k items per user by dot product, skipping each user's excluded items.

    Returns ``(items, scores)`` of shape ``(n_users, k)``, best first. Where fewer
    than k items are eligible, the tail holds item ``-1`` and score ``-inf``.

    The result does not depend on which other users share the batch: BLAS
    rounds a score differently depending on where it sits in a matrix tile, so
    BLAS only nominates ``k + _TIE_MARGIN`` candidates, and the final order
    comes from float64 dot products summed in a fixed order, ties broken by
    the lower item index. Videos with identical factors (new videos sharing a
    content prior) therefore always rank the same way.
    """
    n_users = user_factors.shape[0]
    n_items = index.n_items
    out_i = np.full((n_users, k), -1, dtype=np.int64)
    out_s = np.full((n_users, k), -np.inf, dtype=np.float32)
    if n_users == 0 or n_items == 0:
        return out_i, out_s
    x = np.ascontiguousarray(user_factors, dtype=np.float32)
    kc = min(k + _TIE_MARGIN, n_items)
    ex_user, ex_pos = _excluded_positions(index, exclude)
    cand = _candidates(index, x, ex_user, ex_pos, kc)  # sorted positions, -1 = none
    items, s64 = _exact_rank(index, x, cand)
    # A near-tie at the candidate boundary could hide an item BLAS ranked just below
    # it: those (rare) users are ranked again from a full scan.
    tol = _blas_tolerance(index, x)
    kk = min(k, kc)
    if kc < n_items:
        edge = np.isfinite(s64[:, kc - 1]) & (s64[:, kk - 1] - s64[:, kc - 1] <= 2 * tol)
        for u in np.flatnonzero(edge):
            items[u], s64[u] = _full_rank(index, x[u], ex_pos[ex_user == u], kc, 2 * tol[u])
    out_i[:, :kk] = items[:, :kk]
    out_s[:, :kk] = s64[:, :kk]
    return out_i, out_s


# Extra candidates BLAS nominates beyond k, so exact ties and near-ties at the k-th
# place are settled by the exact rescoring rather than by BLAS rounding.
_TIE_MARGIN = 10


def _excluded_positions(
    index: ItemIndex, exclude: Sequence[npt.NDArray[np.integer]]
) -> tuple[I64, I64]:
    """Excluded (user, sorted position) pairs, ordered by position."""
    n_items = index.n_items
    ex_user = np.concatenate(
        [np.full(len(e), u, dtype=np.int64) for u, e in enumerate(exclude)]
        + [np.empty(0, np.int64)]
    )
    ex_item = np.concatenate(
        [np.asarray(e, dtype=np.int64) for e in exclude] + [np.empty(0, np.int64)]
    )
    keep = (ex_item >= 0) & (ex_item < n_items)
    ex_user, ex_pos = ex_user[keep], index.rank[ex_item[keep]]
    by_pos = np.argsort(ex_pos, kind="stable")
    return ex_user[by_pos], ex_pos[by_pos]


def _blas_tolerance(index: ItemIndex, x: F32) -> npt.NDArray[np.float64]:
    """Per user, a bound on the float32 rounding error of any one BLAS score."""
    f = x.shape[1]
    xnorm: npt.NDArray[np.float64] = np.linalg.norm(x.astype(np.float64), axis=1)
    scale = float(index.bound[0]) * (4 * f * float(np.finfo(np.float32).eps))
    tol: npt.NDArray[np.float64] = xnorm * scale + 1e-30
    return tol


def _candidates(index: ItemIndex, x: F32, ex_user: I64, ex_pos: I64, kc: int) -> I64:
    """The ``kc`` best sorted positions per user by BLAS float32 scores, norm-pruned."""
    n_users, n_items = x.shape[0], index.n_items
    best_i = np.full((n_users, kc), -1, dtype=np.int64)  # sorted positions
    best_s = np.full((n_users, kc), -np.inf, dtype=np.float32)
    xnorm = np.linalg.norm(x, axis=1)
    active = np.arange(n_users)
    local_of = np.full(n_users, -1, dtype=np.int64)
    start, chunk = 0, _FIRST_CHUNK
    while start < n_items:
        if start > 0:
            bound = xnorm[active] * index.bound[start]
            active = active[best_s[active, kc - 1] < bound]
            if len(active) == 0:
                break
        end = min(start + chunk, n_items)
        width = -(-(end - start) // _BLOCK) * _BLOCK
        scores = np.full((len(active), width), -np.inf, dtype=np.float32)
        np.matmul(x[active], index.factors[start:end].T, out=scores[:, : end - start])
        lo, hi = np.searchsorted(ex_pos, [start, end])
        if hi > lo:
            local_of[active] = np.arange(len(active))
            rows = local_of[ex_user[lo:hi]]
            hit = rows >= 0
            scores[rows[hit], ex_pos[lo:hi][hit] - start] = -np.inf
            local_of[active] = -1
        cols, vals = _chunk_top_k(scores, min(kc, width))
        merged_s = np.concatenate([best_s[active], vals], axis=1)
        merged_i = np.concatenate([best_i[active], cols + start], axis=1)
        pick = np.argpartition(merged_s, merged_s.shape[1] - kc, axis=1)[:, -kc:]
        best_s[active] = np.take_along_axis(merged_s, pick, axis=1)
        best_i[active] = np.take_along_axis(merged_i, pick, axis=1)
        # Keep the kc-th best in the last column for the pruning bound.
        srt = np.argsort(-best_s[active], axis=1, kind="stable")
        best_s[active] = np.take_along_axis(best_s[active], srt, axis=1)
        best_i[active] = np.take_along_axis(best_i[active], srt, axis=1)
        start, chunk = end, min(chunk * 2, _MAX_CHUNK)
    return np.where(np.isfinite(best_s), best_i, -1)


def _exact_rank(index: ItemIndex, x: F32, pos: I64) -> tuple[I64, npt.NDArray[np.float64]]:
    """Candidates re-scored in float64 with a fixed summation order and sorted.

    Order: score descending, then item index ascending; missing candidates last.
    """
    valid = pos >= 0
    safe = np.where(valid, pos, 0)
    y = index.factors[safe].astype(np.float64)  # (n, kc, f)
    s64 = np.where(valid, (y * x.astype(np.float64)[:, None, :]).sum(axis=2), -np.inf)
    items = np.where(valid, index.order[safe], -1)
    # Missing candidates (-1) sort after every real item with the same (-inf) score.
    tiebreak = np.where(valid, items, np.iinfo(np.int64).max)
    order = np.lexsort((tiebreak, -s64), axis=1)
    return np.take_along_axis(items, order, axis=1), np.take_along_axis(s64, order, axis=1)


def _full_rank(
    index: ItemIndex, x: F32, ex_pos: I64, kc: int, slack: float
) -> tuple[I64, npt.NDArray[np.float64]]:
    """One user's ``kc`` best from every item within ``slack`` of the BLAS cut-off."""
    scores = index.factors @ x
    scores[ex_pos] = -np.inf
    cut = np.partition(scores, len(scores) - kc)[len(scores) - kc]
    pos = np.flatnonzero(np.isfinite(scores) & (scores >= cut - slack))
    items, s64 = _exact_rank(index, x[None, :], pos[None, :])
    return items[0, :kc], s64[0, :kc]


def top_k_reference(
    item_factors: F32,
    user_factors: F32,
    exclude: Sequence[npt.NDArray[np.integer]],
    k: int,
) -> tuple[I64, F32]:
    """Slow reference: full scores, full stable sort, per user."""
    n_users = user_factors.shape[0]
    items = np.full((n_users, k), -1, dtype=np.int64)
    scores = np.full((n_users, k), -np.inf, dtype=np.float32)
    for u in range(n_users):
        s = (item_factors.astype(np.float64) @ user_factors[u].astype(np.float64)).astype(
            np.float32
        )
        banned = set(int(i) for i in exclude[u])
        ranked = [int(i) for i in np.argsort(-s, kind="stable") if int(i) not in banned][:k]
        items[u, : len(ranked)] = ranked
        scores[u, : len(ranked)] = s[ranked]
    return items, scores
