"""Ranking metrics for one recommended list against a set of relevant videos.

Pure functions, no I/O. Every metric scores one list ``recommended`` (best
first) against ``relevant``, the videos the user went on to like (see
:mod:`worker.eval.replay` for how "relevant" is built prequentially). Only the
first ``k`` entries count; a repeated entry counts once, at its first position.
A list is never scored against an empty relevant set: the metrics are
undefined there, and the functions raise :class:`ValueError`.

Precision, MAP and NDCG follow implicit's ``ranking_metrics_at_k`` (the
library refold trains with), so numbers are comparable with implicit-based
notebooks: precision divides by ``min(k, |relevant|)``, not by ``k``, so that a
user with only 3 relevant videos can reach 1.0. The unit tests compare these
functions with implicit itself and with slow reference versions.

:data:`METRIC_DEFINITIONS` holds the text that reports print for each metric.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

#: Cut-off of every ranking metric: the worker publishes top-10 lists.
DEFAULT_K = 10

METRIC_DEFINITIONS: dict[str, str] = {
    "precision_at_10": (
        "hits / min(10, |R|), where hits = number of the list's first 10 videos in R "
        "(R = the user's relevant videos in the horizon). As implicit's "
        "ranking_metrics_at_k: a user with fewer than 10 relevant videos can reach 1.0."
    ),
    "recall_at_10": "hits / |R|.",
    "ndcg_at_10": (
        "DCG / IDCG with binary gains: DCG = sum over hit positions i (0-based) of "
        "1 / log2(i + 2); IDCG = the same sum over the first min(10, |R|) positions."
    ),
    "map_at_10": (
        "Average precision at 10 (implicit's definition): the sum, over hit positions i "
        "(0-based), of (hits among positions 0..i) / (i + 1), divided by min(10, |R|); "
        "MAP is its mean over scored lists."
    ),
    "hit_rate_at_10": "1 when at least one of the first 10 videos is in R, else 0.",
    "coverage": (
        "Distinct videos that appear in at least one of the variant's scored lists, "
        "divided by the number of videos in the catalog (the bootstrap model's videos "
        "plus videos first seen during the replay)."
    ),
}


@dataclass(frozen=True, slots=True)
class ListScores:
    """All ranking metrics of one list at cut-off ``k``."""

    precision: float
    recall: float
    ndcg: float
    average_precision: float
    hit: float
    hits: int
    relevant: int

    def as_dict(self) -> dict[str, float]:
        """The scores as a plain dict (for JSON)."""
        return {k: float(v) for k, v in asdict(self).items()}


def _hit_positions(
    recommended: Sequence[Hashable], relevant: Collection[Hashable], k: int
) -> list[int]:
    """0-based positions, within the first ``k`` distinct entries, that are relevant."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not relevant:
        raise ValueError("a list cannot be scored against an empty relevant set")
    seen: set[Hashable] = set()
    positions: list[int] = []
    pos = 0
    for video in recommended:
        if pos >= k:
            break
        if video in seen:
            continue  # a repeated entry counts once, at its first position
        seen.add(video)
        if video in relevant:
            positions.append(pos)
        pos += 1
    return positions


def _discount(position: int) -> float:
    """DCG discount of a 0-based position."""
    return 1.0 / math.log2(position + 2)


def precision_at_k(
    recommended: Sequence[Hashable], relevant: Collection[Hashable], k: int = DEFAULT_K
) -> float:
    """Hits among the first ``k`` over ``min(k, |relevant|)`` (implicit's precision)."""
    hits = len(_hit_positions(recommended, relevant, k))
    return hits / min(k, len(relevant))


def recall_at_k(
    recommended: Sequence[Hashable], relevant: Collection[Hashable], k: int = DEFAULT_K
) -> float:
    """Hits among the first ``k`` over ``|relevant|``."""
    return len(_hit_positions(recommended, relevant, k)) / len(relevant)


def ndcg_at_k(
    recommended: Sequence[Hashable], relevant: Collection[Hashable], k: int = DEFAULT_K
) -> float:
    """Binary-gain NDCG at ``k``; the ideal list puts ``min(k, |relevant|)`` hits on top."""
    dcg = sum(_discount(p) for p in _hit_positions(recommended, relevant, k))
    idcg = sum(_discount(p) for p in range(min(k, len(relevant))))
    return dcg / idcg


def average_precision_at_k(
    recommended: Sequence[Hashable], relevant: Collection[Hashable], k: int = DEFAULT_K
) -> float:
    """Average precision at ``k``, normalised by ``min(k, |relevant|)`` (implicit's MAP term)."""
    positions = _hit_positions(recommended, relevant, k)
    total = sum((n + 1) / (p + 1) for n, p in enumerate(positions))
    return total / min(k, len(relevant))


def hit_rate_at_k(
    recommended: Sequence[Hashable], relevant: Collection[Hashable], k: int = DEFAULT_K
) -> float:
    """1.0 when any of the first ``k`` is relevant, else 0.0."""
    return 1.0 if _hit_positions(recommended, relevant, k) else 0.0


def score_list(
    recommended: Sequence[Hashable], relevant: Collection[Hashable], k: int = DEFAULT_K
) -> ListScores:
    """Every metric of one list in one pass over it."""
    positions = _hit_positions(recommended, relevant, k)
    hits = len(positions)
    denom = min(k, len(relevant))
    dcg = sum(_discount(p) for p in positions)
    idcg = sum(_discount(p) for p in range(denom))
    return ListScores(
        precision=hits / denom,
        recall=hits / len(relevant),
        ndcg=dcg / idcg,
        average_precision=sum((n + 1) / (p + 1) for n, p in enumerate(positions)) / denom,
        hit=1.0 if hits else 0.0,
        hits=hits,
        relevant=len(relevant),
    )


def coverage(lists: Iterable[Sequence[Hashable]], catalog_size: int, k: int = DEFAULT_K) -> float:
    """Distinct videos among the first ``k`` of all ``lists``, over ``catalog_size``."""
    if catalog_size < 1:
        raise ValueError(f"catalog_size must be >= 1, got {catalog_size}")
    distinct: set[Hashable] = set()
    for lst in lists:
        distinct.update(lst[:k])
    return len(distinct) / catalog_size


def percentiles(
    values: Sequence[float] | npt.NDArray[np.float64], qs: Sequence[float] = (50, 95, 99)
) -> dict[str, float | None]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` (linear interpolation); ``None`` when empty."""
    arr = np.asarray(values, dtype=np.float64)
    out: dict[str, float | None] = {}
    for q in qs:
        label = f"p{q:g}"
        out[label] = float(np.percentile(arr, q)) if arr.size else None
    return out


def cluster_bootstrap(
    values: npt.NDArray[np.float64],
    clusters: npt.NDArray[np.integer],
    *,
    reps: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Confidence interval of the mean of ``values``, resampling whole clusters (users).

    Lists of one user are not independent (a bursty user yields many similar
    lists), so the bootstrap draws users with replacement and keeps all their
    lists: each replicate's mean is ``sum_u w_u S_u / sum_u w_u N_u``, where
    ``S_u`` and ``N_u`` are user u's sum of values and number of lists and
    ``w_u`` how many times u was drawn. Pass per-list differences between two
    variants to get a paired interval. Returns the ``level`` percentile interval.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values to bootstrap")
    _, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    sums = np.bincount(inverse, weights=v)
    counts = np.bincount(inverse).astype(np.float64)
    rng = np.random.default_rng(seed)
    n = len(sums)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=reps).astype(np.float64)
    means = (weights @ sums) / np.maximum(weights @ counts, 1.0)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(lo), float(hi)
