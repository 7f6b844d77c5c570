"""The shared item side under faults: a stream with new videos (announced and not)
through three workers, one of them killed with kill -9 twice and restarted.

After it settles, every worker holds the same factors for each new video, bit for bit,
and they equal the exact item solve (``item_solve_reference``, ``np.linalg.solve`` on the
full system) from the final user factors and rows: the latest contribution of each user,
whose row values are checked against a fault-free in-process run of the stream.

Live popularity travels the same way: every worker ends with the same popularity for
every video, bit for bit, equal to the model's seed plus the decayed count of the stream's
positive pairs (computed in-process from the whole stream), so no pair was lost or counted
twice; and a brand-new user's cold-start list is that ranking.
"""

from __future__ import annotations

import json
import random
from datetime import timedelta

import numpy as np
import pytest

from tests.fault.harness import (
    T0,
    assert_final_state_matches,
    create_topics,
    exact_item_solves,
    latest_records,
    produce,
    read_changelog,
    reference,
    wait_all_applied,
    wait_items_settled,
)
from tests.kit import TopicReader, WorkerProcess, make_model
from worker.core.engine import Recommender
from worker.core.items import Contribution, ItemUpdate
from worker.core.popularity import PopularityUpdate, owner_counts_reference
from worker.core.wire import RatingEvent, VideoEvent
from worker.storage import load_model, save_model

#: Short, so that the stream's 40 minutes decay it by many half-lives.
HALF_LIFE_S = 600.0

pytestmark = [pytest.mark.fault, pytest.mark.integration]

ANNOUNCED = [f"fresh{i}" for i in range(6)]
UNANNOUNCED = [f"ghost{i}" for i in range(4)]


def _stream(k: int, seed: int = 5) -> list[RatingEvent]:
    """Known and new users; a quarter of the events on videos new to the model."""
    rng = random.Random(seed)
    users = [f"u{i}" for i in range(40)] + [f"n{i}" for i in range(60)]
    actions = ["view"] * 5 + ["like"] * 2 + ["neutral", "dislike"]
    out = []
    for i in range(k):
        action = rng.choice(actions)
        video = (
            rng.choice(ANNOUNCED + UNANNOUNCED) if rng.random() < 0.25 else f"v{rng.randrange(120)}"
        )
        out.append(
            RatingEvent(
                event_id=f"it{seed}-{i}",
                user_id=rng.choice(users),
                video_id=video,
                action=action,
                watch_seconds=rng.uniform(10, 900) if action == "view" else None,
                ts=T0 + timedelta(seconds=i),
            )
        )
    return out


def _final_pairs(model, events: list[RatingEvent]) -> list[tuple[str, int]]:
    """``(video, since)`` of every positive pair at the end of a fault-free in-process run
    of the whole stream."""
    eng = Recommender(model, popularity_half_life_s=HALF_LIFE_S, shared_popularity=True)
    final: dict[tuple[str, str], int | None] = {}
    for e in events:
        eng.apply(e)
        for p in eng.take_popularity_pairs():
            final[p.video_id, p.user_id] = p.since_us
    return [(v, s) for (v, _), s in final.items() if s is not None]


def _popularity_reference(model, events: list[RatingEvent], asof_us: int) -> dict[str, float]:
    """The model's seed plus the shared counts at ``asof_us`` (``math.fsum`` of each
    positive pair's decayed weight)."""
    live = owner_counts_reference(
        _final_pairs(model, events), half_life_s=HALF_LIFE_S, now_us=asof_us
    )
    seed = Recommender(model, popularity_half_life_s=HALF_LIFE_S)._seed_at(asof_us)
    out = {model.items.id_of(i): float(x) for i, x in enumerate(seed) if x}
    for v, x in live.items():
        out[v] = out.get(v, 0.0) + x
    return out


def _check_popularity(dumps, model, events, new_user_list) -> None:
    pops = [json.loads(p.read_text())["popularity"] for p in dumps]
    asof = pops[0]["asof_us"]
    assert asof is not None and all(p == pops[0] for p in pops), "workers disagree"
    got = {v: float.fromhex(x) for v, x in pops[0]["values"].items()}
    want = _popularity_reference(model, events, asof)
    assert got.keys() == {v for v, x in want.items() if x > 0}
    for v, x in want.items():
        assert got[v] == pytest.approx(x, rel=1e-9), v
    assert new_user_list == _ranking(got, len(new_user_list)) and new_user_list


def _ranking(values: dict[str, float], k: int) -> list[str]:
    return [v for v in sorted(values, key=lambda v: -values[v]) if v != "ghost0"][:k]


def _cold_start_list(producer, recs: TopicReader, ts, want: list[str]) -> list[str]:
    """A brand-new user's list (a dislike of an unannounced video: no category to demote,
    at the stream's last time) once its worker has installed the latest counts."""
    got: list[str] = []
    for n in range(30):
        e = RatingEvent(
            event_id=f"cold{n}", user_id=f"brandnew{n}", video_id="ghost0", action="dislike",
            ts=ts,
        )  # fmt: skip
        produce(producer, [e])
        key = e.user_id.encode()
        recs.wait_for(lambda r, k=key: any(x.key == k for x in r), timeout_s=60, what=e.user_id)
        doc = json.loads([x for x in recs.records if x.key == key][-1].value)
        assert doc["strategy"] == "popular"
        got = [i["video_id"] for i in doc["items"]]
        if got == want:
            break
    return got


def _settled_popularity(updates: TopicReader, pairs: list[tuple[str, int]]) -> bool:
    """The latest count of every video on the topic is the reference's (at its as-of)."""
    latest = {
        u.video_id: u for u in latest_records(updates.records, PopularityUpdate.decode).values()
    }
    want_at: dict[int, dict[str, float]] = {}
    for u in latest.values():
        if u.asof_us not in want_at:
            want_at[u.asof_us] = owner_counts_reference(
                pairs, half_life_s=HALF_LIFE_S, now_us=u.asof_us
            )
    videos = {v for v, _ in pairs}
    return videos <= latest.keys() and all(
        u.value == pytest.approx(want_at[u.asof_us].get(v, 0.0), rel=1e-9, abs=1e-300)
        for v, u in latest.items()
    )


def test_three_workers_share_new_videos_exactly_across_kill9(broker, topics, producer, tmp_path):
    model = make_model()
    # The seed is as of the model's newest training event: here the stream's start.
    model_dir = save_model(
        model, tmp_path / "model", data_summary={"event_time": {"max": T0.isoformat()}}
    )
    model_dir_model = load_model(model_dir)
    events = _stream(2400)
    expected = reference(model, events)
    create_topics(broker, topics, partitions=6)
    for i, vid in enumerate(ANNOUNCED):
        producer.announce_video(
            VideoEvent(
                video_id=vid, duration_seconds=600.0, category=f"cat{i % 4}",
                author_id=f"a{i}", published_at=T0,
            )
        )  # fmt: skip
    producer.flush()
    recs = TopicReader(broker, topics.settings.recommendations)
    dumps = [tmp_path / f"items{i}.json" for i in range(3)]

    def worker(i: int) -> WorkerProcess:
        return WorkerProcess(
            bootstrap=broker,
            model=model_dir,
            topics=topics,
            log_path=tmp_path / f"w{i}.log",
            extra_env={
                "REFOLD_ITEMS_DUMP": str(dumps[i]),
                "REFOLD_CLIENT_ID": f"w{i}",
                "REFOLD_POPULARITY_HALF_LIFE_S": str(HALF_LIFE_S),
            },
        ).start()

    workers = [worker(i) for i in range(3)]
    thirds = [events[:800], events[800:1600], events[1600:]]
    try:
        for w in workers:
            w.wait_joined()
        produce(producer, thirds[0])
        recs.wait_for(lambda r: len(r) > 50, timeout_s=90, what="first lists")
        workers[1].kill9()  # mid-stream, owner of some new videos
        workers[1] = worker(1)
        produce(producer, thirds[1])
        workers[1].wait_joined()
        workers[1].kill9()
        workers[1] = worker(1)
        produce(producer, thirds[2])
        final = wait_all_applied(recs, expected, timeout_s=240)
        contrib = TopicReader(broker, topics.settings.item_contributions)
        updates = TopicReader(broker, topics.settings.item_updates)
        wait_items_settled(model, contrib, updates, timeout_s=120)
        # Popularity settled: the latest counts are the reference's; a brand-new user's
        # cold-start list is its ranking.
        pop_topic = TopicReader(broker, topics.settings.popularity)
        last_us = int(events[-1].ts.timestamp()) * 1_000_000
        pairs = _final_pairs(model, events)
        pop_topic.wait_for(
            lambda _: _settled_popularity(pop_topic, pairs),
            timeout_s=120,
            what="owners' counts of the latest pairs",
        )
        pop_topic.close()
        cold = _cold_start_list(
            producer,
            recs,
            events[-1].ts,
            _ranking(_popularity_reference(model, events, last_us), 10),
        )
        for w in workers:
            assert w.terminate() == 0, w.log_tail()
    finally:
        for w in workers:
            w.stop()
        recs.close()
    contributions = latest_records(contrib.records, Contribution.decode)
    latest_updates = {
        u.video_id: u for u in latest_records(updates.records, ItemUpdate.decode).values()
    }
    contrib.close()
    updates.close()
    # Nothing lost or counted twice on the user side; lists are compared elsewhere (their
    # new-video scores follow when each owner's solve arrived).
    assert_final_state_matches(expected, final, read_changelog(broker, topics), lists_for=set())
    # Every contribution's row value is the fault-free row value of that user and video.
    for c in contributions.values():
        assert c.model_version == model.version
        assert c.value == expected.rows[c.user_id].get(c.video_id, 0.0), (c.user_id, c.video_id)
    # Every user with a new video in their row contributed.
    new_in_rows = {
        (u, v) for u, row in expected.rows.items() for v, x in row.items()
        if v in set(ANNOUNCED + UNANNOUNCED) and x != 0.0
    }  # fmt: skip
    contributed = {(c.user_id, c.video_id) for c in contributions.values() if c.value != 0.0}
    assert new_in_rows <= contributed
    held = [json.loads(p.read_text())["videos"] for p in dumps]
    assert all(h.keys() == held[0].keys() for h in held)
    want = exact_item_solves(model, contributions)
    assert set(ANNOUNCED + UNANNOUNCED) <= set(want)
    for vid, x in want.items():
        first = held[0][vid]
        assert all(h[vid] == first for h in held), f"{vid}: workers disagree"
        assert first == latest_updates[vid].factors.astype("<f4").tobytes().hex()
        got = np.frombuffer(bytes.fromhex(first), dtype="<f4")
        rel = np.linalg.norm(got - x) / max(np.linalg.norm(x), 1e-12)
        assert rel < 1e-4, f"{vid}: relative error {rel:.2e}"
    _check_popularity(dumps, model_dir_model, events, cold)
