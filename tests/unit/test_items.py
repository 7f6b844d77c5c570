"""The shared item side (worker.core.items): the exact item solve against its reference,
the owner's state, the wire records, and engines that share new videos through an owner."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from tests.kit import make_model
from worker.core.als import gramian
from worker.core.engine import Recommender
from worker.core.items import (
    Contribution,
    ItemOwner,
    ItemUpdate,
    contribution_partition,
    item_solve,
    item_solve_reference,
)
from worker.core.wire import RatingEvent
from worker.errors import DecodeError

NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)


def ev(eid: str, user: str, video: str, action: str = "like", watch: float | None = None):
    return RatingEvent(
        event_id=eid, user_id=user, video_id=video, action=action, watch_seconds=watch, ts=NOW
    )


@pytest.mark.parametrize("mode", ["implicit", "one_plus"])
def test_item_solve_equals_the_full_item_side_system(mode: str) -> None:
    rng = np.random.default_rng(3)
    f = 4
    trained_ids = [f"u{j}" for j in range(7)]
    trained = rng.standard_normal((7, f)).astype(np.float32)
    # Two trained users with live factors that moved, one user new to the model, a dislike.
    live = {
        "u1": (2.0, rng.standard_normal(f).astype(np.float32)),
        "u4": (-1.5, rng.standard_normal(f).astype(np.float32)),
        "new": (0.3, rng.standard_normal(f).astype(np.float32)),
    }
    members = [
        (v, x, trained[trained_ids.index(u)] if u in trained_ids else None)
        for u, (v, x) in live.items()
    ]
    kw = {"regularization": 0.1, "alpha": 5.0, "confidence_mode": mode}
    got = item_solve(gramian(trained), members, **kw)  # type: ignore[arg-type]
    want = item_solve_reference(trained_ids, trained, live, **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # The trained factors of the audience matter: without the replacement it is another system.
    wrong = item_solve(gramian(trained), [(v, x, None) for v, x, _ in members], **kw)  # type: ignore[arg-type]
    assert not np.allclose(wrong, want, rtol=1e-4, atol=1e-6)


def test_records_round_trip_bit_for_bit_and_bad_ones_raise() -> None:
    x = np.array([0.1, -2.5e-8, 3.0, np.float32(1) / 3], dtype=np.float32)
    c = Contribution("vid", "usr", "m1", 1.25, x, event_ms=17)
    back = Contribution.decode(c.encode())
    assert back.factors.tobytes() == x.tobytes()
    assert (back.video_id, back.user_id, back.model_version, back.value, back.event_ms) == (
        "vid", "usr", "m1", 1.25, 17,
    )  # fmt: skip
    u = ItemUpdate("vid", "m1", 3, x, audience=2, event_ms=5)
    assert ItemUpdate.decode(u.encode()).factors.tobytes() == x.tobytes()
    assert ItemUpdate.decode(u.encode()).seq == 3
    for raw in (b"", b"[1]", b'{"v": 9}', b'{"v": 1, "video_id": "x"}'):
        with pytest.raises(DecodeError):
            Contribution.decode(raw)
        with pytest.raises(DecodeError):
            ItemUpdate.decode(raw)
    assert c.key() != Contribution("vi", "dusr", "m1", 1.0, x).key()  # no ambiguous joins


def test_contribution_partition_is_stable_and_spreads() -> None:
    ids = [f"video-{i}" for i in range(400)]
    parts = [contribution_partition(v, 4) for v in ids]
    assert parts == [contribution_partition(v, 4) for v in ids]
    assert set(parts) == {0, 1, 2, 3}
    assert all(contribution_partition(v, 1) == 0 for v in ids)


def _owner(model_version: str = "m1", f: int = 3) -> tuple[ItemOwner, np.ndarray]:
    trained = np.random.default_rng(0).standard_normal((5, f)).astype(np.float32)
    owner = ItemOwner(
        model_version=model_version,
        user_gram=gramian(trained),
        trained_of=lambda u: trained[int(u[1:])] if u.startswith("u") else None,
        regularization=0.1,
        alpha=2.0,
    )
    return owner, trained


def test_owner_keeps_the_latest_contribution_per_user_and_replays_change_nothing() -> None:
    owner, trained = _owner()
    x1, x2, x3 = (np.full(3, k, dtype=np.float32) for k in (0.5, -0.25, 1.0))
    assert owner.apply(Contribution("v", "u1", "m1", 1.0, x1))
    assert owner.apply(Contribution("v", "n9", "m1", 2.0, x2))
    first = owner.updates()
    assert [(u.video_id, u.seq, u.audience) for u in first] == [("v", 1, 2)]
    assert owner.updates() == []  # nothing changed since
    # A newer contribution of u1 replaces the older one; a replay of it changes nothing.
    owner.apply(Contribution("v", "u1", "m1", 3.0, x3))
    second = owner.updates()[0]
    owner.apply(Contribution("v", "u1", "m1", 3.0, x3))
    owner.apply(Contribution("v", "n9", "m1", 2.0, x2))
    again = owner.updates()[0]
    assert again.factors.tobytes() == second.factors.tobytes() and again.seq == 3
    want = item_solve_reference(
        [f"u{j}" for j in range(5)], trained, {"u1": (3.0, x3), "n9": (2.0, x2)},
        regularization=0.1, alpha=2.0,
    )  # fmt: skip
    np.testing.assert_allclose(again.factors, want, rtol=1e-4, atol=1e-6)
    # Value 0 takes a user out; another model version's contributions are ignored.
    owner.apply(Contribution("v", "n9", "m1", 0.0, x2))
    assert not owner.apply(Contribution("v", "u2", "m0", 5.0, x1))
    assert owner.updates()[0].audience == 1


def test_a_new_owner_continues_the_published_sequence_and_drops_revoked_videos() -> None:
    owner, _ = _owner()
    owner.saw_update(ItemUpdate("v", "m1", 41, np.zeros(3, np.float32), 1))
    owner.saw_update(ItemUpdate("v", "m0", 99, np.zeros(3, np.float32), 1))  # other model
    owner.apply(Contribution("v", "u1", "m1", 1.0, np.ones(3, np.float32)))
    owner.apply(Contribution("w", "u1", "m1", 1.0, np.ones(3, np.float32)))
    assert {u.video_id: u.seq for u in owner.updates()} == {"v": 42, "w": 1}
    assert owner.drop(lambda vid: vid == "w") == 1
    assert list(owner.videos) == ["w"] and owner.contributions == 1


def _share(engines: list[Recommender], owner: ItemOwner, users: list[list[str]]) -> None:
    """One round of the shared item side: each engine's contributions to the owner,
    the owner's updates installed in every engine (what Kafka carries in the worker)."""
    for eng, touched in zip(engines, users, strict=True):
        for c in eng.contributions(touched):
            owner.apply(c)
    for update in owner.updates():
        for eng in engines:
            eng.install_item_update(update)


def test_engines_sharing_new_videos_through_an_owner_hold_the_exact_solve() -> None:
    model = make_model()
    engines = [Recommender(model, shared_items=True) for _ in range(2)]
    owner = ItemOwner(
        model_version=model.version,
        user_gram=gramian(model.user_factors),
        trained_of=engines[0].trained_factors,
        regularization=model.params.regularization,
        alpha=model.params.alpha,
    )
    # Users of engine 0 (u1, u2, a new user) and engine 1 (u3) watch the new video "fresh".
    plan = [
        [ev("a", "u1", "fresh"), ev("b", "u2", "fresh", "view", 500.0), ev("c", "z1", "fresh")],
        [ev("d", "u3", "fresh", "dislike"), ev("e", "u3", "v5")],
    ]
    for eng, events in zip(engines, plan, strict=True):
        for e in events:
            eng.apply(e)
    touched = [sorted({e.user_id for e in events}) for events in plan]
    for eng, t in zip(engines, touched, strict=True):
        eng.recommend(t)
    _share(engines, owner, touched)
    a, b = (eng.new_item_factors()["fresh"] for eng in engines)
    assert a.tobytes() == b.tobytes()  # bit for bit in both engines
    live = {
        u: (eng.users[u].row[eng.catalog.items.get("fresh")], eng.users[u].factors)
        for eng, t in zip(engines, touched, strict=True)
        for u in t
    }
    want = item_solve_reference(
        list(model.users.ids), model.user_factors, live,  # type: ignore[arg-type]
        regularization=model.params.regularization, alpha=model.params.alpha,
    )  # fmt: skip
    np.testing.assert_allclose(a, want, rtol=1e-4, atol=1e-6)
    # A user of engine 1 who never touched "fresh" ranks with the shared vector.
    idx = engines[1].catalog.items.get("fresh")
    assert engines[1].catalog.factors[idx].tobytes() == a.tobytes()


def test_an_update_for_another_model_version_waits_for_that_swap() -> None:
    m1, m2 = make_model(version="m1"), make_model(version="m2", factor_seed=5)
    eng = Recommender(m1, shared_items=True)
    vec = np.arange(m1.item_factors.shape[1], dtype=np.float32)
    assert not eng.install_item_update(ItemUpdate("fresh", "m2", 1, vec, 1))
    assert "fresh" not in eng.new_item_factors() or not np.array_equal(
        eng.new_item_factors()["fresh"], vec
    )
    eng.swap_model(eng.prepare(m2))
    assert eng.new_item_factors()["fresh"].tobytes() == vec.tobytes()
    # A video the model trained keeps its trained factors.
    assert not eng.install_item_update(ItemUpdate("v3", "m2", 1, vec, 1))
    assert not np.array_equal(eng.catalog.factors[eng.catalog.items.get("v3")], vec)


def test_the_single_engine_refit_is_the_same_exact_solve() -> None:
    """Without sharing, an engine solves its new videos itself with item_solve: the same
    system as the owners (checked against the reference from the factors it used)."""
    model = make_model()
    eng = Recommender(model)
    for e in (ev("a", "u1", "fresh"), ev("b", "z1", "fresh", "view", 400.0)):
        eng.apply(e)
    eng.refresh(["u1", "z1"])  # fold in, solve "fresh", fold in again against it
    idx = eng.catalog.items.get("fresh")
    got = eng.catalog.factors[idx].copy()
    # Recompute from the first-pass factors: fold in the same rows against the prior.
    fresh = Recommender(model)
    for e in (ev("a", "u1", "fresh"), ev("b", "z1", "fresh", "view", 400.0)):
        fresh.apply(e)
    fresh.shared_items = True
    fresh.refresh(["u1", "z1"])
    live = {u: (fresh.users[u].row[idx], fresh.users[u].factors) for u in ("u1", "z1")}
    want = item_solve_reference(
        list(model.users.ids), model.user_factors, live,  # type: ignore[arg-type]
        regularization=model.params.regularization, alpha=model.params.alpha,
    )  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_contributions_of_the_next_model_wait_for_the_owner_to_swap() -> None:
    owner, _ = _owner("m1")
    x = np.ones(3, np.float32)
    assert not owner.apply(Contribution("v", "u1", "m2", 1.0, x))  # a worker swapped first
    owner.apply(Contribution("v", "u1", "m1", 2.0, x))
    nxt, _ = _owner("m2")
    assert owner.take_pending(nxt) == 1
    (update,) = nxt.updates()
    assert (update.model_version, update.audience) == ("m2", 1)
    assert owner.pending == {}
    # After the swap, late contributions of the old model (workers not swapped yet) are
    # not carried into the next swap: they never pile up.
    nxt.apply(Contribution("v", "u2", "m1", 1.0, x))
    last, _ = _owner("m3")
    assert nxt.take_pending(last) == 0
    assert last.pending == {} and last.n_videos == 0


def test_with_row_decay_the_item_side_takes_the_decayed_values_fold_in_used() -> None:
    """Row decay (issue 15) changes a user's confidences: the contributions carry the
    decayed value of the new video, and the single-engine refit solves with it too."""
    base = make_model()
    model = replace(base, params=replace(base.params, decay="items", decay_half_life=1.0))
    events = [
        ev("a", "u1", "fresh"),
        ev("b", "u1", "v7"),
        ev("c", "u1", "v8"),
        ev("d", "z1", "fresh"),
    ]
    events = [e.model_copy(update={"ts": NOW + timedelta(minutes=k)}) for k, e in enumerate(events)]
    shared = Recommender(model, shared_items=True)
    for e in events:
        shared.apply(e)
    shared.recommend(["u1", "z1"])
    got = {c.user_id: c.value for c in shared.contributions(["u1", "z1"])}
    idx = shared.catalog.items.get("fresh")
    for u in ("u1", "z1"):
        cols, vals = shared._fold_row(shared.users[u])
        assert got[u] == float(vals[list(cols).index(idx)])
    assert got["u1"] < shared.users["u1"].row[idx]  # two later items decayed it
    # The single engine's own refit uses the same values: equal to the reference with them.
    single = Recommender(model)
    for e in events:
        single.apply(e)
    single.refresh(["u1", "z1"])
    prior = Recommender(model, shared_items=True)
    for e in events:
        prior.apply(e)
    prior.refresh(["u1", "z1"])
    live = {u: (got[u], prior.users[u].factors) for u in ("u1", "z1")}
    want = item_solve_reference(
        list(model.users.ids), model.user_factors, live,  # type: ignore[arg-type]
        regularization=model.params.regularization, alpha=model.params.alpha,
    )  # fmt: skip
    np.testing.assert_allclose(single.catalog.factors[idx], want, rtol=1e-4, atol=1e-6)
