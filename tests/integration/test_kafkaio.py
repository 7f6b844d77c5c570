"""Kafka helpers of worker.kafkaio against the real broker."""

from __future__ import annotations

import uuid

import pytest

from worker.config import KafkaSettings
from worker.kafkaio import ensure_topics, make_producer, wait_for_topics

pytestmark = pytest.mark.integration


def test_wait_for_topics_sees_a_new_topics_leaders_and_times_out_on_a_missing_topic(
    broker: str,
) -> None:
    kafka = KafkaSettings(bootstrap_servers=broker)
    producer = make_producer(kafka)
    topic = f"leaders-{uuid.uuid4().hex[:8]}"
    # It asks for all topics, so the missing one is not auto-created by the asking.
    assert wait_for_topics(producer, [topic], deadline_s=0.5) is None
    ensure_topics(kafka, {topic: 3})
    assert wait_for_topics(producer, [topic], deadline_s=30.0) == {topic: 3}
    partitions = producer.list_topics(timeout=10).topics[topic].partitions
    assert sorted(partitions) == [0, 1, 2]
    assert all(p.leader >= 0 for p in partitions.values())
    producer.produce(topic, b"x", b"k")
    assert producer.flush(10) == 0
