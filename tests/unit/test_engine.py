"""The engine and batch handler with in-memory state; the loop with a fake publisher."""

from __future__ import annotations

import gc
import json
import time
from datetime import datetime, timezone

import numpy as np
import pytest

from tests.kit import make_model
from worker.config import KafkaSettings, TopicSettings, WorkerSettings
from worker.core.als import fold_in
from worker.core.engine import Recommender
from worker.core.handler import Source, handle_batch
from worker.core.scoring import Weights
from worker.core.wire import RatingEvent, VideoEvent, decode_recommendations

NOW = datetime(2026, 11, 29, 10, tzinfo=timezone.utc)


def ev(
    eid: str, user: str, video: str, action: str = "like", watch: float | None = None
) -> RatingEvent:
    return RatingEvent(
        event_id=eid, user_id=user, video_id=video, action=action, watch_seconds=watch, ts=NOW
    )


def src(offset: int, partition: int = 0) -> Source:
    return Source("ratings", partition, offset)


def test_known_user_starts_from_bootstrap_row_and_factors():
    model = make_model()
    eng = Recommender(model)
    st = eng.state_of("u3")
    cols, vals = model.row_of(3)
    assert st.row == {int(c): pytest.approx(float(v)) for c, v in zip(cols, vals, strict=False)}
    np.testing.assert_array_equal(st.factors, model.user_factors[3])


def test_fold_in_after_event_equals_solve_of_full_row():
    model = make_model()
    eng = Recommender(model)
    eng.apply(ev("e1", "u3", "v100"))
    eng.recommend(["u3"])
    st = eng.users["u3"]
    cols = np.array(list(st.row), dtype=np.int64)
    vals = np.array(list(st.row.values()), dtype=np.float32)
    expected = fold_in(
        model.item_factors,
        model.item_factors.T @ model.item_factors,
        [(cols, vals)],
        regularization=model.params.regularization,
        alpha=model.params.alpha,
    )[0]
    np.testing.assert_allclose(st.factors, expected, rtol=1e-4, atol=1e-6)


def test_lists_exclude_watched_and_disliked():
    eng = Recommender(make_model())
    eng.apply(ev("a", "u1", "v2", "view", 30.0))
    eng.apply(ev("b", "u1", "v3", "dislike"))
    eng.apply(ev("c", "u1", "v4", "like"))
    (lst,) = eng.recommend(["u1"])
    assert lst.strategy == "als" and len(lst.video_ids) == 10
    assert not set(lst.video_ids) & {eng.catalog.items.id_of(i) for i in eng.users["u1"].row}
    assert lst.scores == sorted(lst.scores, reverse=True)


def test_new_user_popular_then_personal():
    eng = Recommender(make_model())
    eng.apply(ev("a", "new", "v1", "dislike"))
    (lst,) = eng.recommend(["new"])
    assert lst.strategy == "popular" and "v1" not in lst.video_ids
    eng.apply(ev("b", "new", "v5", "like"))
    (lst,) = eng.recommend(["new"])
    assert lst.strategy == "als" and not {"v1", "v5"} & set(lst.video_ids)


def test_popular_demotes_disliked_category():
    model = make_model()
    eng = Recommender(model)
    plain = eng.recommend(["fresh"])[0].video_ids
    top_cat = eng.catalog.category_of(eng.catalog.items.get(plain[0]))
    disliked = next(
        v
        for v in model.items.ids
        if eng.catalog.category_of(model.items.get(v)) == top_cat and v not in plain
    )
    eng.apply(ev("a", "fresh2", disliked, "dislike"))
    demoted = eng.recommend(["fresh2"])[0].video_ids
    cats = [eng.catalog.category_of(eng.catalog.items.get(v)) for v in demoted]
    assert cats.count(top_cat) < [
        eng.catalog.category_of(eng.catalog.items.get(v)) for v in plain
    ].count(top_cat)


def test_dedup_by_event_id_and_by_source_offset():
    eng = Recommender(make_model())
    assert eng.apply(ev("x", "u1", "v9"), partition=0, offset=5)
    assert not eng.apply(ev("x", "u1", "v9"), partition=0, offset=6)  # app retry, same id
    assert not eng.apply(ev("y", "u1", "v8"), partition=0, offset=5)  # replay at an applied offset
    assert eng.users["u1"].events_applied == 1


def test_dedup_window_keeps_the_newest_ids():
    eng = Recommender(make_model(), dedup_window=3)
    for i in range(5):
        eng.apply(ev(f"e{i}", "u1", "v1", "view", 10.0), partition=0, offset=i)
    assert list(eng.users["u1"].recent_ids) == ["e2", "e3", "e4"]
    assert not eng.users["u1"].seen("e1") and eng.users["u1"].seen("e4")


def test_user_state_is_one_object_for_the_garbage_collector():
    # Full collections walk every tracked object: a user must cost one, not three.
    eng = Recommender(make_model())
    eng.apply(ev("1", "u1", "v1", "like"), partition=0, offset=1)
    eng.recommend(["u1"])
    other = Recommender(make_model())
    other.restore("u1", eng.snapshot("u1"))
    for st in (eng.users["u1"], other.users["u1"]):
        assert gc.is_tracked(st)
        assert not gc.is_tracked(st.row) and not gc.is_tracked(st.recent_ids)
        assert not hasattr(st, "__dict__")


def test_row_is_order_independent():
    a, b = Recommender(make_model()), Recommender(make_model())
    events = [
        ev("1", "u", "v1", "view", 100.0),
        ev("2", "u", "v1", "like"),
        ev("3", "u", "v2", "dislike"),
    ]
    for e in events:
        a.apply(e)
    for e in reversed(events):
        b.apply(e)
    assert a.users["u"].row == pytest.approx(b.users["u"].row)


def test_new_video_prior_then_item_fold_in():
    eng = Recommender(make_model())
    idx = eng.register_video(
        VideoEvent(
            video_id="fresh", duration_seconds=60, category="cat1", author_id="a1", published_at=NOW
        )
    )
    prior = eng.catalog.factors[idx].copy()
    same = [
        i
        for i in range(eng.catalog.n_base)
        if eng.catalog.category_of(i) == eng.catalog.categories.get("cat1")
    ]
    assert np.linalg.norm(prior) > 0
    assert np.dot(prior, eng.catalog.factors[same].mean(axis=0)) > 0
    eng.apply(ev("a", "u1", "fresh", "like"))
    eng.recommend(["u1"])
    assert not np.allclose(eng.catalog.factors[idx], prior)  # refit from the interaction
    # A video nobody announced is accepted and counted.
    assert eng.apply(ev("b", "u2", "ghost", "view", 10.0))
    assert eng.catalog.items.get("ghost") is not None and eng.users["u2"].events_applied == 1 + 0


def test_handler_coalesces_users_and_reports():
    eng = Recommender(make_model())
    batch = [
        (ev("1", "u1", "v1"), src(0)),
        (ev("2", "u2", "v2"), src(1)),
        (ev("3", "u1", "v3"), src(2)),
        (ev("1", "u1", "v1"), src(3)),
    ]
    out = handle_batch(eng, batch, [], now=NOW)
    assert out.applied == 3 and out.duplicates == 1
    assert sorted(r.user_id for r in out.recommendations) == ["u1", "u2"]
    u1 = decode_recommendations(next(r for r in out.recommendations if r.user_id == "u1").payload)
    assert u1.event_ids == ["1", "3"] and u1.source.offset == 2 and u1.model_version == "test-v1"
    assert u1.events_applied == 2 and len(u1.items) == 10 and u1.last_event_ts == NOW


def test_fast_list_encoding_equals_the_pydantic_model():
    """The hot path's JSON is exactly what the wire model would serialise."""
    from worker.core.wire import Recommendations, encode, encode_recommendations

    kw = dict(
        user_id="u1",
        video_ids=["a", "b"],
        scores=[0.5, float("-inf")],
        model_version="m",
        strategy="als",
        generated_at=NOW,
        event_ids=["e1"],
        last_event_ts=NOW,
        source=("ratings", 1, 7),
        events_applied=3,
    )
    fast = encode_recommendations(**kw)
    model = decode_recommendations(fast)  # validates against the schema
    assert isinstance(model, Recommendations)
    assert fast == encode(model)
    tricky = dict(
        kw,
        user_id='us"er\\1',
        video_ids=["vidé/🙂", "q'\"x", "c"],
        scores=[1e-7, -123456789.125, float("nan")],
        generated_at="2026-11-29T10:00:00.123456Z",
        event_ids=["e\\1", "ë2"],
        last_event_ts=datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=timezone.utc),
        source=None,
        events_applied=0,
    )
    fast = encode_recommendations(**tricky)
    # Same JSON value (pydantic writes 1e-7 where Python writes 1e-07).
    assert json.loads(fast) == json.loads(encode(decode_recommendations(fast)))
    assert json.loads(fast)["items"][0]["video_id"] == "vidé/🙂"
    assert decode_recommendations(fast).user_id == 'us"er\\1'


def test_snapshot_restore_roundtrip():
    eng = Recommender(make_model())
    eng.apply(ev("1", "u1", "ghost", "like"), partition=2, offset=7)
    rec = eng.snapshot("u1")
    other = Recommender(make_model())
    other.restore("u1", rec)
    assert other.users["u1"].events_applied == eng.users["u1"].events_applied
    assert other.users["u1"].offset == 7 and other.users["u1"].seen("1")
    assert other.recommend(["u1"])[0].video_ids == eng.recommend(["u1"])[0].video_ids


def test_model_swap_keeps_rows_and_refolds():
    eng = Recommender(make_model())
    eng.apply(ev("1", "u1", "v1", "like"))
    eng.recommend(["u1"])
    row_before = {eng.catalog.items.id_of(i): v for i, v in eng.users["u1"].row.items()}
    eng.swap_model(make_model(seed=5, version="test-v2"))
    assert eng.model_version == "test-v2" and eng.state_of("u1").factors is None
    assert {eng.catalog.items.id_of(i): v for i, v in eng.users["u1"].row.items()} == row_before
    assert eng.recommend(["u1"])[0].strategy == "als"


def _video(video_id: str, category: str = "cat1", author: str = "a1", duration: float = 60):
    return VideoEvent(
        video_id=video_id,
        duration_seconds=duration,
        category=category,
        author_id=author,
        published_at=NOW,
    )


def _swap_scenario(m2_version: str = "test-v2"):
    """An engine with live users, announced videos (one only seen in ratings) and
    interactions with them, plus the model to swap to (which knows none of them)."""
    m1 = make_model()
    m1.item_factors[7] = 0.0  # untrained in m1: a new video there
    m2 = make_model(seed=0, factor_seed=5, version=m2_version)
    eng = Recommender(m1)
    eng.register_video(_video("fresh", duration=40))
    eng.register_video(_video("fresh2", category="cat2", author="a9"))
    eng.register_video(_video("fresh", duration=80))  # an update: the latest one counts
    rng = np.random.default_rng(3)
    vids = [f"v{i}" for i in range(120)] + ["fresh", "fresh2", "ghost"]
    n = 0
    for u in range(25):
        for _ in range(4):
            act = ["like", "dislike", "neutral", "view"][rng.integers(4)]
            watch = float(rng.uniform(1, 90)) if act == "view" else None
            eng.apply(
                ev(f"e{n}", f"u{u}", vids[rng.integers(len(vids))], act, watch),
                partition=u % 3,
                offset=n,
            )
            n += 1
        eng.apply(
            ev(f"e{n}", f"u{u}", ["fresh", "fresh2", "v7", "ghost"][u % 4], "like"),
            partition=u % 3,
            offset=n,
        )
        n += 1
    eng.apply(ev(f"e{n}", "newbie", "v3", "dislike"), partition=0, offset=n)
    eng.recommend([f"u{u}" for u in range(25)] + ["newbie"])
    return eng, m2


def _lists(eng: Recommender, users: list[str]) -> dict[str, tuple[str, list[str], list[float]]]:
    return {lst.user_id: (lst.strategy, lst.video_ids, lst.scores) for lst in eng.recommend(users)}


@pytest.mark.parametrize("settled", [False, True], ids=["moved-on-use", "settled"])
def test_model_swap_equals_a_restart_on_the_new_model(settled: bool):
    """Reference: a fresh engine on the new model that reads the ``videos`` topic and
    restores every user from their changelog record, as a restarted worker does.
    Users move to the new catalog on use, or all at once by ``settle`` (as the worker's
    loop does a few per turn)."""
    eng, m2 = _swap_scenario()
    users = [f"u{u}" for u in range(25)] + ["newbie"]
    records = {u: eng.snapshot(u) for u in users}
    restarted = Recommender(m2)
    restarted.register_video(_video("fresh", duration=40))
    restarted.register_video(_video("fresh2", category="cat2", author="a9"))
    restarted.register_video(_video("fresh", duration=80))
    for u, rec in records.items():
        restarted.restore(u, rec)

    eng.swap_model(m2)
    assert eng.users == {} and eng.n_live_users == eng.unsettled == len(users)  # set aside
    if settled:
        assert eng.settle(10) == 10 and eng.unsettled == len(users) - 10
        while eng.settle(7):
            pass
        assert eng.unsettled == 0 and len(eng.users) == len(users) and not eng._older
    # u0 first, alone: the refit of "fresh" it liked must still see every user who
    # interacted with it, though none of them has been moved over yet.
    for batch in (["u0"], users):
        got, want = _lists(eng, batch), _lists(restarted, batch)
        assert got.keys() == want.keys()
        for u in batch:
            assert got[u][0] == want[u][0] and got[u][1] == want[u][1], u
            np.testing.assert_allclose(got[u][2], want[u][2], rtol=1e-4, atol=1e-6)
    # The announced videos kept their metadata (the latest announcement) and factors.
    for vid in ("fresh", "fresh2", "ghost"):
        i, j = eng.catalog.items.get(vid), restarted.catalog.items.get(vid)
        assert i is not None and j is not None, vid
        assert eng.catalog.duration_of(i) == restarted.catalog.duration_of(j)
        np.testing.assert_allclose(
            eng.catalog.factors[i], restarted.catalog.factors[j], rtol=1e-4, atol=1e-6
        )
    assert eng.catalog.duration_of(eng.catalog.items.get("fresh")) == 80
    assert eng.n_live_users == len(users) and not eng._older


def test_prepared_swap_equals_the_in_place_swap_and_sees_later_announcements():
    a, m2 = _swap_scenario()
    b, _ = _swap_scenario()
    prepared = b.prepare(m2)  # what the worker's loader thread builds while b serves
    b.register_video(_video("late", category="cat3", author="a2"))
    b.apply(ev("late-1", "u1", "late", "like"))
    a.register_video(_video("late", category="cat3", author="a2"))
    a.apply(ev("late-1", "u1", "late", "like"))
    a.swap_model(m2)
    b.swap_model(prepared)
    users = [f"u{u}" for u in range(25)] + ["newbie"]
    assert b.catalog.duration_of(b.catalog.items.get("late")) == 60
    assert _lists(a, users) == _lists(b, users)


def test_a_prepared_swap_installs_its_weights_and_none_keeps_the_current_ones():
    eng = Recommender(make_model(), weights=Weights(like=1.5))
    eng.swap_model(eng.prepare(make_model(version="test-v2")))
    eng.apply(ev("a", "zz", "v100", "like"))
    eng.swap_model(eng.prepare(make_model(version="test-v3"), weights=Weights(like=3.0)))
    eng.apply(ev("b", "zz", "v101", "like"))
    row = eng.state_of("zz").row
    assert row[eng.catalog.items.get("v100")] == 1.5 and row[eng.catalog.items.get("v101")] == 3.0


def test_users_set_aside_by_a_swap_are_counted_forgotten_and_restored():
    eng, m2 = _swap_scenario()
    eng.swap_model(m2)
    eng.state_of("u1")  # moved over
    assert eng.n_live_users == 26 and len(eng.users) == 1
    gone = [u for u, st in eng.live_users() if st.partition == 0]
    eng.forget(gone)
    assert eng.n_live_users == 26 - len(gone) and "u0" not in dict(eng.live_users())
    assert "u0" not in eng.users and eng.state_of("u0").events_applied == 0  # bootstrap again
    rec = eng.snapshot("u2")
    eng.restore_lazy({"u2": json.dumps(rec).encode()})
    assert "u2" not in dict(eng.live_users()) and eng.state_of("u2").events_applied == 5
    eng.swap_model(make_model(version="test-v3"))  # a second swap before everyone moved
    assert eng.state_of("u5").events_applied == 5 and eng.model_version == "test-v3"


def test_group_sums_equal_the_reference():
    from worker.core.catalog import _group_sums, group_sums_reference

    rng = np.random.default_rng(0)
    factors = rng.standard_normal((500, 8)).astype(np.float32)
    for codes in (
        rng.integers(-1, 7, 500),
        rng.integers(0, 300, 500),
        np.full(500, -1),
        np.zeros(500, dtype=np.int64),
    ):
        codes = codes.astype(np.int32)
        got, want = _group_sums(factors, codes), group_sums_reference(factors, codes)
        assert got.keys() == want.keys()
        for c in want:
            np.testing.assert_allclose(got[c][0], want[c][0], rtol=1e-5, atol=1e-5)
            assert got[c][1] == want[c][1]


class FakePublisher:
    """Records sends; confirm() marks them acknowledged (pure-logic unit test only)."""

    def __init__(self, log: list[str]) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, object]] = []
        self.log = log

    def send(self, topic, *, key, value, headers=None, partition=None):
        self.sent.append((topic, key, value, headers))
        self.log.append(f"send:{topic}")

    def confirm(self, timeout_s: float = 30.0) -> list:
        self.log.append("confirm")
        return []


class FakeConsumer:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.committed = None

    def commit(self, offsets, asynchronous):
        self.committed = {(tp.topic, tp.partition): tp.offset for tp in offsets}
        self.log.append("commit" if asynchronous else "commit-sync")

    def get_watermark_offsets(self, tp, cached):
        return -1, -1


class Rec:
    """A consumed record with confluent-kafka's accessors."""

    def __init__(self, offset: int, value: bytes, key: bytes | None) -> None:
        self._offset, self._value, self._key = offset, value, key

    def topic(self):
        return "ratings"

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def key(self):
        return self._key

    def value(self):
        return self._value

    def timestamp(self):
        return 1, 0

    def error(self):
        return None


def test_loop_checkpoint_order_and_dead_letters():
    from worker.loop import Worker

    log: list[str] = []
    w = Worker(
        settings=WorkerSettings(), kafka=KafkaSettings(), topics=TopicSettings(), model=make_model()
    )
    w.publisher = FakePublisher(log)  # type: ignore[assignment]
    w.consumer = FakeConsumer(log)  # type: ignore[assignment]
    w.owned = {0}
    good = ev("g1", "u1", "v1").model_dump_json().encode()
    batch = [Rec(10, b"garbage", b"u1"), Rec(11, good, b"u1"), Rec(12, good, b"someone-else")]
    w.process(batch)  # type: ignore[arg-type]
    topics = [t for t, *_ in w.publisher.sent]
    assert topics.count("ratings.dlq") == 2
    # lists, dead letters and state queued -> one confirm -> commit
    assert log.index("send:recommendations") < log.index("confirm")
    assert log.index("send:refold.state-changelog") < log.index("confirm")
    assert log.count("confirm") == 1 and log[-1] == "commit" and log[-2] == "confirm"
    assert w.consumer.committed == {("ratings", 0): 13}
    rec = next(v for t, _, v, _ in w.publisher.sent if t == "recommendations")
    assert decode_recommendations(rec).event_ids == ["g1"]
    headers = [dict(h) for t, _, _, h in w.publisher.sent if t == "ratings.dlq"]
    assert {h["refold.error.type"] for h in headers} == {b"invalid_json", b"key_mismatch"}


def test_offsets_are_committed_at_most_once_per_interval_and_on_revocation():
    from worker.loop import Worker

    log: list[str] = []
    w = Worker(
        settings=WorkerSettings(commit_interval_ms=60_000, durable=False),
        kafka=KafkaSettings(),
        topics=TopicSettings(),
        model=make_model(),
    )
    w.publisher = FakePublisher(log)  # type: ignore[assignment]
    w.consumer = FakeConsumer(log)  # type: ignore[assignment]
    w.owned = {0}
    good = [ev(f"g{i}", "u1", "v1").model_dump_json().encode() for i in range(3)]
    w.process([Rec(0, good[0], b"u1")])  # type: ignore[list-item]
    assert log.count("commit") == 1 and w.consumer.committed == {("ratings", 0): 1}
    w.process([Rec(1, good[1], b"u1")])  # type: ignore[list-item]
    w.process([Rec(2, good[2], b"u1")])  # type: ignore[list-item]
    assert log.count("commit") == 1, "a second commit inside the interval"
    assert log.count("confirm") == 3, "every batch is still acknowledged before the next"
    w.on_revoked({0})  # a rebalance: what was acknowledged is committed before it happens
    assert log[-1] == "commit-sync" and w.consumer.committed == {("ratings", 0): 3}
    w._commit(force=True)
    assert log.count("commit-sync") == 1, "nothing left to commit for a revoked partition"


class SlowPublisher(FakePublisher):
    """Acknowledges after ``delay_s``, as a busy broker does."""

    def __init__(self, log: list[str], delay_s: float) -> None:
        super().__init__(log)
        self.delay_s = delay_s

    def confirm(self, timeout_s: float = 30.0) -> list:
        time.sleep(self.delay_s)
        return super().confirm(timeout_s)


class TimedRec(Rec):
    def __init__(self, offset: int, value: bytes, key: bytes | None, ts_ms: int) -> None:
        super().__init__(offset, value, key)
        self._ts_ms = ts_ms

    def timestamp(self):
        return 1, self._ts_ms


def test_latency_metrics_split_the_wait_before_the_worker_from_the_acknowledgement():
    from worker.loop import Worker

    log: list[str] = []
    w = Worker(
        settings=WorkerSettings(durable=False),
        kafka=KafkaSettings(),
        topics=TopicSettings(),
        model=make_model(),
    )
    w.publisher = SlowPublisher(log, delay_s=0.03)  # type: ignore[assignment]
    w.consumer = FakeConsumer(log)  # type: ignore[assignment]
    w.owned = {0}
    now_ms = int(time.time() * 1000)
    batch = [
        TimedRec(0, ev("a", "u1", "v1").model_dump_json().encode(), b"u1", now_ms - 400),
        TimedRec(1, ev("b", "u2", "v2").model_dump_json().encode(), b"u2", now_ms - 200),
        TimedRec(2, b"garbage", b"u3", now_ms - 100),  # dead-lettered, but it waited too
        TimedRec(3, ev("c", "u4", "v1").model_dump_json().encode(), b"u4", 0),  # no timestamp
    ]
    w.process(batch)  # type: ignore[arg-type]

    def sample(name: str) -> float:
        value = w.metrics.registry.get_sample_value(name)
        assert value is not None, name
        return value

    assert sample("refold_event_wait_seconds_count") == 3
    waited = sample("refold_event_wait_seconds_sum")
    assert 0.7 <= waited < 0.7 + 3 * 0.5, waited  # 0.4 + 0.2 + 0.1 s, plus the test's own time
    assert sample("refold_publish_confirm_seconds_count") == 1
    confirm = sample("refold_publish_confirm_seconds_sum")
    assert confirm >= 0.03
    assert sample("refold_batch_seconds_sum") >= confirm
    # The list of the oldest event waited its 400 ms and then the acknowledgement.
    assert sample("refold_end_to_end_latency_seconds_sum") >= 0.4 + 0.2 + 0.03 * 2


def test_videos_without_training_interactions_start_from_their_content_prior():
    model = make_model()
    model.item_factors[7] = 0.0  # metadata-only video: the trainer never saw it
    eng = Recommender(model)
    assert 7 in eng.catalog.new
    prior = eng.catalog.factors[7].copy()
    assert np.linalg.norm(prior) > 0
    eng.apply(ev("a", "u1", "v7", "like"))
    eng.recommend(["u1"])
    assert not np.allclose(eng.catalog.factors[7], prior)  # refit from the interaction


def test_changelog_record_roundtrip_binary_and_json():
    """The binary changelog value carries the whole state; the older JSON form still reads."""
    import json

    from worker.core.state import RecordError, decode_record, encode_record, encode_state

    eng = Recommender(make_model())
    eng.apply(ev("e1", "u1", "ghost", "like"), partition=3, offset=41)
    eng.apply(ev("e2", "u1", "v2", "dislike"), partition=3, offset=42)
    st = eng.users["u1"]
    rec = eng.snapshot("u1")
    raw = encode_state(st, eng.catalog.items.id_of)
    assert encode_record(rec) == raw
    back = decode_record(raw)
    assert {k: back[k] for k in rec if k != "v"} == {k: rec[k] for k in rec if k != "v"}
    assert decode_record(json.dumps(rec).encode())["recent_ids"] == ["e1", "e2"]
    empty = decode_record(
        encode_record(
            {
                **rec,
                "videos": [],
                "values": [],
                "recent_ids": [],
                "times": [],
                "pairs": [],
                "since": [],
            }
        )
    )
    assert empty["videos"] == [] and empty["recent_ids"] == []
    for bad in (raw[:-30], b"XX" + raw[2:], raw[:5]):
        with pytest.raises(RecordError):
            decode_record(bad)


def test_replayed_events_republish_the_list_but_change_nothing():
    """A crash after the state was saved but before a list was acknowledged loses no list."""
    eng = Recommender(make_model())
    first = handle_batch(
        eng, [(ev("e1", "u1", "v1", "like"), Source("ratings", 0, 5))], (), now=NOW
    )
    row = dict(eng.users["u1"].row)
    again = handle_batch(
        eng,
        [
            (ev("e1", "u1", "v1", "like"), Source("ratings", 0, 5)),  # re-read after a restart
            (ev("e1", "u1", "v1", "like"), Source("ratings", 0, 6)),  # an app's retry
        ],
        (),
        now=NOW,
    )
    assert (again.applied, again.replayed, again.duplicates) == (0, 1, 1)
    assert again.changed_users == [] and eng.users["u1"].row == row
    assert [r.user_id for r in again.recommendations] == ["u1"]
    assert again.recommendations[0].payload == first.recommendations[0].payload


def test_refresh_ranks_with_factors_solved_against_the_refit_new_videos():
    """Issue 15 item 3: after a refresh that refits a new video, the touched user's
    factors are the exact fold-in against the refit item vectors, not the old ones."""
    eng = Recommender(make_model())
    idx = eng.register_video(
        VideoEvent(
            video_id="fresh", duration_seconds=60, category="cat1", author_id="a1", published_at=NOW
        )
    )
    eng.apply(ev("a", "u1", "fresh", "like"))
    eng.apply(ev("b", "u2", "fresh", "like"))
    prior = eng.catalog.factors[idx].copy()
    eng.recommend(["u1", "u2"])
    assert not np.allclose(eng.catalog.factors[idx], prior)  # refit
    p = eng.model.params
    for u in ("u1", "u2"):
        st = eng.users[u]
        cols = np.array(list(st.row), dtype=np.int64)
        vals = np.array(list(st.row.values()), dtype=np.float32)
        y = eng.catalog.factors
        want = fold_in(y, y.T @ y, [(cols, vals)], regularization=p.regularization, alpha=p.alpha)
        np.testing.assert_allclose(st.factors, want[0], rtol=1e-4, atol=1e-6)


def test_live_popularity_counts_positive_events_and_ranks_cold_start_lists():
    """Issue 13 item 2 (per worker): cold-start lists follow the model's popularity, decayed,
    plus every positive event applied (Weights.is_positive); new videos grow it."""
    from datetime import timedelta

    from worker.core.popularity import decayed_counts_reference

    model = make_model()
    half_life = 3600.0
    eng = Recommender(model, popularity_half_life_s=half_life)
    assert eng.recommend(["nobody"])[0].video_ids[:3] == [
        model.items.id_of(int(i)) for i in np.argsort(-model.videos.popularity, kind="stable")[:3]
    ]
    least = model.items.id_of(int(np.argmin(model.videos.popularity)))
    events, t0 = [], NOW
    for n in range(40):
        t = t0 + timedelta(minutes=n)
        video = least if n % 2 else "ghost"
        events.append(RatingEvent(event_id=f"p{n}", user_id=f"x{n}", video_id=video,
                                  action="like", ts=t))  # fmt: skip
    # Not positive: a dislike, a neutral and a short view count for nothing.
    for n, (action, watch) in enumerate([("dislike", None), ("neutral", None), ("view", 5.0)]):
        events.append(RatingEvent(event_id=f"n{n}", user_id="y", video_id="v0", action=action,
                                  watch_seconds=watch, ts=t0 + timedelta(hours=1)))  # fmt: skip
    for e in events:
        assert eng.apply(e)
    now_us = int((t0 + timedelta(hours=1)).timestamp() * 1e6)
    pos = [e for e in events if e.action == "like"]
    want = decayed_counts_reference(
        [eng.catalog.items.get(e.video_id) for e in pos],  # type: ignore[misc]
        [int(e.ts.timestamp() * 1e6) for e in pos],
        len(eng.catalog), half_life_s=half_life, now_us=now_us,
    )  # fmt: skip
    want[: model.n_items] += model.videos.popularity * 2.0 ** (
        -(now_us - int(t0.timestamp() * 1e6)) / (half_life * 1e6)
    )
    np.testing.assert_allclose(eng.popularity_values(), want, rtol=1e-9)
    top = eng.recommend(["nobody2"])[0]
    assert top.strategy == "popular"
    assert set(top.video_ids[:2]) == {"ghost", least}  # the new video grew the ranking
    order = np.lexsort((np.arange(len(want)), -want))[: len(top.video_ids)]
    assert top.video_ids == [eng.catalog.items.id_of(int(i)) for i in order]
    np.testing.assert_allclose(top.scores, want[order], rtol=1e-6)
    # A model swap starts again from the new model's popularity (ghost is new to it too).
    eng.swap_model(make_model(version="m2", seed=7))
    got = eng.popularity_values()
    new_pop = eng.model.videos.popularity.astype(np.float64)
    np.testing.assert_allclose(got[: len(new_pop)], new_pop, rtol=1e-9)
    assert got[len(new_pop) :].sum() == 0


def test_live_popularity_without_decay_is_a_plain_count():
    model = make_model()
    eng = Recommender(model, popularity_half_life_s=0)
    from datetime import timedelta

    for n in range(5):
        eng.apply(RatingEvent(event_id=f"e{n}", user_id=f"z{n}", video_id="v3", action="like",
                              ts=NOW + timedelta(days=n)))  # fmt: skip
    assert eng.popularity_values()[3] == model.videos.popularity[3] + 5
