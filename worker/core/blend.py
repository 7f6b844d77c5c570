"""The popularity blend: ALS score and live popularity in one exact top-k.

For user ``u`` with factors ``x`` and item ``i`` with factors ``y_i`` and live
(time-decayed) popularity ``p_i``, the blended score is::

    s_ui = (x·y_i − μ_u) / σ_u + β_u · log1p(p_i)

the ALS score z-scored over every catalogue item, plus a popularity term. ``β_u``
is ``AlsParams.blend_returning`` for a user the base model knows and
``AlsParams.blend_new`` for one it does not.

The mean and the (population) standard deviation of ``x·y_i`` over the catalogue
are exact in O(f²) from the item moments: ``μ_u = x·ȳ`` and ``σ_u² = xᵀ Σ x`` with
``Σ = YᵀY / n − ȳȳᵀ``. Since ``σ_u > 0`` is one number per user, ranking by
``s_ui`` is ranking by ``x·y_i + β_u σ_u g_i`` with ``g_i = log1p(p_i)``: a dot
product of the augmented vectors ``[x, β_u σ_u]`` and ``[y_i, g_i]``. The
norm-pruned :func:`~worker.core.als.top_k` over an index of augmented item vectors
is therefore exact for the blended score, its norm bound covering the blend term.

:func:`top_k_blend_reference` computes every score explicitly and sorts; the tests
hold the fast path to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from worker.core.als import F32, I64, ItemIndex, _suffix_max, top_k

F64 = npt.NDArray[np.float64]

#: σ_u below this (a user whose factors score every item the same) is taken as this:
#: the list is then ranked by popularity, ties by the ALS score.
MIN_SIGMA = 1e-12


def item_moments(factor_sum: F64, gram: F32, n_items: int) -> tuple[F64, F64]:
    """Mean item vector ``ȳ`` and population covariance ``Σ = YᵀY/n − ȳȳᵀ`` (float64)."""
    if n_items <= 0:
        f = len(factor_sum)
        return np.zeros(f), np.zeros((f, f))
    mean = factor_sum.astype(np.float64) / n_items
    cov = gram.astype(np.float64) / n_items - np.outer(mean, mean)
    return mean, cov


def user_moments(x: F32, mean: F64, cov: F64) -> tuple[F64, F64]:
    """Per user: mean ``μ_u`` and standard deviation ``σ_u`` of ``x·y_i`` over the items."""
    x64 = x.astype(np.float64)
    mu: F64 = x64 @ mean
    var = np.einsum("uf,fg,ug->u", x64, cov, x64)
    sigma: F64 = np.sqrt(np.maximum(var, 0.0))
    return mu, np.maximum(sigma, MIN_SIGMA)


def augmented_index(base: ItemIndex, g: F32, previous: ItemIndex | None = None) -> ItemIndex:
    """``base`` with one more column, ``g`` (per item index), in the same sorted order.

    The order stays ``base``'s (by ``|y|``); the norms and their suffix maxima are those
    of the augmented vectors, so the pruning stays exact. ``previous`` (the last
    augmented index, of the same order and size) is reused: only the ``g`` column,
    the norms and the bound are rewritten, O(n) rather than a copy of every factor.
    Callers must pass ``previous=None`` when ``base``'s factors changed.
    """
    n, f = base.factors.shape
    gs = np.asarray(g, dtype=np.float32)[base.order]
    if previous is None or previous.factors.shape != (n, f + 1) or previous.order is not base.order:
        factors = np.empty((n, f + 1), dtype=np.float32)
        factors[:, :f] = base.factors
        previous = ItemIndex(
            order=base.order, rank=base.rank, factors=factors, norms=base.norms, bound=base.bound
        )
    previous.factors[:, f] = gs
    norms = np.sqrt(base.norms.astype(np.float64) ** 2 + gs.astype(np.float64) ** 2)
    previous.norms = norms.astype(np.float32)
    previous.bound = _suffix_max(previous.norms)
    return previous


def blend_top_k(
    index: ItemIndex,
    x: F32,
    betas: F64,
    mean: F64,
    cov: F64,
    exclude: Sequence[npt.NDArray[np.integer]],
    k: int,
) -> tuple[I64, F64]:
    """Exact top-k by the blended score over an :func:`augmented_index`.

    Returns ``(items, blended scores)``, best first; missing items are ``-1`` with
    score ``-inf``.
    """
    mu, sigma = user_moments(x, mean, cov)
    aug = np.empty((x.shape[0], x.shape[1] + 1), dtype=np.float32)
    aug[:, :-1] = x
    aug[:, -1] = np.asarray(betas, dtype=np.float64) * sigma
    items, raw = top_k(index, aug, exclude, k)
    scores: F64 = (raw.astype(np.float64) - mu[:, None]) / sigma[:, None]
    return items, scores


def top_k_blend_reference(
    item_factors: F32,
    x: F32,
    betas: Sequence[float],
    popularity: F64,
    exclude: Sequence[npt.NDArray[np.integer]],
    k: int,
) -> tuple[I64, F64]:
    """Slow reference: every ALS score, its mean and std over all items, the blend term,
    a full stable sort (ties: lower item index), exclusions skipped."""
    n_users = x.shape[0]
    items = np.full((n_users, k), -1, dtype=np.int64)
    scores = np.full((n_users, k), -np.inf, dtype=np.float64)
    y64 = item_factors.astype(np.float64)
    g = np.log1p(np.asarray(popularity, dtype=np.float64))
    for u in range(n_users):
        s = y64 @ x[u].astype(np.float64)
        sd = max(float(s.std()), MIN_SIGMA)
        blended = (s - s.mean()) / sd + float(betas[u]) * g
        banned = {int(i) for i in exclude[u]}
        ranked = [int(i) for i in np.argsort(-blended, kind="stable") if int(i) not in banned][:k]
        items[u, : len(ranked)] = ranked
        scores[u, : len(ranked)] = blended[ranked]
    return items, scores
