"""Pair-based live popularity: the engine against the replay's baseline, the owner's exact
counts, and the records that carry them."""

from __future__ import annotations

import dataclasses
import random
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from tests.kit import make_model
from worker.core.engine import Recommender
from worker.core.handler import Source, handle_batch
from worker.core.model import Model
from worker.core.popularity import (
    PopularityOwner,
    PopularityPair,
    PopularityUpdate,
    owner_counts_reference,
    pair_weight,
)
from worker.core.state import UserState, decode_record, encode_state, pair_flags, pair_of_flags
from worker.core.wire import RatingEvent
from worker.errors import DecodeError
from worker.eval.events import ACTIONS, EventTable
from worker.eval.variants import Popularity

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
HALF_LIFE_S = 1800.0


def _us(t: datetime) -> int:
    return int(t.timestamp()) * 1_000_000 + t.microsecond


def _unseeded(**kw: object) -> Model:
    """A model with no training popularity: what is left is the live part alone."""
    model = make_model(**kw)  # type: ignore[arg-type]
    videos = dataclasses.replace(model.videos, popularity=np.zeros(model.n_items, np.float32))
    return dataclasses.replace(model, videos=videos)


def _stream(k: int, seed: int = 3) -> list[RatingEvent]:
    rng = random.Random(seed)
    actions = ["view"] * 4 + ["like"] * 2 + ["neutral", "dislike"]
    out = []
    for i in range(k):
        action = rng.choice(actions)
        out.append(
            RatingEvent(
                event_id=f"e{i}",
                user_id=f"u{rng.randrange(30)}" if rng.random() < 0.5 else f"n{rng.randrange(30)}",
                video_id=f"v{rng.randrange(25)}"
                if rng.random() < 0.9
                else f"fresh{rng.randrange(3)}",
                action=action,
                watch_seconds=rng.uniform(10, 900) if action == "view" else None,
                ts=T0 + timedelta(seconds=37 * i),
            )
        )
    return out


def _table(events: list[RatingEvent], eng: Recommender) -> EventTable:
    users = sorted({e.user_id for e in events})
    videos = sorted({e.video_id for e in events})
    u, v = {x: i for i, x in enumerate(users)}, {x: i for i, x in enumerate(videos)}
    dur = [eng.catalog.duration_of(eng.catalog.ensure(x)) for x in videos]
    return EventTable(
        ts=np.array([_us(e.ts) for e in events], np.int64),
        user=np.array([u[e.user_id] for e in events], np.int32),
        video=np.array([v[e.video_id] for e in events], np.int32),
        action=np.array([ACTIONS.index(e.action) for e in events], np.int8),
        watch=np.array([e.watch_seconds if e.action == "view" else np.nan for e in events]),
        user_ids=users,
        video_ids=videos,
        duration_s=np.array([np.nan if d is None else d for d in dur], np.float64),
    )


def test_engine_popularity_equals_the_replay_baseline_on_the_same_stream() -> None:
    """Issue 13 item 2: the replay's popularity baseline is the definition (each positive
    pair counted once from when it became positive, taken back when it stops)."""
    events = _stream(1500)
    eng = Recommender(_unseeded(), popularity_half_life_s=HALF_LIFE_S)
    for e in events:
        eng.apply(e)
    table = _table(events, eng)
    w = eng.weights
    changes = table.positive_changes(w.positive_fraction, w.default_duration_s)
    assert (changes.sign < 0).sum() > 20  # the stream does take pairs back
    t0 = int(table.ts[0])
    base = Popularity(table.n_videos, t0_us=t0, half_life_us=HALF_LIFE_S * 1e6)
    base.add_changes(table, changes, len(table))
    now = int(table.ts[-1])
    want = base.counts * 2.0 ** (-(now - t0) / (HALF_LIFE_S * 1e6))
    got = eng.popularity_at(now)
    idx = [eng.catalog.items.get(v) for v in table.video_ids]
    np.testing.assert_allclose(got[idx], want, rtol=1e-9, atol=1e-9 * want.max())
    base.refresh()
    assert [table.video_ids[i] for i in base.order[:10]] == [
        eng.catalog.items.id_of(int(i)) for i in np.lexsort((np.arange(len(got)), -got))[:10]
    ]


def test_shared_counts_equal_the_reference_and_the_local_engine_bit_for_bit() -> None:
    """Two workers (users split by parity) send their pairs to one owner; a third engine
    installs the owner's counts. Its popularity is the reference's, and a worker that
    rebuilt the owner from the latest record per pair holds the same bits."""
    events = _stream(1200, seed=8)
    model = _unseeded()
    local = Recommender(model, popularity_half_life_s=HALF_LIFE_S)
    workers = [
        Recommender(model, popularity_half_life_s=HALF_LIFE_S, shared_popularity=True)
        for _ in range(2)
    ]
    owner = PopularityOwner(half_life_s=HALF_LIFE_S)
    log: list[PopularityPair] = []
    for n, e in enumerate(events):
        local.apply(e)
        eng = workers[int(e.user_id[1:]) % 2]
        handle_batch(eng, [(e, Source("r", 0, n))], (), now=T0)
        pairs = eng.take_popularity_pairs()
        log += pairs
        for p in pairs:
            owner.apply(p)
    updates = {u.video_id: u for u in owner.updates()}
    reader = Recommender(model, popularity_half_life_s=HALF_LIFE_S, shared_popularity=True)
    for u in updates.values():
        reader.install_popularity(PopularityUpdate.decode(u.encode()))
    now = _us(events[-1].ts)
    final = {(p.video_id, p.user_id): p.since_us for p in log}
    want = owner_counts_reference(
        [(v, s) for (v, _), s in final.items() if s is not None],
        half_life_s=HALF_LIFE_S,
        now_us=now,
    )
    got = reader.popularity_at(now)
    for v, x in want.items():
        assert got[reader.catalog.items.get(v)] == pytest.approx(x, rel=1e-12), v
    lv = local.popularity_at(now)
    for v in want:
        assert lv[local.catalog.items.get(v)] == pytest.approx(want[v], rel=1e-9, abs=1e-12)
    # A rebuilt owner (latest record per pair, in another order) publishes the same counts.
    rebuilt = PopularityOwner(half_life_s=HALF_LIFE_S)
    keyed = list({p.key(): p for p in log}.values())
    random.Random(1).shuffle(keyed)
    for p in keyed:
        rebuilt.apply(p)
    again = Recommender(model, popularity_half_life_s=HALF_LIFE_S, shared_popularity=True)
    for u in rebuilt.updates():
        again.install_popularity(u)
    mine = again.popularity_at(now)
    for v in want:
        assert mine[again.catalog.items.get(v)] == got[reader.catalog.items.get(v)], v
    # Shared engines count none of their own events.
    assert workers[0].popularity.values(now).sum() == 0.0


def test_owner_add_remove_and_replays_are_exact() -> None:
    owner = PopularityOwner(half_life_s=60.0)
    t = _us(T0)
    pairs = [PopularityPair("a", f"u{i}", t + i * 7_000_001) for i in range(50)]
    for p in pairs:
        owner.apply(p)
    first = owner.value("a")
    for p in pairs[::-1]:  # replayed: the latest state per key changes nothing
        assert not owner.apply(p)
    assert owner.value("a") == first
    owner.apply(PopularityPair("a", "late", t - 10**9))  # older than every pair
    owner.apply(PopularityPair("a", "late", None))  # ... and taken back
    assert owner.value("a") == first  # exactly, not up to rounding
    for p in pairs:
        owner.apply(PopularityPair(p.video_id, p.user_id, None))
    assert owner.value("a") == (0.0, 0)
    (update,) = owner.updates()
    assert update.value == 0.0 and update.pairs == 0 and update.seq == 1
    assert "a" not in owner.videos  # nothing kept for a video without positive pairs
    # value at its as-of equals the float sum of decayed weights
    owner.apply(PopularityPair("b", "x", t))
    owner.apply(PopularityPair("b", "y", t + 30_000_000))
    value, asof = owner.value("b")
    want = 2.0 ** ((t - asof) / 60e6) + 2.0 ** ((t + 30_000_000 - asof) / 60e6)
    assert value == pytest.approx(want, rel=1e-15)
    assert asof % 60_000_000 == 0  # on the grid of whole half-lives
    # No decay: a plain count.
    plain = PopularityOwner(half_life_s=0.0)
    for i in range(3):
        plain.apply(PopularityPair("c", f"u{i}", t))
    assert plain.value("c") == (3.0, 0)


def test_a_new_owner_continues_the_seq_it_saw() -> None:
    owner = PopularityOwner(half_life_s=60.0)
    owner.saw_update(PopularityUpdate("a", 1.0, 0, 7, 1))
    owner.apply(PopularityPair("a", "u", _us(T0)))
    (u,) = owner.updates()
    assert u.seq == 8
    assert owner.drop(lambda v: v != "a") == 1 and owner.pairs == 0


def test_pair_weight_is_exact_power_of_two_steps() -> None:
    hl = 3_600_000_000
    m, q = pair_weight(5 * hl + hl // 2, hl)
    assert q == 5 and m == int(np.ldexp(2.0**0.5, 52))
    assert pair_weight(123, 0) == (1 << 52, 0)


def test_records_round_trip_and_bad_ones_raise_decode_error() -> None:
    p = PopularityPair("v1", "u1", 1_700_000_000_000_000)
    assert PopularityPair.decode(p.key(), p.encode()) == p
    gone = PopularityPair("v1", "u1", None)
    assert gone.encode() is None  # a tombstone
    assert PopularityPair.decode(gone.key(), None) == gone
    u = PopularityUpdate("v1", 0.1 + 0.2, 3_600_000_000, 4, 2)
    back = PopularityUpdate.decode(u.encode())
    assert back == u and back.value.hex() == u.value.hex()
    for key, value in [
        (b"not json", None),
        (b'["v1"]', None),
        (b"[1, 2]", None),
        (p.key(), b"{"),
        (p.key(), b'{"v": 2, "since_us": 1}'),
        (p.key(), b'{"v": 1, "since_us": "1"}'),
        (p.key(), b'{"v": 1}'),
    ]:
        with pytest.raises(DecodeError):
            PopularityPair.decode(key, value)
    for raw in [
        None,
        b"[]",
        b'{"v": 1}',
        b'{"v": 1, "video_id": "a", "value": "zz", "asof_us": 0, "seq": 1, "pairs": 1}',
        b'{"v": 1, "video_id": "a", "value": "-0x1p+0", "asof_us": 0, "seq": 1, "pairs": 1}',
        b'{"v": 1, "video_id": "a", "value": "inf", "asof_us": 0, "seq": 1, "pairs": 1}',
        b'{"v": 1, "video_id": "a", "value": "0x1p+0", "asof_us": 0.5, "seq": 1, "pairs": 1}',
    ]:
        with pytest.raises(DecodeError):
            PopularityUpdate.decode(raw)


def test_pair_state_follows_pair_after_and_survives_the_changelog() -> None:
    eng = Recommender(_unseeded(), popularity_half_life_s=HALF_LIFE_S, shared_popularity=True)

    def at(n: int, action: str, watch: float | None = None) -> RatingEvent:
        return RatingEvent(
            event_id=f"p{n}", user_id="z", video_id="v3", action=action,
            watch_seconds=watch, ts=T0 + timedelta(minutes=n),
        )  # fmt: skip

    item = eng.catalog.items.get("v3")
    assert item is not None
    eng.apply(at(0, "view", 30.0), partition=0, offset=0)  # short view: not positive
    st = eng.users["z"]
    assert st.pairs[item] == pair_flags(None, False) and item not in st.since
    assert eng.take_popularity_pairs() == []
    eng.apply(at(1, "view", 590.0), partition=0, offset=1)  # reached: positive from now
    assert st.since[item] == _us(T0 + timedelta(minutes=1))
    assert eng.take_popularity_pairs() == [PopularityPair("v3", "z", st.since[item])]
    eng.apply(at(2, "like"), partition=0, offset=2)  # still positive, same since
    assert eng.take_popularity_pairs() == []
    eng.apply(at(3, "dislike"), partition=0, offset=3)  # the last reaction wins
    assert eng.take_popularity_pairs() == [PopularityPair("v3", "z", None)]
    eng.apply(at(4, "like"), partition=0, offset=4)
    assert pair_of_flags(st.pairs[item]) == ("like", True)
    raw = encode_state(st, eng.catalog.items.id_of)
    back = UserState.from_record(decode_record(raw), eng.catalog.ensure)
    assert back.pairs == st.pairs and back.since == st.since == {item: _us(at(4, "like").ts)}
    eng.take_popularity_pairs()
    # A replayed event (re-read after a restore) sends its pair's state again.
    eng.restore("z", decode_record(raw))
    eng.apply(at(4, "like"), partition=0, offset=4)
    assert eng.take_popularity_pairs() == [PopularityPair("v3", "z", back.since[item])]


def test_the_seed_decays_from_the_models_newest_training_event() -> None:
    model = make_model()
    newest = T0 - timedelta(hours=1)
    model = dataclasses.replace(
        model, manifest={"data_summary": {"event_time": {"max": newest.isoformat()}}}
    )
    eng = Recommender(model, popularity_half_life_s=HALF_LIFE_S)
    eng.apply(RatingEvent(event_id="s", user_id="q", video_id="v1", action="neutral", ts=T0))
    want = model.videos.popularity.astype(np.float64) * 0.25  # two half-lives later
    np.testing.assert_allclose(eng.popularity_values()[: model.n_items], want, rtol=1e-12)
