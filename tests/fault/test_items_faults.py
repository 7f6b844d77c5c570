"""The shared item side under faults: a stream with new videos (announced and not)
through three workers, one of them killed with kill -9 twice and restarted.

After it settles, every worker holds the same factors for each new video, bit for bit,
and they equal the exact item solve (``item_solve_reference``, ``np.linalg.solve`` on the
full system) from the final user factors and rows: the latest contribution of each user,
whose row values are checked against a fault-free in-process run of the stream.
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
from worker.core.items import Contribution, ItemUpdate
from worker.core.wire import RatingEvent, VideoEvent

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


def test_three_workers_share_new_videos_exactly_across_kill9(
    broker, tiny_model_dir, topics, producer, tmp_path
):
    model = make_model()
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
            model=tiny_model_dir,
            topics=topics,
            log_path=tmp_path / f"w{i}.log",
            extra_env={"REFOLD_ITEMS_DUMP": str(dumps[i]), "REFOLD_CLIENT_ID": f"w{i}"},
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
