"""One definition of "positive" (issue 15 item 3): popularity, relevance and the engine's
rule (Weights.pair_after) agree, and a 3-star or 5-star MovieLens rating counts as one."""

from __future__ import annotations

import numpy as np
import pytest

from worker.core.scoring import PairState, Weights
from worker.eval.events import (
    DISLIKE,
    LIKE,
    NEUTRAL,
    VIEW,
    EventTable,
    positive_changes_reference,
)
from worker.eval.variants import Popularity, Relevance

_DUR = 100.0  # seconds, every video


def _table(rows: list[tuple[int, int, int, int, float]], n_users: int, n_videos: int) -> EventTable:
    """``(ts_s, user, video, action, watch_s)`` rows, already in time order."""
    ts, user, video, action, watch = zip(*rows, strict=True)
    return EventTable(
        ts=np.array(ts, dtype=np.int64) * 1_000_000,
        user=np.array(user, dtype=np.int32),
        video=np.array(video, dtype=np.int32),
        action=np.array(action, dtype=np.int8),
        watch=np.array([w if a == VIEW else np.nan for a, w in zip(action, watch, strict=True)]),
        user_ids=[f"u{i}" for i in range(n_users)],
        video_ids=[f"v{i}" for i in range(n_videos)],
        duration_s=np.full(n_videos, _DUR),
    )


def _movielens_like() -> EventTable:
    """Converted MovieLens: each rating is a view of rating/5 of the video plus a reaction."""
    return _table(
        [
            (1, 0, 0, VIEW, 60.0),  # 3 stars: a 0.6 view ...
            (1, 0, 0, NEUTRAL, 0.0),  # ... and a neutral: never positive
            (2, 1, 1, VIEW, 100.0),  # 5 stars: a full view ...
            (2, 1, 1, LIKE, 0.0),  # ... and a like: one positive pair, not two
            (3, 2, 0, VIEW, 80.0),  # a view alone: positive
            (4, 2, 2, LIKE, 0.0),  # a like, then a dislike: positive, then not
            (5, 2, 2, DISLIKE, 0.0),
            (6, 0, 1, DISLIKE, 0.0),  # a dislike, then a full view: the reaction wins
            (7, 0, 1, VIEW, 100.0),
        ],
        n_users=3,
        n_videos=3,
    )


def test_the_old_definitions_disagreed_and_the_new_one_is_shared() -> None:
    t = _movielens_like()
    frac = np.nan_to_num(t.fractions(_DUR), nan=0.0)
    # The old popularity rule (a like, or a view of >= half): the 3-star view counted and
    # the 5-star pair counted twice, while relevance (the last reaction) rejected the 3 stars.
    old = (t.action == LIKE) | ((t.action == VIEW) & (frac >= 0.5))
    assert old.tolist() == [True, False, True, True, True, True, False, False, True]
    ch = t.positive_changes(0.5, _DUR)
    got = list(
        zip(ch.idx.tolist(), ch.sign.tolist(), (ch.since_ts // 1_000_000).tolist(), strict=True)
    )
    # +1 at the 3-star view, -1 at its neutral (taking back the view's weight); one +1 for
    # the 5-star pair; +1 for the view alone; +1/-1 for like-then-dislike; none for the
    # dislike-then-view pair.
    assert got == [(0, 1, 1), (1, -1, 1), (2, 1, 2), (4, 1, 3), (5, 1, 4), (6, -1, 4)]
    assert [tuple(x) for x in got] == [
        (i, s, ts // 1_000_000) for i, s, ts in positive_changes_reference(t, Weights())
    ]
    pop = Popularity(3, t0_us=0, half_life_us=1e12)
    pop.add_changes(t, ch, len(t))
    pop.refresh()
    assert pop.active.tolist() == [1, 1, 0]  # video 0: user 2's view only; video 1: 5 stars
    assert pop.order.tolist() == [0, 1]  # one pair each; video 0's became positive later
    rel = Relevance.build(
        t, 1, len(t), positive_fraction=0.5, default_duration_s=_DUR,
        horizon_events=20, horizon_seconds=None,
    )  # fmt: skip
    positive = {
        (int(u), int(v)) for u, v, p in zip(rel.user, rel.video, rel.positive, strict=True) if p
    }
    assert positive == {(1, 1), (2, 0)}  # the 5-star pair and the view; not the like+dislike


def test_pair_state_is_the_engine_rule() -> None:
    w = Weights()
    s = w.pair_after(None, "view", 60.0, _DUR)
    assert s == PairState(None, True) and s.positive
    assert not w.pair_after(s, "neutral", None, _DUR).positive
    assert w.pair_after(w.pair_after(s, "neutral", None, _DUR), "like", None, _DUR).positive
    assert not w.pair_after(None, "view", 40.0, _DUR).positive
    assert not w.pair_after(w.pair_after(None, "dislike", None, _DUR), "view", 99.0, _DUR).positive
    assert w.pair_after(None, "view", 300.0, None).positive  # default duration 600 s: 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_changes_equal_the_one_event_at_a_time_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 3000
    action = rng.choice([VIEW, LIKE, NEUTRAL, DISLIKE], size=n, p=[0.55, 0.2, 0.15, 0.1])
    t = _table(
        list(
            zip(
                np.sort(rng.integers(0, 500, n)).tolist(),
                rng.integers(0, 15, n).tolist(),
                rng.integers(0, 12, n).tolist(),
                action.tolist(),
                rng.uniform(0, 120, n).round().tolist(),
                strict=True,
            )
        ),
        n_users=15,
        n_videos=12,
    )
    t.duration_s[3] = np.nan  # unknown: the default duration
    w = Weights(positive_fraction=0.6, default_duration_s=150.0)
    for lo, hi in [(0, -1), (700, 2400)]:
        ch = t.positive_changes(0.6, 150.0, lo, hi)
        got = list(zip(ch.idx.tolist(), ch.sign.tolist(), ch.since_ts.tolist(), strict=True))
        assert got == positive_changes_reference(t, w, lo, hi)
    # Popularity's active pairs are exactly the pairs positive at the end.
    states: dict[tuple[int, int], PairState] = {}
    for i in range(n):
        key = (int(t.user[i]), int(t.video[i]))
        a = ("view", "like", "neutral", "dislike")[int(t.action[i])]
        dur = None if key[1] == 3 else _DUR
        states[key] = w.pair_after(states.get(key), a, float(t.watch[i]), dur)
    want = np.zeros(12, dtype=np.int64)
    for (_, v), st in states.items():
        want[v] += st.positive
    pop = Popularity(12, t0_us=0, half_life_us=3e8)
    pop.add_changes(t, t.positive_changes(0.6, 150.0), n)
    assert pop.active.tolist() == want.tolist()
    assert np.all(pop.counts[want == 0] < 1e-9)
