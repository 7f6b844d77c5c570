"""Ranking metrics: hand-computed cases, a slow reference, and implicit's own evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from worker.eval.metrics import (
    METRIC_DEFINITIONS,
    average_precision_at_k,
    cluster_bootstrap,
    coverage,
    hit_rate_at_k,
    ndcg_at_k,
    percentiles,
    precision_at_k,
    recall_at_k,
    score_list,
)


def _reference(recommended: list[str], relevant: set[str], k: int) -> dict[str, float]:
    """Slow, obviously correct versions: one loop per metric, straight from the definitions."""
    top: list[str] = []
    for v in recommended:
        if v not in top:
            top.append(v)
    top = top[:k]
    rel = [1 if v in relevant else 0 for v in top]
    hits = sum(rel)
    denom = min(k, len(relevant))
    dcg = 0.0
    for i, r in enumerate(rel):
        dcg += r / math.log2(i + 2)
    idcg = 0.0
    for i in range(denom):
        idcg += 1 / math.log2(i + 2)
    ap = 0.0
    for i in range(len(top)):
        if rel[i]:
            ap += sum(rel[: i + 1]) / (i + 1)
    return {
        "precision": hits / denom,
        "recall": hits / len(relevant),
        "ndcg": dcg / idcg,
        "average_precision": ap / denom,
        "hit": 1.0 if hits else 0.0,
    }


def test_hand_computed() -> None:
    recs = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    rel = {"b", "d", "z"}
    # hits at positions 1 and 3; min(10, 3) = 3
    assert precision_at_k(recs, rel) == pytest.approx(2 / 3)
    assert recall_at_k(recs, rel) == pytest.approx(2 / 3)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(recs, rel) == pytest.approx(dcg / idcg)
    assert average_precision_at_k(recs, rel) == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert hit_rate_at_k(recs, rel) == 1.0
    assert hit_rate_at_k(recs, {"zz"}) == 0.0


def test_perfect_and_cutoff() -> None:
    rel = {f"v{i}" for i in range(20)}
    recs = [f"v{i}" for i in range(10)]
    s = score_list(recs, rel, 10)
    assert (s.precision, s.ndcg, s.average_precision, s.hit) == (1.0, 1.0, 1.0, 1.0)
    assert s.recall == pytest.approx(0.5)
    # Entries past k never count.
    assert precision_at_k(["x"] * 0 + ["a", "b", "c"], {"c"}, k=2) == 0.0


def test_duplicates_count_once() -> None:
    assert precision_at_k(["a", "a", "b"], {"a", "b"}, k=2) == 1.0
    assert score_list(["a", "a"], {"a", "b"}, k=2).hits == 1


def test_empty_relevant_and_bad_k_raise() -> None:
    with pytest.raises(ValueError):
        precision_at_k(["a"], set())
    with pytest.raises(ValueError):
        score_list(["a"], {"a"}, k=0)


def test_random_lists_match_reference() -> None:
    rng = np.random.default_rng(7)
    for _ in range(500):
        k = int(rng.integers(1, 12))
        n_items = int(rng.integers(3, 40))
        recs = [f"v{i}" for i in rng.integers(0, n_items, size=int(rng.integers(0, 15)))]
        rel = {f"v{i}" for i in rng.integers(0, n_items, size=int(rng.integers(1, 15)))}
        ref = _reference(recs, rel, k)
        s = score_list(recs, rel, k)
        for name, value in ref.items():
            assert getattr(s, name) == pytest.approx(value), (name, recs, rel, k)
        assert precision_at_k(recs, rel, k) == pytest.approx(ref["precision"])
        assert recall_at_k(recs, rel, k) == pytest.approx(ref["recall"])
        assert ndcg_at_k(recs, rel, k) == pytest.approx(ref["ndcg"])
        assert average_precision_at_k(recs, rel, k) == pytest.approx(ref["average_precision"])
        assert hit_rate_at_k(recs, rel, k) == ref["hit"]


class _FixedLists:
    """A stand-in implicit model whose ``recommend`` returns given lists."""

    def __init__(self, lists: dict[int, list[int]]) -> None:
        self.lists = lists

    def recommend(self, userid, user_items, N=10, **kw):  # implicit's signature
        ids = np.array([self.lists[int(u)][:N] for u in np.atleast_1d(userid)], dtype=np.int32)
        return ids, np.ones_like(ids, dtype=np.float32)


def test_matches_implicit_ranking_metrics() -> None:
    """precision / MAP / NDCG agree with implicit's ranking_metrics_at_k, list by list."""
    from implicit.evaluation import ranking_metrics_at_k

    rng = np.random.default_rng(3)
    n_items, k = 50, 10
    for _ in range(60):
        recs = rng.choice(n_items, size=k, replace=False).tolist()
        rel = sorted(set(rng.integers(0, n_items, size=int(rng.integers(1, 25))).tolist()))
        test = sp.csr_matrix(
            (np.ones(len(rel), np.float32), ([0] * len(rel), rel)), shape=(1, n_items)
        )
        train = sp.csr_matrix((1, n_items), dtype=np.float32)
        ref = ranking_metrics_at_k(_FixedLists({0: recs}), train, test, K=k, show_progress=False)
        s = score_list([str(v) for v in recs], {str(v) for v in rel}, k)
        assert s.precision == pytest.approx(ref["precision"])
        assert s.average_precision == pytest.approx(ref["map"])
        assert s.ndcg == pytest.approx(ref["ndcg"])


def test_coverage_and_percentiles() -> None:
    assert coverage([["a", "b"], ["b", "c"]], 10) == pytest.approx(0.3)
    assert coverage([["a", "b", "c"]], 10, k=2) == pytest.approx(0.2)
    p = percentiles([1.0, 2.0, 3.0, 4.0, 5.0])
    assert p["p50"] == 3.0 and p["p99"] == pytest.approx(4.96)
    assert percentiles([])["p95"] is None


def test_every_metric_is_defined() -> None:
    for key in ("precision_at_10", "recall_at_10", "ndcg_at_10", "map_at_10", "hit_rate_at_10"):
        assert METRIC_DEFINITIONS[key]
    assert "coverage" in METRIC_DEFINITIONS


def test_cluster_bootstrap_interval() -> None:
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(200), 5)
    values = rng.normal(0.3, 0.1, size=users.size)
    lo, hi = cluster_bootstrap(values, users, reps=500)
    assert lo < values.mean() < hi and hi - lo < 0.05
    # One user with many lists counts as one cluster: the interval stays wide.
    few = np.array([0] * 50 + [1] * 50)
    lo2, hi2 = cluster_bootstrap(np.r_[np.zeros(50), np.ones(50)], few, reps=500)
    assert lo2 < 0.2 and hi2 > 0.8
    with pytest.raises(ValueError):
        cluster_bootstrap(np.array([]), np.array([]))
