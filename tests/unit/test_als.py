"""Fast paths of the ALS core against slow, obviously correct references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares

from worker.core.als import (
    ItemIndex,
    confidence,
    fold_in,
    fold_in_reference,
    gramian,
    top_k,
    top_k_reference,
)


def _rows(rng: np.random.Generator, n_rows: int, n_items: int, max_len: int):
    rows = []
    for _ in range(n_rows):
        m = int(rng.integers(0, max_len + 1))
        cols = rng.choice(n_items, size=m, replace=False)
        vals = rng.uniform(-2, 3, size=m).astype(np.float32)
        vals[np.abs(vals) < 0.05] = 0.5
        rows.append((cols, vals))
    return rows


def test_fold_in_matches_reference_solve():
    rng = np.random.default_rng(1)
    y = (rng.standard_normal((60, 6)) * 0.4).astype(np.float32)
    rows = _rows(rng, 150, 60, 25)  # > one fold-in group, lengths vary
    fast = fold_in(y, gramian(y), rows, regularization=0.1, alpha=5.0)
    slow = fold_in_reference(y, rows, regularization=0.1, alpha=5.0)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)


def test_fold_in_matches_implicit_recalculate_user():
    rng = np.random.default_rng(2)
    y = (rng.standard_normal((40, 5)) * 0.3).astype(np.float32)
    rows = _rows(rng, 12, 40, 10)
    indptr = np.cumsum([0] + [len(c) for c, _ in rows])
    csr = sp.csr_matrix(
        (np.concatenate([v for _, v in rows]), np.concatenate([c for c, _ in rows]), indptr),
        shape=(len(rows), 40),
    )
    als = AlternatingLeastSquares(factors=5, regularization=0.2, alpha=3.0)
    als.item_factors = y
    als.user_factors = np.zeros((len(rows), 5), np.float32)
    expected = als.recalculate_user(np.arange(len(rows)), csr)
    got = fold_in(y, gramian(y), rows, regularization=0.2, alpha=3.0)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)


def test_fold_in_known_answer_checkerboard():
    """Two orthogonal item groups: a user who likes group A gets a factor along A only."""
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    (x,) = fold_in(
        y, gramian(y), [(np.array([0, 1]), np.array([1.0, 1.0]))], regularization=0.0, alpha=1.0
    )
    # A = YtY + sum (c-1) yy^T = diag(2, 2); b = y0 + y1 = (2, 0) -> x = (1, 0)
    np.testing.assert_allclose(x, [1.0, 0.0], atol=1e-6)
    (neg,) = fold_in(
        y, gramian(y), [(np.array([2]), np.array([-1.0]))], regularization=0.1, alpha=3.0
    )
    np.testing.assert_allclose(neg, [0.0, 0.0], atol=1e-7)  # a dislike alone gives no positive b


def test_empty_rows_and_batch():
    y = np.eye(3, dtype=np.float32)
    assert fold_in(y, gramian(y), [], regularization=0.1, alpha=1.0).shape == (0, 3)
    out = fold_in(
        y,
        gramian(y),
        [(np.array([], int), np.array([], np.float32))],
        regularization=0.1,
        alpha=1.0,
    )
    np.testing.assert_array_equal(out, np.zeros((1, 3), np.float32))


@pytest.mark.parametrize("n_items", [5, 130, 9000, 20_000])
def test_top_k_matches_full_sort(n_items: int):
    rng = np.random.default_rng(n_items)
    f = 8
    y = (rng.standard_normal((n_items, f)) * rng.uniform(0.05, 2.0, size=(n_items, 1))).astype(
        np.float32
    )
    x = rng.standard_normal((37, f)).astype(np.float32)
    exclude = [
        rng.choice(n_items, size=min(n_items - 1, int(rng.integers(0, 40))), replace=False)
        for _ in range(37)
    ]
    items, scores = top_k(ItemIndex.build(y), x, exclude, 10)
    ref_items, ref_scores = top_k_reference(y, x, exclude, 10)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    for u in range(37):
        assert not set(items[u].tolist()) & set(exclude[u].tolist())
        ok = ref_items[u] >= 0
        # Same items wherever scores are not tied.
        if len(set(np.round(ref_scores[u][ok], 5))) == ok.sum():
            assert items[u][ok].tolist() == ref_items[u][ok].tolist()


def test_top_k_fewer_eligible_than_k():
    y = np.arange(12, dtype=np.float32).reshape(6, 2)
    items, scores = top_k(
        ItemIndex.build(y), np.ones((1, 2), np.float32), [np.array([0, 1, 2])], 10
    )
    assert items[0, :3].tolist() == [5, 4, 3]
    assert (items[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()


def _skewed_items(rng: np.random.Generator, n: int, f: int) -> np.ndarray:
    """Item factors with Pareto norms, sorted long to short (as ALS gives popular items)."""
    norms = np.sort(rng.pareto(2.0, n) + 0.05)[::-1].astype(np.float32)
    y = rng.standard_normal((n, f)).astype(np.float32)
    return y * (norms / np.linalg.norm(y, axis=1))[:, None]


def test_top_k_pruning_prunes_but_stays_exact():
    """Skewed norms (as ALS gives popular items) let most users stop early; results still exact."""
    rng = np.random.default_rng(7)
    f = 16
    y = _skewed_items(rng, 50_000, f)
    x = rng.standard_normal((20, f)).astype(np.float32)
    ex = [np.array([], np.int64)] * 20
    _items, scores = top_k(ItemIndex.build(y), x, ex, 10)
    _, ref_scores = top_k_reference(y, x, ex, 10)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_top_k_does_not_depend_on_the_batch():
    """BLAS rounds a score by its place in a tile; the lists must not change with the batch."""
    rng = np.random.default_rng(11)
    y = rng.standard_normal((5000, 16)).astype(np.float32)
    y[100:140] = y[7]  # 41 identical videos (e.g. new ones sharing a content prior)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    x[:8] = y[7]  # users whose best items are that tie group
    ex = [rng.choice(5000, 20, replace=False) for _ in range(64)]
    index = ItemIndex.build(y)
    items, scores = top_k(index, x, ex, 10)
    for u in range(64):
        alone_i, alone_s = top_k(index, x[u : u + 1], [ex[u]], 10)
        assert items[u].tolist() == alone_i[0].tolist()
        assert scores[u].tobytes() == alone_s[0].tobytes()
    perm = rng.permutation(64)
    p_items, _ = top_k(index, x[perm], [ex[i] for i in perm], 10)
    assert (p_items == items[perm]).all()


def test_top_k_breaks_exact_ties_by_lower_item_index():
    """A tie group larger than the candidate margin still yields the lowest indices."""
    rng = np.random.default_rng(3)
    y = (rng.standard_normal((3000, 8)) * 0.1).astype(np.float32)
    tied = np.arange(500, 560)
    y[tied] = 1.0  # 60 identical, far better than anything else
    x = np.ones((2, 8), np.float32)
    ex = [np.array([500, 502]), np.array([], np.int64)]
    items, scores = top_k(ItemIndex.build(y), x, ex, 10)
    assert items[0].tolist() == [501, *range(503, 512)]
    assert items[1].tolist() == list(range(500, 510))
    assert len(set(scores[1].tolist())) == 1


@pytest.mark.parametrize("max_len", [3, 40, 150])
def test_fold_in_low_rank_and_direct_paths_match_reference(max_len: int):
    """64 factors: rows shorter than 64 take the Woodbury path, longer ones the direct solve."""
    rng = np.random.default_rng(max_len)
    y = (rng.standard_normal((400, 64)) * 0.2).astype(np.float32)
    rows = _rows(rng, 90, 400, max_len)
    rows[0] = (np.array([5, 9]), np.array([1.0, -1.0], np.float32))  # |c| = 1: zero weight
    fast = fold_in(y, gramian(y), rows, regularization=0.5, alpha=1.0)
    slow = fold_in_reference(y, rows, regularization=0.5, alpha=1.0)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)


def test_item_index_updated_in_place_stays_exact():
    """Refit and appended items keep their place; the suffix-max bound keeps pruning exact."""
    rng = np.random.default_rng(5)
    n, f = 20_000, 16
    y = _skewed_items(rng, n, f)
    index = ItemIndex.build(y)
    # Items deep in the order (small norms) become the longest: a stale order must not prune them.
    grown = np.array([19_990, 15_000, 7])
    y[grown] = rng.standard_normal((3, f)).astype(np.float32) * 20
    index.update(grown, y[grown])
    extra = rng.standard_normal((5, f)).astype(np.float32) * 15
    y = np.concatenate([y, extra])
    index.extend(extra)
    x = rng.standard_normal((30, f)).astype(np.float32)
    ex = [np.array([7]) if u % 2 else np.array([], np.int64) for u in range(30)]
    items, scores = top_k(index, x, ex, 10)
    ref_items, ref_scores = top_k_reference(y, x, ex, 10)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert (items == ref_items).all()
    assert set(items.ravel().tolist()) & {*grown.tolist(), *range(n, n + 5)}


def test_fold_in_does_not_depend_on_the_batch():
    """Together with the top-k's exact rescoring, a user's list is the same in any batch."""
    rng = np.random.default_rng(1)
    y = (rng.standard_normal((300, 64)) * 0.3).astype(np.float32)
    rows = _rows(rng, 120, 300, 119)
    g = gramian(y)
    batch = fold_in(y, g, rows, regularization=1.0, alpha=3.0)
    alone = np.stack([fold_in(y, g, [r], regularization=1.0, alpha=3.0)[0] for r in rows])
    np.testing.assert_array_equal(batch, alone)


@pytest.mark.parametrize("max_len", [3, 40, 150])
def test_one_plus_fold_in_matches_reference(max_len: int):
    """c = sign(v)(1 + alpha|v|): both solve paths against np.linalg.solve."""
    rng = np.random.default_rng(100 + max_len)
    y = (rng.standard_normal((400, 64)) * 0.2).astype(np.float32)
    rows = _rows(rng, 90, 400, max_len)
    kw = {"regularization": 0.5, "alpha": 0.3, "confidence_mode": "one_plus"}
    fast = fold_in(y, gramian(y), rows, **kw)  # type: ignore[arg-type]
    slow = fold_in_reference(y, rows, **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)
    # It is a different solve from the implicit mode (alpha * |v| < 1 is common here).
    other = fold_in(y, gramian(y), rows, regularization=0.5, alpha=0.3)
    assert not np.allclose(fast, other, atol=1e-3)


def test_one_plus_observed_items_never_weigh_less_than_unobserved():
    v = np.array([0.01, 0.5, -0.2, 0.0, 3.0])
    c = confidence(v, 0.5, "one_plus")
    np.testing.assert_allclose(c, [1.005, 1.25, -1.1, 0.0, 2.5])
    assert (np.abs(c[v != 0]) - 1 >= 0).all()
    assert (np.abs(confidence(v, 0.5, "implicit")[v != 0]) - 1 < 0).any()
    with pytest.raises(ValueError, match="confidence"):
        confidence(v, 1.0, "bm25")  # type: ignore[arg-type]


def test_one_plus_fold_in_matches_implicit_given_confidences():
    """implicit, given the confidences and alpha 1, solves the same equations (bootstrap)."""
    rng = np.random.default_rng(8)
    y = (rng.standard_normal((50, 5)) * 0.5).astype(np.float32)
    rows = _rows(rng, 30, 50, 12)
    csr = sp.csr_matrix(
        (
            np.concatenate([v for _, v in rows]),
            (np.concatenate([np.full(len(c), u) for u, (c, _) in enumerate(rows)]),
             np.concatenate([c for c, _ in rows])),
        ),
        shape=(30, 50), dtype=np.float32,
    )  # fmt: skip
    csr.data = confidence(csr.data, 0.4, "one_plus").astype(np.float32)
    als = AlternatingLeastSquares(factors=5, regularization=0.2, alpha=1.0)
    als.item_factors = y
    want = als.recalculate_user(np.arange(30), csr)
    got = fold_in(y, gramian(y), rows, regularization=0.2, alpha=0.4, confidence_mode="one_plus")
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
