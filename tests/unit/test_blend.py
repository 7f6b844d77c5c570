"""The popularity blend: exact top-k of z(ALS score) + β·log1p(popularity), against a full sort."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest

from tests.kit import make_model
from tests.unit.test_engine import NOW, ev
from worker.core.als import ItemIndex, top_k, top_k_reference
from worker.core.blend import (
    augmented_index,
    blend_top_k,
    item_moments,
    top_k_blend_reference,
)
from worker.core.engine import Recommender
from worker.core.model import AlsParams
from worker.core.wire import RatingEvent, VideoEvent


def _data(seed: int, n_items: int, n_users: int = 12, f: int = 8):
    rng = np.random.default_rng(seed)
    # Skewed norms, as ALS items are, so the pruning has something to prune.
    y = (rng.standard_normal((n_items, f)) * rng.gamma(1.0, 0.3, (n_items, 1))).astype(np.float32)
    x = rng.standard_normal((n_users, f)).astype(np.float32)
    pop = rng.pareto(1.2, n_items) * 3.0
    exclude = [rng.choice(n_items, size=rng.integers(0, 30), replace=False) for _ in range(n_users)]
    return y, x, pop, exclude


def _fast(y, x, betas, pop, exclude, k=10):
    gram = (y.astype(np.float64).T @ y.astype(np.float64)).astype(np.float32)
    mean, cov = item_moments(y.astype(np.float64).sum(axis=0), gram, len(y))
    index = augmented_index(ItemIndex.build(y), np.log1p(pop).astype(np.float32))
    return blend_top_k(index, x, np.asarray(betas, dtype=np.float64), mean, cov, exclude, k)


def _assert_same(got, want, atol=1e-4):
    gi, gs = got
    wi, ws = want
    np.testing.assert_array_equal(gi, wi)
    np.testing.assert_allclose(gs, ws, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("n_items", [50, 700, 5000])
def test_blend_top_k_equals_the_full_sort(n_items: int) -> None:
    y, x, pop, exclude = _data(n_items, n_items)
    betas = np.array([0.0, 0.5, 2.0, 8.0, 30.0, 1.0] * 2)
    _assert_same(
        _fast(y, x, betas, pop, exclude), top_k_blend_reference(y, x, betas, pop, exclude, 10)
    )


def test_beta_zero_ranks_as_plain_top_k() -> None:
    y, x, pop, exclude = _data(3, 3000)
    got_items, _ = _fast(y, x, np.zeros(len(x)), pop, exclude)
    want_items, _ = top_k_reference(y, x, exclude, 10)
    np.testing.assert_array_equal(got_items, want_items)


def test_a_large_beta_ranks_by_popularity() -> None:
    y, x, pop, exclude = _data(4, 400)
    items, _ = _fast(y, x, np.full(len(x), 1e4), pop, exclude)
    for u in range(len(x)):
        allowed = np.setdiff1d(np.arange(len(y)), exclude[u])
        by_pop = allowed[np.argsort(-pop[allowed], kind="stable")][:10]
        np.testing.assert_array_equal(np.sort(items[u]), np.sort(by_pop))
    # The blend changes lists at ordinary weights (the test above is not vacuous).
    plain, _ = top_k(ItemIndex.build(y), x, exclude, 10)
    blended, _ = _fast(y, x, np.full(len(x), 2.0), pop, exclude)
    assert (plain != blended).any()


def test_item_moments_are_the_catalogue_mean_and_population_covariance() -> None:
    y, _, _, _ = _data(5, 300)
    gram = (y.astype(np.float64).T @ y.astype(np.float64)).astype(np.float32)
    mean, cov = item_moments(y.astype(np.float64).sum(axis=0), gram, len(y))
    np.testing.assert_allclose(mean, y.astype(np.float64).mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(cov, np.cov(y.astype(np.float64).T, bias=True), atol=1e-6)


def test_a_reused_augmented_index_follows_popularity_and_item_changes() -> None:
    y, x, pop, exclude = _data(6, 2500)
    betas = np.full(len(x), 3.0)
    base = ItemIndex.build(y)
    idx = augmented_index(base, np.log1p(pop).astype(np.float32))
    pop2 = pop.copy()
    pop2[::7] *= 40.0  # popularity moves: the same augmented index is rewritten in place
    idx2 = augmented_index(base, np.log1p(pop2).astype(np.float32), idx)
    assert idx2 is idx
    gram = (y.astype(np.float64).T @ y.astype(np.float64)).astype(np.float32)
    mean, cov = item_moments(y.astype(np.float64).sum(axis=0), gram, len(y))
    got = blend_top_k(idx2, x, betas, mean, cov, exclude, 10)
    _assert_same(got, top_k_blend_reference(y, x, betas, pop2, exclude, 10))


def _blend_model(beta_returning: float, beta_new: float):
    m = make_model(n_items=300, n_users=40, per_user=8)
    params = replace(m.params, blend_returning=beta_returning, blend_new=beta_new)
    return replace(m, params=params)


def _engine_reference(eng: Recommender, user: str, beta: float):
    st = eng.users[user]
    items, scores = top_k_blend_reference(
        eng.catalog.factors,
        st.factors[None, :],
        [beta],
        np.maximum(eng.popularity_values(), 0.0),
        [np.array(list(st.row), dtype=np.int64)],
        eng.k,
    )
    ids = [eng.catalog.items.id_of(int(i)) for i in items[0] if i >= 0]
    return ids, scores[0][: len(ids)]


def test_engine_lists_equal_the_reference_for_returning_and_new_users() -> None:
    eng = Recommender(_blend_model(6.0, 1.5))
    # Live popularity moves with events from many users; a new video is announced and refit.
    eng.register_video(
        VideoEvent(video_id="fresh", duration_seconds=60, category="cat1", author_id="a1",
                   published_at=NOW)
    )  # fmt: skip
    events = []
    for j in range(60):
        events.append(
            RatingEvent(event_id=f"e{j}", user_id=f"u{j % 25}", video_id=f"v{(j * 7) % 40}",
                        action="like", ts=NOW + timedelta(minutes=j))
        )  # fmt: skip
    events.append(ev("n1", "newbie", "v3", "like"))
    events.append(ev("n2", "newbie", "fresh", "like"))
    events.append(ev("r1", "u1", "fresh", "view", 50.0))
    for e in events:
        eng.apply(e)
    users = ["u1", "u2", "u7", "newbie"]
    lists = eng.recommend(users)
    for lst in lists:
        beta = 1.5 if lst.user_id == "newbie" else 6.0
        ids, scores = _engine_reference(eng, lst.user_id, beta)
        assert lst.strategy == "als" and lst.video_ids == ids
        np.testing.assert_allclose(lst.scores, scores, atol=1e-4)
    # A second batch after popularity and the new video moved: still the reference.
    eng.apply(ev("x", "u9", "fresh", "like"))
    eng.apply(ev("y", "u1", "v5", "like"))
    eng.apply(ev("z", "u2", "v6", "like"))
    before = eng.catalog.factors[eng.catalog.items.get("fresh")].copy()
    second = eng.recommend(["u1", "newbie", "u2"])
    assert not np.allclose(eng.catalog.factors[eng.catalog.items.get("fresh")], before)
    assert "fresh" in second[2].video_ids  # the refit video is ranked for u2
    for lst in second:
        ids, _ = _engine_reference(eng, lst.user_id, 1.5 if lst.user_id == "newbie" else 6.0)
        assert lst.video_ids == ids


def test_the_blend_changes_lists_and_zero_blend_is_the_plain_engine() -> None:
    plain = Recommender(_blend_model(0.0, 0.0))
    base = Recommender(make_model(n_items=300, n_users=40, per_user=8))
    blended = Recommender(_blend_model(8.0, 8.0))
    for e in [ev(f"e{j}", f"u{j % 5}", f"v{j % 9}", "like") for j in range(30)]:
        for eng in (plain, base, blended):
            eng.apply(e)
    users = [f"u{u}" for u in range(10)]
    a, b, c = (eng.recommend(users) for eng in (plain, base, blended))
    assert [x.video_ids for x in a] == [x.video_ids for x in b]
    assert [x.scores for x in a] == [x.scores for x in b]
    assert [x.video_ids for x in a] != [x.video_ids for x in c]


def test_blend_params_round_trip_and_validate() -> None:
    p = AlsParams(factors=4, regularization=0.1, alpha=2.0, blend_returning=8.0, blend_new=1.0)
    assert AlsParams.from_dict(p.to_dict()) == p
    old = {"factors": 4, "regularization": 0.1, "alpha": 2.0}  # a manifest from before the blend
    assert AlsParams.from_dict(old).blend_returning == 0.0
    with pytest.raises(ValueError, match="blend_new"):
        AlsParams.from_dict({**old, "blend_new": -1})
    with pytest.raises(ValueError, match="blend_returning"):
        AlsParams.from_dict({**old, "blend_returning": float("nan")})
