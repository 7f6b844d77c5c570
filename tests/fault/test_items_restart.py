"""The shared item side across an Apache Kafka broker restart (the embedded broker keeps
nothing across one): two workers share new videos through their owners; the broker
restarts mid-stream; afterwards both hold the same factors for every new video, bit for
bit, equal to the exact item solve of the latest contributions, and every user with a
new video in their row has contributed their fault-free row value."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.fault.harness import (
    T0,
    create_topics,
    exact_item_solves,
    latest_records,
    produce,
    reference,
    wait_all_applied,
    wait_items_settled,
)
from tests.fault.test_items_faults import ANNOUNCED, UNANNOUNCED, _stream
from tests.kit import (
    TEST_BROKER_CONFIG,
    TopicReader,
    Topics,
    WorkerProcess,
    broker_choice,
    kafka_settings,
    make_model,
)
from worker.core.items import Contribution
from worker.core.wire import VideoEvent
from worker.producer import RatingProducer

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.apache]


@pytest.mark.skipif(
    broker_choice() != "apache", reason="the embedded broker keeps nothing across a restart"
)
def test_new_videos_stay_shared_and_exact_across_a_broker_restart(
    tmp_path_factory, tiny_model_dir, tmp_path
):
    from worker.brokers.apache import ApacheKafkaBroker

    model = make_model()
    events = _stream(1600, seed=9)
    expected = reference(model, events)
    topics = Topics()
    dumps = [tmp_path / f"items{i}.json" for i in range(2)]
    with ApacheKafkaBroker(
        data_dir=tmp_path_factory.mktemp("kafka-items-restart"), extra_config=TEST_BROKER_CONFIG
    ) as kafka:
        bs = kafka.bootstrap_servers
        create_topics(bs, topics, partitions=4)
        producer = RatingProducer(kafka=kafka_settings(bs), topics=topics.settings)
        for i, vid in enumerate(ANNOUNCED):
            producer.announce_video(
                VideoEvent(
                    video_id=vid, duration_seconds=600.0, category=f"cat{i % 4}",
                    author_id=f"a{i}", published_at=T0,
                )
            )  # fmt: skip
        produce(producer, events[:800])
        producer.close()
        workers = [
            WorkerProcess(
                bootstrap=bs,
                model=tiny_model_dir,
                topics=topics,
                log_path=tmp_path / f"w{i}.log",
                extra_env={"REFOLD_ITEMS_DUMP": str(dumps[i]), "REFOLD_CLIENT_ID": f"w{i}"},
            ).start()
            for i in range(2)
        ]
        recs = TopicReader(bs, topics.settings.recommendations)
        try:
            recs.wait_for(lambda r: len(r) > 50, timeout_s=120, what="first lists")
            recs.close()
            kafka.restart()
            producer = RatingProducer(kafka=kafka_settings(bs), topics=topics.settings)
            produce(producer, events[800:])
            producer.close()
            recs = TopicReader(bs, topics.settings.recommendations)
            wait_all_applied(recs, expected, timeout_s=180)
            contrib = TopicReader(bs, topics.settings.item_contributions)
            updates = TopicReader(bs, topics.settings.item_updates)
            wait_items_settled(model, contrib, updates, timeout_s=120)
            for w in workers:
                assert w.alive(), "worker died across the broker restart:\n" + w.log_tail()
                assert w.terminate() == 0, w.log_tail()
            contributions = latest_records(contrib.records, Contribution.decode)
            contrib.close()
            updates.close()
        finally:
            for w in workers:
                w.stop()
            recs.close()
    for c in contributions.values():
        assert c.value == expected.rows[c.user_id].get(c.video_id, 0.0), (c.user_id, c.video_id)
    new = set(ANNOUNCED + UNANNOUNCED)
    in_rows = {(u, v) for u, row in expected.rows.items() for v, x in row.items() if v in new and x}
    assert in_rows <= {(c.user_id, c.video_id) for c in contributions.values() if c.value != 0.0}
    held = [json.loads(p.read_text())["videos"] for p in dumps]
    want = exact_item_solves(model, contributions)
    assert set(held[0]) == set(held[1]) and new <= set(want)
    for vid, x in want.items():
        assert held[0][vid] == held[1][vid], f"{vid}: workers disagree"
        got = np.frombuffer(bytes.fromhex(held[0][vid]), dtype="<f4")
        assert np.linalg.norm(got - x) / max(np.linalg.norm(x), 1e-12) < 1e-4, vid
