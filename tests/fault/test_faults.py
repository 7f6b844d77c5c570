"""Fault injection: kill -9, rebalance, broker restart, model swap, bad input at volume.

Every verdict compares the final rows (from the changelog) and the final lists
(the last list per user) against an in-process fault-free run of the same
deterministic stream.
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest

from tests.fault.harness import (
    assert_final_state_matches,
    create_topics,
    make_stream,
    produce,
    read_changelog,
    reference,
    wait_all_applied,
)
from tests.kit import TopicReader, Topics, WorkerProcess, broker_choice, kafka_settings, make_model
from worker.producer import RatingProducer
from worker.storage import save_model

pytestmark = [pytest.mark.fault, pytest.mark.integration]


def _wait_processing(
    recs: TopicReader, before: int, worker: WorkerProcess, timeout_s: float = 90
) -> None:
    """Until a list newer than ``before`` arrives (the worker is processing)."""
    deadline = time.monotonic() + timeout_s
    while len(recs.records) <= before:
        recs.poll()
        assert worker.alive(), worker.log_tail()
        assert time.monotonic() < deadline, "worker did not start processing:\n" + worker.log_tail()


def test_kill9_at_20_random_points(broker, tiny_model_dir, topics, producer, tmp_path):
    rng = random.Random(20)
    events = make_stream(4000, 160)
    expected = reference(make_model(), events)
    create_topics(broker, topics, partitions=3)
    recs = TopicReader(broker, topics.settings.recommendations)
    log = tmp_path / "worker.log"
    # One contiguous slice before each restart keeps load on the topic across every kill
    # and each user's events in stream order (float sums are order-sensitive).
    step = len(events) // 20
    chunks = [events[i * step : (i + 1) * step if i < 19 else None] for i in range(20)]
    # Frequent local snapshots, so restarts exercise snapshot + changelog tail as well.
    env = {"REFOLD_STATE_DIR": str(tmp_path / "state"), "REFOLD_SNAPSHOT_INTERVAL_S": "0.3"}
    for kill in range(20):
        produce(producer, chunks[kill])
        w = WorkerProcess(
            bootstrap=broker, model=tiny_model_dir, topics=topics, log_path=log, extra_env=env
        ).start()
        _wait_processing(recs, len(recs.records), w)
        time.sleep(rng.uniform(0.0, 0.4))  # the random kill point, within the load
        w.kill9()
    w = WorkerProcess(
        bootstrap=broker, model=tiny_model_dir, topics=topics, log_path=log, extra_env=env
    ).start()
    try:
        final = wait_all_applied(recs, expected, timeout_s=180)
        w.wait_joined()
        assert w.terminate() == 0, w.log_tail()
    finally:
        w.stop()
        recs.close()
    assert_final_state_matches(expected, final, read_changelog(broker, topics))
    assert "from local snapshots" in log.read_text()


def test_rebalance_three_workers_one_killed(broker, tiny_model_dir, topics, producer, tmp_path):
    events = make_stream(3000, 150, seed=12)
    expected = reference(make_model(), events)
    create_topics(broker, topics, partitions=6)
    recs = TopicReader(broker, topics.settings.recommendations)
    workers = [
        WorkerProcess(
            bootstrap=broker, model=tiny_model_dir, topics=topics, log_path=tmp_path / f"w{i}.log"
        ).start()
        for i in range(3)
    ]
    try:
        produce(producer, events[:1000])
        _wait_processing(recs, 0, workers[0])
        produce(producer, events[1000:2000])
        workers[1].kill9()
        produce(producer, events[2000:])
        final = wait_all_applied(recs, expected, timeout_s=240)
        for w in (workers[0], workers[2]):
            assert w.terminate() == 0, w.log_tail()
    finally:
        for w in workers:
            w.stop()
        recs.close()
    assert_final_state_matches(expected, final, read_changelog(broker, topics))


def test_model_swap_mid_stream(broker, tmp_path, topics, producer):
    m1 = make_model(version="swap-v1")
    m2 = make_model(factor_seed=99, version="swap-v2")
    d1, d2 = save_model(m1, tmp_path / "m1"), save_model(m2, tmp_path / "m2")
    events = make_stream(2000, 80, seed=13)
    create_topics(broker, topics, partitions=2)
    recs = TopicReader(broker, topics.settings.recommendations)
    w = WorkerProcess(
        bootstrap=broker, model=d1, topics=topics, log_path=tmp_path / "w.log"
    ).start()
    try:
        produce(producer, events[:1000])
        _wait_processing(recs, 0, w)
        from worker.kafkaio import Publisher, make_producer

        pub = Publisher(make_producer(kafka_settings(broker)))
        pub.send(
            topics.settings.control, key=b"model", value=json.dumps({"model_dir": str(d2)}).encode()
        )
        pub.confirm()
        pub.close()

        # Keep the stream flowing until lists carry the new version, then send the rest.
        def swapped(records) -> bool:
            return any(json.loads(r.value)["model_version"] == "swap-v2" for r in records)

        sent = 1000
        deadline = time.monotonic() + 60
        while not swapped(recs.records) and sent < 1500:
            produce(producer, events[sent : sent + 25])
            sent += 25
            recs.wait_for(lambda rs: True, timeout_s=1)
            assert time.monotonic() < deadline, "no list from the new model:\n" + w.log_tail()
        assert swapped(recs.records), w.log_tail()
        produce(producer, events[sent:])
        expected = reference(m1, events, swap_to=m2)
        final = wait_all_applied(recs, expected, timeout_s=120)
        assert w.terminate() == 0, w.log_tail()
    finally:
        w.stop()
        recs.close()
    changelog = read_changelog(broker, topics)
    # Rows do not depend on the model: every user's row and count must match.
    on_v2 = {u for u, d in final.items() if d["model_version"] == "swap-v2"}
    assert {e.user_id for e in events[sent:]} <= on_v2
    # Lists from the new model must equal the reference refolded against it.
    sub = type(expected)(
        rows=expected.rows,
        applied=expected.applied,
        lists={u: expected.lists[u] for u in on_v2},
    )
    for u in set(expected.applied) - on_v2:
        final.pop(u, None)
    assert_final_state_matches(sub, final, changelog, lists_for=on_v2)


CONTROL_CHARS = ["\n", "\r", "\x00", "\x1b[2J", "\x7f"]


def _bad_messages(n: int, seed: int = 5) -> list[bytes]:
    rng = random.Random(seed)
    ts = '"2026-11-29T10:00:00Z"'
    makers = [
        lambda i: os.urandom(rng.randrange(1, 200)),
        lambda i: b"\xc3\x28" + str(i).encode(),  # invalid UTF-8
        lambda i: json.dumps(
            {
                "event_id": i,
                "user_id": "u1",
                "video_id": "v1",
                "action": "like",
                "ts": "2026-11-29T10:00:00Z",
            }
        ).encode(),
        lambda i: json.dumps({"event_id": f"b{i}", "user_id": "u1", "action": "like"}).encode(),
        lambda i: json.dumps(
            {
                "event_id": f"b{i}",
                "user_id": "u1",
                "video_id": "v1",
                "action": rng.choice(["love", "LIKE", "", "hate"]),
                "ts": "2026-11-29T10:00:00Z",
            }
        ).encode(),
        lambda i: (
            f'{{"event_id":"b{i}","user_id":"u1","video_id":"v1","action":"view","watch_seconds":{rng.choice(["NaN", "Infinity", "-Infinity", "-5", "1e400"])},"ts":{ts}}}'
        ).encode(),
        lambda i: json.dumps(
            {
                "event_id": f"b{i}",
                "user_id": "u" * rng.randrange(129, 400),
                "video_id": "v1",
                "action": "like",
                "ts": "2026-11-29T10:00:00Z",
            }
        ).encode(),
        lambda i: json.dumps(
            {
                "event_id": f"b{i}",
                "user_id": "u1" + rng.choice(CONTROL_CHARS),
                "video_id": "v1",
                "action": "like",
                "ts": "2026-11-29T10:00:00Z",
            }
        ).encode(),
        lambda i: json.dumps(
            {
                "event_id": f"b{i}",
                "user_id": "u1",
                "video_id": "v1",
                "action": "like",
                "ts": "2026-11-29T10:00:00Z",
                "pad": "x" * 70_000,
            }
        ).encode(),
        lambda i: json.dumps([i, "not an object"]).encode(),
    ]
    return [makers[i % len(makers)](i) for i in range(n)]


def test_bad_input_at_volume(broker, tiny_model_dir, topics, producer, tmp_path):
    valid = make_stream(1500, 60, seed=14)
    bad = _bad_messages(10_000)
    expected = reference(make_model(), valid)
    create_topics(broker, topics, partitions=2)
    rng = random.Random(3)
    # Interleave at random, keeping the valid events in their original order.
    slots = [True] * len(valid) + [False] * len(bad)
    rng.shuffle(slots)
    valid_it, bad_it = iter(valid), iter(bad)
    stream: list[tuple[bytes | None, bytes]] = []
    for is_valid in slots:
        if is_valid:
            e = next(valid_it)
            stream.append((e.user_id.encode(), e.model_dump_json().encode()))
        else:
            stream.append((None if rng.random() < 0.5 else b"u1", next(bad_it)))
    for key, value in stream:
        producer.send_raw(value, key=key)
    producer.flush()
    recs = TopicReader(broker, topics.settings.recommendations)
    dlq = TopicReader(broker, topics.settings.dlq)
    w = WorkerProcess(
        bootstrap=broker, model=tiny_model_dir, topics=topics, log_path=tmp_path / "w.log"
    ).start()
    try:
        final = wait_all_applied(recs, expected, timeout_s=240)
        dlq.wait_for(lambda rs: len(rs) >= len(bad), timeout_s=120, what="all dead letters")
        assert w.alive(), w.log_tail()
        assert w.terminate() == 0, w.log_tail()
    finally:
        w.stop()
        recs.close()
    for _ in range(10):
        dlq.poll()
    dlq.close()
    assert sorted(r.value for r in dlq.records) == sorted(bad)
    for r in dlq.records:
        headers = dict(r.headers)
        assert headers["refold.error.type"] in {
            b"invalid_utf8",
            b"invalid_json",
            b"validation",
            b"oversized",
            b"key_mismatch",
        }
        assert headers["refold.error.message"]
    assert_final_state_matches(expected, final, read_changelog(broker, topics))


@pytest.mark.apache
@pytest.mark.skipif(
    broker_choice() != "apache", reason="the embedded broker keeps nothing across a restart"
)
def test_broker_restart_mid_stream(tmp_path_factory, tiny_model_dir, tmp_path):
    from worker.brokers.apache import ApacheKafkaBroker

    events = make_stream(2000, 80, seed=15)
    expected = reference(make_model(), events)
    topics = Topics()
    from tests.kit import TEST_BROKER_CONFIG

    with ApacheKafkaBroker(
        data_dir=tmp_path_factory.mktemp("kafka-restart"), extra_config=TEST_BROKER_CONFIG
    ) as kafka:
        bs = kafka.bootstrap_servers
        create_topics(bs, topics, partitions=2)
        producer = RatingProducer(kafka=kafka_settings(bs), topics=topics.settings)
        produce(producer, events[:1000])
        producer.close()
        recs = TopicReader(bs, topics.settings.recommendations)
        w = WorkerProcess(
            bootstrap=bs, model=tiny_model_dir, topics=topics, log_path=tmp_path / "w.log"
        ).start()
        try:
            _wait_processing(recs, 0, w)
            recs.close()
            kafka.restart()
            # A new producer: kafka-python's idempotent producer may not survive a restart.
            producer = RatingProducer(kafka=kafka_settings(bs), topics=topics.settings)
            produce(producer, events[1000:])
            producer.close()
            recs = TopicReader(bs, topics.settings.recommendations)
            final = wait_all_applied(recs, expected, timeout_s=180)
            assert w.alive(), "worker died across the broker restart:\n" + w.log_tail()
            assert w.terminate() == 0, w.log_tail()
        finally:
            w.stop()
            recs.close()
        assert_final_state_matches(expected, final, read_changelog(bs, topics))
