"""The real Apache Kafka broker wrapper: start, produce/consume, restart keeps data.

Runs only with ``REFOLD_TEST_BROKER=apache`` (needs Java 17+ and the Kafka jars,
which ``scripts/kafka/fetch`` downloads from Maven Central on first use).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.structs import OffsetAndMetadata

from worker.brokers.apache import ApacheKafkaBroker

pytestmark = [
    pytest.mark.apache,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("REFOLD_TEST_BROKER") != "apache",
        reason="set REFOLD_TEST_BROKER=apache to run against a real Apache Kafka broker",
    ),
]

TOPIC = "refold-apache-smoke"
GROUP = "refold-apache-smoke-group"
#: Deadline for one client round trip (produce ack, consume, commit).
CLIENT_DEADLINE_S = 60.0
#: kafka-python poll slice while waiting for records under a deadline.
POLL_MS = 500


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ApacheKafkaBroker]:
    """A started broker in a fresh directory; always stopped afterwards."""
    b = ApacheKafkaBroker(data_dir=tmp_path / "kafka")
    b.start()
    try:
        yield b
    finally:
        b.stop()


def _produce(bootstrap: str, key: bytes, value: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        producer.send(TOPIC, key=key, value=value).get(timeout=CLIENT_DEADLINE_S)
    finally:
        producer.close()


def _read_all(bootstrap: str, expected: int) -> list[tuple[bytes | None, bytes | None]]:
    """Read partition 0 from the beginning until ``expected`` records or the deadline."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    tp = TopicPartition(TOPIC, 0)
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got: list[tuple[bytes | None, bytes | None]] = []
        deadline = time.monotonic() + CLIENT_DEADLINE_S
        while len(got) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=POLL_MS).values():
                got.extend((r.key, r.value) for r in records)
        return got
    finally:
        consumer.close()


def _commit(bootstrap: str, offset: int) -> None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=GROUP, enable_auto_commit=False)
    tp = TopicPartition(TOPIC, 0)
    try:
        consumer.assign([tp])
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1)})
    finally:
        consumer.close()


def _committed(bootstrap: str) -> int | None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=GROUP, enable_auto_commit=False)
    try:
        offset = consumer.committed(TopicPartition(TOPIC, 0))
        return None if offset is None else int(offset)
    finally:
        consumer.close()


def test_produce_consume_and_data_survives_restart(broker: ApacheKafkaBroker) -> None:
    bootstrap = broker.bootstrap_servers
    assert bootstrap == f"127.0.0.1:{broker.port}"
    first_pid = broker.pid
    assert first_pid is not None
    assert broker.pid_file.read_text().strip() == str(first_pid)

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=1)])
        assert TOPIC in admin.list_topics()
    finally:
        admin.close()

    _produce(bootstrap, b"user-1", b"hello")
    assert _read_all(bootstrap, 1) == [(b"user-1", b"hello")]
    _commit(bootstrap, 1)
    assert _committed(bootstrap) == 1

    broker.restart()
    assert broker.bootstrap_servers == bootstrap  # same port after restart
    assert broker.pid not in (None, first_pid)
    assert _read_all(bootstrap, 1) == [(b"user-1", b"hello")]
    assert _committed(bootstrap) == 1

    # An unclean stop (SIGKILL) followed by a start recovers the same data too.
    _produce(bootstrap, b"user-2", b"again")
    broker.kill()
    assert broker.pid is None
    assert not broker.pid_file.exists()
    broker.start()
    assert _read_all(bootstrap, 2) == [(b"user-1", b"hello"), (b"user-2", b"again")]

    broker.stop()
    assert broker.pid is None
    assert not broker.pid_file.exists()
