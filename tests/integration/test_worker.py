"""The worker against a real broker (embedded Tansu unless REFOLD_TEST_BROKER says otherwise)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.kit import TopicReader, Topics, WorkerProcess, make_model
from worker.core.wire import VideoEvent

pytestmark = pytest.mark.integration

TS = "2026-11-29T10:00:00Z"


def _event(eid: str, user: str, video: str, action: str, watch: float | None = None) -> bytes:
    doc = {"event_id": eid, "user_id": user, "video_id": video, "action": action, "ts": TS}
    if watch is not None:
        doc["watch_seconds"] = watch
    return json.dumps(doc).encode()


def test_valid_and_malformed_events(
    broker: str, tiny_model_dir: Path, topics: Topics, producer, tmp_path: Path
):
    """Each touched user gets one list per batch; each bad message lands in the DLQ with reasons."""
    model = make_model()
    user_rows = {u: model.row_of(i) for i, u in enumerate(model.users.ids)}
    bad = [
        b"\xff\xfe not utf8",
        b"{not json",
        json.dumps(
            {"event_id": "b1", "user_id": "u1", "video_id": "v1", "action": "love", "ts": TS}
        ).encode(),
        json.dumps(
            {"event_id": "b2", "user_id": "u1", "video_id": "v1", "action": "view", "ts": TS}
        ).encode(),
        b'{"event_id":"b3","user_id":"u1","video_id":"v1","action":"view","watch_seconds":NaN,"ts":"'
        + TS.encode()
        + b'"}',
        json.dumps(
            {"event_id": "b4", "user_id": "u\n1", "video_id": "v1", "action": "like", "ts": TS}
        ).encode(),
    ]
    valid = [("e1", "u1", "v3", "like"), ("e2", "u2", "v4", "dislike"), ("e3", "u1", "v5", "view")]
    for i, (eid, u, v, a) in enumerate(valid):
        producer.send_raw(bad[2 * i], key=b"u1")
        producer.send_raw(_event(eid, u, v, a, 120.0 if a == "view" else None), key=u.encode())
        producer.send_raw(bad[2 * i + 1], key=b"u1")
    producer.flush()
    recs = TopicReader(broker, topics.settings.recommendations)
    dlq = TopicReader(broker, topics.settings.dlq)
    with_worker = WorkerProcess(
        bootstrap=broker, model=tiny_model_dir, topics=topics, log_path=tmp_path / "w.log"
    ).start()
    try:
        dlq.wait_for(lambda rs: len(rs) >= len(bad), timeout_s=60, what="dead letters")
        lists = recs.wait_for(
            lambda rs: (
                {e for r in rs for e in json.loads(r.value)["event_ids"]} >= {"e1", "e2", "e3"}
            ),
            timeout_s=60,
            what="lists for all valid events",
        )
        assert with_worker.terminate() == 0, with_worker.log_tail()
    finally:
        with_worker.stop()
    docs = [json.loads(r.value) for r in lists]
    # One list per touched user per batch: no event id is reflected by two lists.
    reflected = [e for d in docs for e in d["event_ids"]]
    assert sorted(reflected) == ["e1", "e2", "e3"]
    assert len(dlq.records) == len(bad)
    assert sorted(r.value for r in dlq.records) == sorted(bad)
    for r in dlq.records:
        h = {k: v.decode() for k, v in r.headers}
        assert h["refold.error.type"] in {"invalid_utf8", "invalid_json", "validation"}
        assert h["refold.error.message"]
        assert h["refold.source.topic"] == topics.settings.ratings
        assert int(h["refold.source.offset"]) >= 0
    by_user = {d["user_id"]: d for d in docs}
    u1 = by_user["u1"]
    assert u1["strategy"] == "als" and len(u1["items"]) == 10
    seen = set(map(model.items.id_of, user_rows["u1"][0])) | {"v3", "v5"}
    assert not seen & {i["video_id"] for i in u1["items"]}
    assert "v4" not in {i["video_id"] for i in by_user["u2"]["items"]}
    recs.close()
    dlq.close()


def test_new_user_goes_from_popular_to_personal_and_new_video(
    broker, tiny_model_dir, topics, producer, tmp_path
):
    """A new user starts popular; likes make the list personal; an announced video is recommendable."""
    worker = WorkerProcess(
        bootstrap=broker, model=tiny_model_dir, topics=topics, log_path=tmp_path / "w.log"
    ).start()
    recs = TopicReader(broker, topics.settings.recommendations)
    try:
        producer.dislike("newbie", "v7", event_id="n1")
        producer.flush()
        first = recs.wait_for(lambda rs: len(rs) >= 1, timeout_s=60, what="first list")
        doc = json.loads(first[0].value)
        assert doc["strategy"] == "popular" and "v7" not in {i["video_id"] for i in doc["items"]}
        # Announce a new video in the liked category; then like videos of that category.
        producer.announce_video(
            VideoEvent(
                video_id="fresh",
                duration_seconds=300,
                category="cat1",
                author_id="a1",
                title="fresh",
                published_at=datetime.now(timezone.utc),
            )
        )
        producer.flush()
        for j, v in enumerate(["v1", "v5", "v9", "v13"]):
            producer.like("newbie", v, event_id=f"n{j + 2}")
        producer.flush()
        recs.wait_for(
            lambda rs: any(json.loads(r.value)["events_applied"] == 5 for r in rs),
            timeout_s=60,
            what="list after 5 events",
        )
        last = json.loads(recs.records[-1].value)
        assert last["strategy"] == "als"
        assert not {"v7", "v1", "v5", "v9", "v13"} & {i["video_id"] for i in last["items"]}
        # Another user likes the new video: it is accepted and counted.
        producer.like("u3", "fresh", event_id="f1")
        producer.view("u3", "never-heard-of", watch_seconds=30, event_id="f2")
        producer.flush()
        recs.wait_for(
            lambda rs: any("f2" in json.loads(r.value)["event_ids"] for r in rs),
            timeout_s=60,
            what="u3",
        )
        assert worker.terminate() == 0
    finally:
        worker.stop()
        recs.close()


def test_sigterm_loses_nothing(broker, tiny_model_dir, topics, producer, tmp_path):
    """Events sent across a SIGTERM + restart are each reflected exactly once."""
    n = 300
    log = tmp_path / "w.log"
    recs = TopicReader(broker, topics.settings.recommendations)
    worker = WorkerProcess(
        bootstrap=broker, model=tiny_model_dir, topics=topics, log_path=log
    ).start()
    try:
        for i in range(n // 2):
            producer.like(f"u{i % 40}", f"v{(i * 7) % 120}", event_id=f"s{i}")
        producer.flush()
        recs.wait_for(lambda rs: len(rs) >= 1, timeout_s=60, what="some lists")
        assert worker.terminate() == 0, worker.log_tail()
        for i in range(n // 2, n):
            producer.like(f"u{i % 40}", f"v{(i * 7) % 120}", event_id=f"s{i}")
        producer.flush()
        worker = WorkerProcess(
            bootstrap=broker, model=tiny_model_dir, topics=topics, log_path=log
        ).start()
        recs.wait_for(
            lambda rs: len({e for r in rs for e in json.loads(r.value)["event_ids"]}) >= n,
            timeout_s=90,
            what="all events reflected",
        )
        assert worker.terminate() == 0, worker.log_tail()
    finally:
        worker.stop()
    ids = [e for d in recs.json_values() for e in d["event_ids"]]
    assert sorted(ids) == sorted(f"s{i}" for i in range(n))
    recs.close()
