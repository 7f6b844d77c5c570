"""Kafka I/O: client factories, topic creation, acknowledged publishing, dead letters.

It knows nothing of state or models. The worker's own clients (its consumers and
every producer) are confluent-kafka, i.e. librdkafka: its network I/O runs in C
threads, so a poll hands back what was prefetched without waiting for the
interpreter lock, and a produce costs about a microsecond. At 1,000 events/s on
two cores kafka-python's per-poll thread hand-offs and per-record Python cost
were most of the worker's end-to-end latency (README, Performance). The tools
that read a topic (tail, the demo and replay readers), topic administration and
the broker readiness probes use the same client.

Deserializers stay raw bytes: decoding happens in the loop, so that a bad
message can be dead-lettered instead of being retried forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, Producer
from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import TopicPartition as Partition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from worker.config import KafkaSettings
from worker.errors import BrokerError

log = logging.getLogger(__name__)
# librdkafka's own log lines go through Python logging instead of stderr.
_RDKAFKA_LOG = logging.getLogger("refold.rdkafka")

#: Header names on dead-letter records.
DLQ_HEADERS = (
    "refold.error.type",
    "refold.error.message",
    "refold.source.topic",
    "refold.source.partition",
    "refold.source.offset",
)
# Kafka header values are bytes; keep the reason short enough to read in a console.
_MAX_REASON_BYTES = 1024


class PublishError(BrokerError):
    """A record was not acknowledged by the brokers."""


def _rdkafka_conf(
    kafka: KafkaSettings, own: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, Any]:
    """Connection settings, then a factory's own properties, then the caller's overrides."""
    return {**kafka.rdkafka_config(), "logger": _RDKAFKA_LOG, **own, **overrides}


def make_producer(kafka: KafkaSettings, **overrides: Any) -> Producer:
    """A producer that waits for all in-sync replicas and sends raw bytes.

    ``overrides`` are librdkafka properties (``{"linger.ms": 20}`` is passed as
    ``**{"linger.ms": 20}``).
    """
    own: dict[str, Any] = {
        "acks": "all",
        # Keys land where the Java clients and kafka-python put them (murmur2), so a user's
        # events share a partition whichever client an app uses.
        "partitioner": "murmur2_random",
        # Publisher.confirm() flushes, and a flush sends at once: the linger only lets a
        # batch's records share requests when the loop is not flushing.
        "linger.ms": 5,
        "message.timeout.ms": 60_000,
    }
    return Producer(_rdkafka_conf(kafka, own, overrides))


def make_group_consumer(kafka: KafkaSettings, group: str, **overrides: Any) -> Consumer:
    """A group member with manual commits and raw-bytes values (the worker's ratings consumer)."""
    own: dict[str, Any] = {
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "on_commit": _log_commit_errors,
    }
    return Consumer(_rdkafka_conf(kafka, own, overrides))


def make_reader(kafka: KafkaSettings, **overrides: Any) -> Consumer:
    """A consumer for ``assign()`` only: it never joins a group or commits.

    librdkafka requires a ``group.id`` even then; this one is never used for a join.
    Partition ends are reported (``enable.partition.eof``), see :func:`drain`.
    """
    own: dict[str, Any] = {
        "group.id": "refold-reader-unused",
        "enable.auto.commit": False,
        # A start offset that no longer exists (a snapshot of a recreated topic) reads
        # from the beginning rather than skipping to the end.
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
    }
    return Consumer(_rdkafka_conf(kafka, own, overrides))


def _ready(consumer: Consumer, max_messages: int, timeout_s: float) -> list[Message]:
    """Wait up to ``timeout_s`` for one message, then take what is already queued.

    (``consume(n, timeout)`` alone would wait the whole timeout for ``n`` messages.)
    Messages may be error events (partition ends included).
    """
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, 0)] if max_messages > 1 else [first]


def poll_batch(consumer: Consumer, max_records: int, timeout_s: float) -> list[Message]:
    """Records that are ready (see :func:`_ready`).

    Partition-end events are dropped; other client errors are logged, and a fatal one
    raises :class:`BrokerError`.
    """
    out: list[Message] = []
    for m in _ready(consumer, max_records, timeout_s):
        err = m.error()
        if err is None:
            out.append(m)
        elif err.code() != RdKafkaError._PARTITION_EOF:
            _raise_if_fatal(err)
    return out


def position(m: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed record (set on every record without error)."""
    return m.topic() or "", m.partition() or 0, m.offset() or 0


def drain(
    consumer: Consumer,
    on_record: Callable[[Message], None],
    *,
    deadline_s: float,
    max_records: int = 10_000,
) -> dict[tuple[str, int], int] | None:
    """Read every assigned partition up to its end; ``on_record`` gets each record.

    The end is the high watermark that a fetch reports (a partition-end event of a
    :func:`make_reader` consumer), never a ListOffsets answer, which the embedded broker
    gets wrong. Returns the next offset of each ``(topic, partition)``, or None if the
    deadline passed first.
    """
    assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
    ended: dict[tuple[str, int], int] = {}
    end = time.monotonic() + deadline_s
    while not assigned <= ended.keys():
        if time.monotonic() > end:
            return None
        for m in _ready(consumer, max_records, 0.2):
            err = m.error()
            if err is None:
                on_record(m)
            elif err.code() == RdKafkaError._PARTITION_EOF:
                topic, partition, offset = position(m)
                ended[(topic, partition)] = offset
            else:
                _raise_if_fatal(err)
    return ended


def _raise_if_fatal(err: RdKafkaError) -> None:
    if err.fatal():
        raise BrokerError(f"Kafka client error: {err.str()}")
    log.warning("Kafka client error: %s", err.str())


def _log_commit_errors(err: RdKafkaError | None, partitions: list[Any]) -> None:
    if err is not None and err.code() != RdKafkaError._NO_OFFSET:
        log.warning("offset commit failed: %s", err.str())


def wait_for_topics(
    client: Producer | Consumer,
    topics: Iterable[str],
    *,
    deadline_s: float | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> dict[str, int] | None:
    """Partitions of each of ``topics`` once ``client``'s metadata shows every partition
    with a leader; None if ``deadline_s`` passes or ``stop()`` turns true first.

    A just-created topic's metadata and leaders propagate asynchronously. Asking here
    also fills the client's metadata cache: a producer whose first record goes to a
    partition without a known leader holds it until a metadata refresh finds one
    (librdkafka retries every ``topic.metadata.refresh.fast.interval.ms``, 100 ms).
    Asks for all topics: naming a missing one would create it on brokers that
    auto-create topics.
    """
    wanted = set(topics)
    end = None if deadline_s is None else time.monotonic() + deadline_s
    while True:
        timeout = 10.0 if end is None else min(10.0, max(0.1, end - time.monotonic()))
        md = _metadata(client, timeout).topics
        ready = {
            t: len(md[t].partitions)
            for t in wanted
            if t in md
            and md[t].error is None
            and md[t].partitions
            and all(p.leader >= 0 and p.error is None for p in md[t].partitions.values())
        }
        if len(ready) == len(wanted):
            return ready
        if stop() or (end is not None and time.monotonic() > end):
            return None
        time.sleep(0.02)  # not there yet: ask the metadata again


def open_topic_reader(
    kafka: KafkaSettings,
    topic: str,
    *,
    deadline_s: float | None = None,
    stop: Callable[[], bool] = lambda: False,
    **overrides: Any,
) -> Consumer | None:
    """A :func:`make_reader` on every partition of ``topic``, from the beginning.

    Waits for the topic to exist (the worker creates its topics when it starts); None
    if ``deadline_s`` passes or ``stop()`` turns true first.
    """
    consumer = make_reader(kafka, **overrides)
    try:
        found = wait_for_topics(consumer, [topic], deadline_s=deadline_s, stop=stop)
    except BaseException:
        consumer.close()
        raise
    if found is None:
        consumer.close()
        return None
    consumer.assign([Partition(topic, p, OFFSET_BEGINNING) for p in range(found[topic])])
    return consumer


def cluster_brokers(bootstrap: str, timeout_s: float) -> set[int]:
    """Node ids of the brokers in the cluster's metadata (a readiness probe).

    Raises :class:`BrokerError` if no metadata came within ``timeout_s``. The probe
    reconnects quickly and keeps librdkafka's connection-refused lines out of the logs.
    """
    admin = AdminClient(
        {
            "bootstrap.servers": bootstrap,
            "client.id": "refold-ready-probe",
            "reconnect.backoff.ms": 20,
            "reconnect.backoff.max.ms": 100,
            "log_level": 0,
        }
    )
    return set(_metadata(admin, timeout_s).brokers)


def _metadata(client: Producer | Consumer | AdminClient, timeout_s: float) -> Any:
    """The cluster metadata (all topics), or :class:`BrokerError` if none came in time."""
    try:
        return client.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise BrokerError(f"no cluster metadata within {timeout_s}s: {exc}") from exc


def topic_partitions(
    client: Producer | Consumer, topic: str, timeout_s: float = 10.0
) -> int | None:
    """Number of partitions of ``topic`` as the cluster metadata says, or None.

    Asks for all topics: a metadata request naming a missing topic would create it on
    brokers that auto-create topics.
    """
    md = _metadata(client, timeout_s).topics.get(topic)
    if md is None or md.error is not None or not md.partitions:
        return None
    return len(md.partitions)


def ensure_topics(
    kafka: KafkaSettings,
    partitions: Mapping[str, int],
    *,
    compacted: Iterable[str] = (),
    timeout_s: float = 30.0,
) -> None:
    """Create the topics that are missing; existing ones are left as they are."""
    compact = set(compacted)
    admin = AdminClient(_rdkafka_conf(kafka, {}, {}))
    md = _metadata(admin, timeout_s)
    # One broker (development, tests): replication 1. More: the cluster's default.
    replication = 1 if len(md.brokers) == 1 else -1
    new = [
        NewTopic(
            name,
            num_partitions=n,
            replication_factor=replication,
            config={"cleanup.policy": "compact"} if name in compact else {},
        )
        for name, n in partitions.items()
        if name not in md.topics
    ]
    if not new:
        return
    for name, future in admin.create_topics(new, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, RdKafkaError) and err.code() == RdKafkaError.TOPIC_ALREADY_EXISTS:
                continue  # another worker created it first
            raise BrokerError(f"cannot create topic {name}: {exc}") from exc


def dead_letter_headers(
    error_type: str, message: str, topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    """Reason and source position headers of a dead-letter record."""
    reason = message.encode("utf-8", "backslashreplace")[:_MAX_REASON_BYTES]
    return [
        ("refold.error.type", error_type.encode()),
        ("refold.error.message", reason),
        ("refold.source.topic", topic.encode()),
        ("refold.source.partition", str(partition).encode()),
        ("refold.source.offset", str(offset).encode()),
    ]


class Ack(NamedTuple):
    """Where the brokers stored an acknowledged record."""

    topic: str
    partition: int
    offset: int


class Publisher:
    """Sends records and later verifies that every one of them was acknowledged."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self._sent = 0
        self._acked: list[Ack] = []
        self._failed: list[str] = []

    def _on_delivery(self, err: RdKafkaError | None, msg: Message) -> None:
        if err is None:
            self._acked.append(Ack(*position(msg)))
        else:
            self._failed.append(f"{msg.topic()}: {err.str()}")

    def send(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> None:
        kw: dict[str, Any] = {"on_delivery": self._on_delivery}
        if headers:
            kw["headers"] = headers
        if partition is not None:
            kw["partition"] = partition
        while True:
            try:
                self.producer.produce(topic, value, key, **kw)
                break
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                self.producer.poll(0.1)
        self._sent += 1

    def confirm(self, timeout_s: float = 30.0) -> list[Ack]:
        """Flush; raise :class:`PublishError` unless every pending record was acknowledged.

        Returns where each record was stored, in acknowledgement order.
        """
        if not self._sent:
            return []
        remaining = self.producer.flush(timeout_s)
        acked, failed = self._acked, self._failed
        self._sent, self._acked, self._failed = 0, [], []
        if remaining:
            raise PublishError(f"{remaining} records not acknowledged within {timeout_s}s")
        if failed:
            raise PublishError(f"{len(failed)} records not acknowledged: {failed[0]}")
        return acked

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (best effort), then close the producer."""
        self.producer.flush(timeout_s)
        self.producer.close()


def announce_model(kafka: KafkaSettings, control_topic: str, model_dir: Any) -> dict[str, str]:
    """Announce a model directory on the control topic (what ``refold swap`` sends):
    ``{"model_dir", "version"}`` keyed ``model``, acknowledged before returning."""
    import json
    from pathlib import Path

    from worker.storage import read_manifest

    path = Path(model_dir).resolve()
    manifest = read_manifest(path)
    pub = Publisher(make_producer(kafka))
    doc = {"model_dir": str(path), "version": str(manifest["version"])}
    try:
        pub.send(control_topic, key=b"model", value=json.dumps(doc).encode())
        pub.confirm()
    finally:
        pub.close()
    return doc
