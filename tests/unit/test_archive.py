"""The archive's pure core: roll decisions, offset spans, resume points, dedup (against a
slow reference and the worker's own engine), retention and the summary."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import pytest

from tests.kit import make_model
from worker.core.archive import (
    Archiver,
    Dedup,
    RollMeta,
    Span,
    expired_rolls,
    incomplete_rolls,
    next_seq,
    overlapping_spans,
    resume_offsets,
    roll_name,
    summarize,
)
from worker.core.engine import Recommender
from worker.core.wire import RatingEvent, VideoEvent, encode

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
AT = datetime(2026, 11, 2, 12, 0, tzinfo=timezone.utc)
R, V = "ratings", "videos"


def rating(i: int, user: str = "u1", action: str = "view", eid: str | None = None) -> bytes:
    return encode(
        RatingEvent(
            event_id=eid or f"e{i}",
            user_id=user,
            video_id=f"v{i % 7}",
            action=action,  # type: ignore[arg-type]
            watch_seconds=30.0 if action == "view" else None,
            ts=T0 + timedelta(seconds=i),
        )
    )


def video(vid: str) -> bytes:
    return encode(
        VideoEvent(
            video_id=vid, duration_seconds=60.0, category="c", author_id="a", published_at=T0
        )
    )


def archiver(**kw: object) -> Archiver:
    args: dict = {"ratings_topic": R, "videos_topic": V, "dedup_window": 1000}
    args |= {"roll_rows": 3, "roll_seconds": 10.0, **kw}
    return Archiver(**args)


def meta(
    roll: str, seq: int, spans: list[tuple[int, int, int]], max_day: int = 0, topic: str = R
) -> RollMeta:
    return RollMeta(
        roll=roll,
        seq=seq,
        topic=topic,
        kinds=("logs",),
        spans=tuple(Span(topic, p, a, b) for p, a, b in spans),
        rows={"logs": sum(b - a + 1 for _, a, b in spans)},
        min_ts=T0 + timedelta(days=max_day) - timedelta(hours=1),
        max_ts=T0 + timedelta(days=max_day),
    )


# ---- rolls ---------------------------------------------------------------------------------


def test_roll_is_due_by_rows_or_by_age_of_its_first_row() -> None:
    a = archiver()
    assert not a.should_roll(R, 0.0) and a.seconds_to_roll(0.0) is None
    a.offer(R, 0, 0, b"u1", rating(0), now=100.0)
    assert not a.should_roll(R, 105.0)
    assert a.seconds_to_roll(105.0) == pytest.approx(5.0)
    assert a.should_roll(R, 110.0)  # roll_seconds after the first row
    a.offer(R, 0, 1, b"u1", rating(1), now=101.0)
    a.offer(R, 0, 2, b"u1", rating(2), now=102.0)
    assert a.should_roll(R, 102.0)  # roll_rows reached
    assert not a.should_roll(V, 102.0)


def test_invalid_and_duplicate_messages_never_start_a_roll_but_join_the_next() -> None:
    a = archiver()
    assert a.offer(R, 0, 0, None, b"not json", now=0.0)[0] == "invalid"
    assert a.offer(R, 0, 1, b"u1", rating(1), now=0.0)[0] == "archived"
    assert a.offer(R, 0, 2, b"u1", rating(9, eid="e1"), now=0.0)[0] == "duplicate"
    a.take(R, 1, AT)
    assert a.offer(R, 0, 3, b"u2", rating(3), now=0.0)[0] == "invalid"  # key != user_id
    assert a.offer(R, 0, 4, b"u1", rating(4, eid="e1"), now=0.0)[0] == "duplicate"
    assert not a.should_roll(R, 1e9) and a.take(R, 2, AT) is None
    a.offer(R, 0, 5, b"u1", rating(5), now=0.0)
    roll = a.take(R, 2, AT)
    assert roll is not None and roll.meta.spans == (Span(R, 0, 3, 5),)
    assert a.counts.invalid == {"invalid_json": 1, "key_mismatch": 1}
    assert a.counts.duplicate == 2 and a.counts.archived == 2


def test_take_splits_rows_by_kind_and_records_spans_per_partition() -> None:
    a = archiver(roll_rows=100)
    a.offer(R, 0, 10, b"u1", rating(0, "u1", "view"), now=0.0)
    a.offer(R, 1, 4, b"u2", rating(1, "u2", "like"), now=0.0)
    a.offer(R, 0, 11, None, b"{}", now=0.0)  # invalid, still consumed
    a.offer(V, 0, 0, b"v1", video("v1"), now=0.0)
    roll = a.take(R, 7, AT)
    assert roll is not None
    m = roll.meta
    assert m.roll == roll_name(7, AT) == "0000000007-20261102T120000Z"
    assert m.kinds == ("logs", "reactions") and m.rows == {"logs": 1, "reactions": 1}
    assert m.spans == (Span(R, 0, 10, 11), Span(R, 1, 4, 4))
    assert roll.rows["logs"][0]["viewer_uid"] == "u1"
    assert roll.rows["reactions"][0]["action"] == "like"
    assert (m.min_ts, m.max_ts) == (T0, T0 + timedelta(seconds=1))
    assert a.next_offsets == {(R, 0): 12, (R, 1): 5}
    assert RollMeta.from_json(m.to_json()) == m
    v = a.take(V, 8, AT)
    assert v is not None and v.meta.kinds == ("videos",) and v.rows["videos"][0]["duration"] == 60.0


def test_messages_below_the_resume_point_are_behind() -> None:
    a = archiver()
    a.restore({(R, 0): 5}, [])
    assert a.offer(R, 0, 4, b"u1", rating(4), now=0.0)[0] == "behind"
    assert a.offer(R, 0, 5, b"u1", rating(5), now=0.0)[0] == "archived"
    assert a.offer(R, 1, 0, b"u1", rating(6), now=0.0)[0] == "archived"


# ---- offsets and resume --------------------------------------------------------------------


def test_resume_offsets_are_one_past_the_highest_span_end() -> None:
    metas = [meta("a", 1, [(0, 0, 9), (1, 0, 3)]), meta("b", 2, [(0, 10, 19)])]
    assert resume_offsets(metas) == {(R, 0): 20, (R, 1): 4}
    assert resume_offsets([]) == {}
    assert next_seq(metas) == 3 and next_seq([]) == 1


def test_incomplete_rolls_miss_a_listed_kind() -> None:
    m = RollMeta("r", 1, R, ("logs", "reactions"), (), {"logs": 1, "reactions": 1}, T0, T0)
    assert incomplete_rolls({"r": {"logs"}}, {"r": m}) == {"r"}
    assert incomplete_rolls({"r": {"logs", "reactions"}}, {"r": m}) == set()


def test_overlapping_spans_are_found() -> None:
    ok = [meta("a", 1, [(0, 0, 9)]), meta("b", 2, [(0, 10, 19)]), meta("c", 3, [(1, 0, 9)])]
    assert overlapping_spans(ok) == []
    bad = [*ok, meta("d", 4, [(0, 15, 30)])]
    assert overlapping_spans(bad) == [("b", "d", Span(R, 0, 15, 19))]


def test_resume_after_any_number_of_rolls_archives_each_event_once() -> None:
    """Simulated crashes: the stream is consumed, rolled at random points, and the
    'process' restarts from the written rolls; pending rows of a crash are lost and read
    again. The archived event ids are the valid events once, in order."""
    rng = random.Random(5)
    stream = []
    for i in range(400):
        user = f"u{rng.randrange(8)}"
        stream.append((user.encode(), rating(i, user, rng.choice(["view", "like"]))))
        if rng.random() < 0.1:  # an app retry
            stream.append((user.encode(), stream[-1][1]))
        if rng.random() < 0.05:
            stream.append((None, b"\xff garbage"))
    written: list[RollMeta] = []
    rows: list[dict] = []
    for _ in range(30):  # crashes
        a = archiver(roll_rows=rng.randint(1, 40))
        nexts = resume_offsets(written)
        a.restore(nexts, [(r.get("viewer_uid") or r["user_id"], r["event_id"]) for r in rows])
        stop = rng.randrange(len(stream) + 1)
        for off in range(nexts.get((R, 0), 0), stop):
            key, value = stream[off]
            a.offer(R, 0, off, key, value, now=0.0)
            if a.should_roll(R, 0.0):
                roll = a.take(R, next_seq(written), AT)
                assert roll is not None
                written.append(roll.meta)
                rows += [r for k in roll.meta.kinds for r in roll.rows[k]]
    a = archiver()
    a.restore(resume_offsets(written), [])
    for off in range(resume_offsets(written).get((R, 0), 0), len(stream)):
        a.offer(R, 0, off, *stream[off], now=0.0)
    roll = a.take(R, next_seq(written), AT)
    if roll is not None:
        written.append(roll.meta)
        rows += [r for k in roll.meta.kinds for r in roll.rows[k]]
    valid = list(dict.fromkeys(json.loads(v)["event_id"] for k, v in stream if k is not None))
    assert [r["event_id"] for r in sorted(rows, key=lambda r: r["kafka_offset"])] == valid
    assert overlapping_spans(written) == []


# ---- dedup ---------------------------------------------------------------------------------


def _reference_duplicates(events: list[tuple[str, str]], window: int) -> list[bool]:
    """Slow and obviously right: an event is a duplicate when its id is among the last
    ``window`` accepted ids of its user."""
    accepted: dict[str, list[str]] = {}
    out = []
    for user, eid in events:
        recent = accepted.setdefault(user, [])
        dup = eid in recent[-window:]
        out.append(dup)
        if not dup:
            recent.append(eid)
    return out


@pytest.mark.parametrize("window", [1, 3, 50])
def test_dedup_matches_the_reference_and_the_worker_engine(window: int) -> None:
    rng = random.Random(window)
    events = [(f"u{rng.randrange(4)}", f"e{rng.randrange(12)}") for _ in range(600)]
    d = Dedup(window)
    fast = []
    for user, eid in events:
        dup = d.seen(user, eid)
        fast.append(dup)
        if not dup:
            d.accept(user, eid)
    assert fast == _reference_duplicates(events, window)
    engine = Recommender(make_model(n_users=4, n_items=20), dedup_window=window)
    worker = [
        not engine.apply(RatingEvent(event_id=e, user_id=u, video_id="v1", action="like", ts=T0))
        for u, e in events
    ]
    assert worker == fast


def test_restored_dedup_drops_what_an_uninterrupted_run_drops() -> None:
    a = archiver(dedup_window=2)
    for i, eid in enumerate(["a", "b", "c"]):
        a.offer(R, 0, i, b"u1", rating(i, eid=eid), now=0.0)
    b = archiver(dedup_window=2)
    b.restore({(R, 0): 3}, [("u1", "a"), ("u1", "b"), ("u1", "c")])
    for arch in (a, b):  # "a" fell out of the window of 2, "c" did not
        assert arch.offer(R, 0, 3, b"u1", rating(3, eid="a"), now=0.0)[0] == "archived"
        assert arch.offer(R, 0, 4, b"u1", rating(4, eid="c"), now=0.0)[0] == "duplicate"


# ---- retention and summary ----------------------------------------------------------------


def test_retention_by_event_time_keeps_each_partitions_newest_roll() -> None:
    old_p1 = meta("r1", 1, [(0, 0, 9), (1, 0, 4)], max_day=0)
    old = meta("r2", 2, [(0, 10, 19)], max_day=1)
    new = meta("r3", 3, [(0, 20, 29)], max_day=10)
    vids = meta("v1", 4, [(0, 0, 0)], max_day=0, topic=V)
    metas = [old_p1, old, new, vids]
    now = T0 + timedelta(days=100)
    assert expired_rolls(metas, rating_topic=R, keep_days=5, now=now) == ["r2"]
    assert expired_rolls(metas, rating_topic=R, keep_days=0, now=now) == []
    assert expired_rolls(metas, rating_topic=R, keep_days=20, now=now) == []
    # A stamp far in the future is capped by the wall clock.
    future = meta("r4", 5, [(0, 30, 30)], max_day=10_000)
    soon = T0 + timedelta(days=11)
    assert expired_rolls([old, new, future], rating_topic=R, keep_days=5, now=soon) == ["r2"]
    assert expired_rolls([old, new, future], rating_topic=R, keep_days=5, now=T0) == []


def test_summary_from_metadata() -> None:
    metas = [
        meta("a", 1, [(0, 0, 9), (1, 0, 3)], max_day=0),
        meta("b", 2, [(0, 10, 19)], max_day=2),
        meta("v", 3, [(0, 0, 1)], max_day=1, topic=V),
    ]
    doc = summarize(metas)
    assert doc["rolls"] == 3 and doc["rows"]["logs"] == 14 + 10 + 2
    r = doc["topics"][R]
    assert r["rolls"] == 2
    assert r["offsets"] == {"0": {"first": 0, "last": 19}, "1": {"first": 0, "last": 3}}
    assert r["min_ts"] == (T0 - timedelta(hours=1)).isoformat()
    assert r["max_ts"] == (T0 + timedelta(days=2)).isoformat()
    assert summarize([]) == {"rolls": 0, "rows": {"logs": 0, "reactions": 0, "videos": 0},
                             "topics": {}}  # fmt: skip
