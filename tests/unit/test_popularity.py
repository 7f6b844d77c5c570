"""Live popularity against the obviously correct per-event decay sum."""

from __future__ import annotations

import numpy as np
import pytest

from worker.core.popularity import LivePopularity, decayed_counts_reference

_H = 3_600_000_000  # one hour in µs


@pytest.mark.parametrize("half_life_s", [0.0, 60.0, 3600.0])
def test_decayed_counts_equal_the_reference(half_life_s: float) -> None:
    rng = np.random.default_rng(7)
    items = rng.integers(0, 30, size=400).tolist()
    ts = np.sort(rng.integers(0, 200 * _H, size=400)).tolist()  # far past the rescale bound
    pop = LivePopularity(5, half_life_s=half_life_s)  # grows past its initial size
    for i, t in zip(items[:200], ts[:200], strict=True):
        pop.add(i, t)
    pop.add_many(np.array(items[200:]), np.array(ts[200:]))
    now = ts[-1] + _H
    want = decayed_counts_reference(items, ts, 30, half_life_s=half_life_s, now_us=now)
    np.testing.assert_allclose(pop.values(now), want, rtol=1e-9, atol=1e-300)
    assert pop.value(3, now) == pytest.approx(want[3], rel=1e-9)
    assert pop.value(99, now) == 0.0
    # Counts that underflow to 0 in the reference (60 s half-life, hours ago) trail the order.
    ref = sorted(np.flatnonzero(want > 0).tolist(), key=lambda i: (-want[i], i))
    order = pop.order().tolist()
    assert order[: len(ref)] == ref
    assert set(order) <= set(items)


def test_a_shared_value_reads_back_decayed() -> None:
    pop = LivePopularity(3, half_life_s=3600.0)
    pop.set(2, 8.0, asof_us=10 * _H)
    assert pop.value(2, 12 * _H) == pytest.approx(2.0)  # two half-lives later
    pop.set(2, 8.0, asof_us=500 * _H)  # replaces, across a rescale
    assert pop.value(2, 501 * _H) == pytest.approx(4.0)
    assert pop.order().tolist() == [2]


def test_negative_half_life_is_refused() -> None:
    with pytest.raises(ValueError, match="half_life_s"):
        LivePopularity(1, half_life_s=-1.0)


def test_a_removed_pair_takes_back_exactly_its_weight() -> None:
    pop = LivePopularity(3, half_life_s=3600.0)
    pop.add(0, 1 * _H)
    pop.add(1, 2 * _H)
    pop.add(1, 3 * _H)
    pop.remove(1, 2 * _H)  # the pair counted at 2 h turned negative
    want = decayed_counts_reference([0, 1], [1 * _H, 3 * _H], 3, half_life_s=3600.0, now_us=4 * _H)
    np.testing.assert_allclose(pop.values(4 * _H), want, rtol=1e-12)
    pop.remove(0, 1 * _H)
    assert pop.value(0, 4 * _H) == 0.0
    assert pop.order().tolist() == [1]  # no residue keeps video 0 eligible


def test_events_far_older_than_the_reference_time_decay_away_without_overflow() -> None:
    """A replay's clock can start at a recent event (a worker's start-up probe) and then see
    events years older: their weights underflow towards 0 and nothing overflows."""
    pop = LivePopularity(4, half_life_s=60.0)
    recent = 1_000_000 * _H
    pop.add(0, recent)
    old = [recent - 2000 * _H + k * _H for k in range(5)]  # 120,000 half-lives earlier
    for t in old:
        pop.add(1, t)
    pop.add_many(np.array([2, 2]), np.array(old[:2]))
    now = recent
    want = decayed_counts_reference(
        [0, 1, 1, 1, 1, 1, 2, 2], [recent, *old, *old[:2]],
        4, half_life_s=60.0, now_us=now,
    )  # fmt: skip
    got = pop.values(now)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[1:], want[1:], atol=1e-300)  # decayed away: 0
    assert got[0] == pytest.approx(1.0)
