#!/usr/bin/env python3
"""Benchmark: refold's worker vs the naive per-event loop a seed user would write.

Setup: the embedded broker (``--broker apache``: Apache Kafka 4 in KRaft mode,
from its Maven jars, as the tests run it); a model of 200k users (with
bootstrap rows) and 100k videos × 64 factors, trained by ``refold bootstrap``
on synthetic data (cached under .cache/bench_worker).

Measured in the same run:
1. sustained events/s from ``ratings`` to ``recommendations``: 100k events
   spread uniformly over users (little coalescing) are produced first, then a
   worker process drains them; the rate is events reflected in lists over the
   time between the first and last list;
2. end-to-end latency p50/p95/p99 over 10 s at an offered 1,000 events/s (a
   longer run measures the embedded broker more than the worker: its fetches
   get dearer with every record batch in a partition, so the JSON line also
   gives the p99 of the first and of the last second): from the app's
   ``produce()`` of each event to the arrival of the list that reflects it at
   a consumer (both on CLOCK_MONOTONIC). The app producer and the list reader
   are librdkafka clients, as most apps' are; the producer lingers 5 ms, the
   default of librdkafka and of the Apache Kafka 4 clients
   (``--app-linger-ms``), and the linger counts in the latency. The list
   reader runs in a process of its own. Each latency run starts a worker of its
   own, and every event counts from its first (``--lead-in-s`` can leave the
   start of the stream uncounted). On Apache Kafka, 60 s of the same traffic (``--warmup-s``) come
   first, uncounted: a JVM that has just started compiles its hot paths under
   the first minute of traffic, and a deployed broker runs for weeks. The JSON
   line keeps the p99 of each warm-up run;
3. the naive loop: per event, implicit ``recommend(..., recalculate_user=True)``
   on the user's updated row, then produce the list, the same Kafka in and out.

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from kafka import KafkaConsumer, KafkaProducer  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from worker.brokers.apache import ApacheKafkaBroker  # noqa: E402
from worker.brokers.tansu import TansuBroker  # noqa: E402
from worker.storage import load_model  # noqa: E402


@dataclass(frozen=True)
class Broker:
    """A running broker and the fetch waits its clients use (README, Brokers).

    The embedded broker answers a fetch only at one of its checks within the wait,
    so its clients wait briefly (worker 10 ms, the default, and list reader 5 ms).
    Apache Kafka answers as soon as data arrives: the worker waits 500 ms, as
    docker compose sets it, and the reader keeps librdkafka's default, 500 ms.
    """

    name: str
    bootstrap: str
    worker_wait_ms: int
    reader_wait_ms: int


@contextmanager
def start_broker(name: str) -> Iterator[Broker]:
    if name == "tansu":
        with TansuBroker() as tansu:
            yield Broker(name, tansu.bootstrap_servers, worker_wait_ms=10, reader_wait_ms=5)
    else:
        with (
            tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp,
            ApacheKafkaBroker(data_dir=Path(tmp)) as kafka,
        ):
            yield Broker(name, kafka.bootstrap_servers, worker_wait_ms=500, reader_wait_ms=500)


def build_model(
    cache: Path,
    users: int,
    videos: int,
    events: int,
    factors: int,
    decay: str = "none",
    half_life: float = 25.0,
) -> Path:
    suffix = "" if decay == "none" else f"-{decay}{half_life:g}"
    model_dir = cache / f"model-{users}-{videos}-{events}-{factors}{suffix}"
    if (model_dir / "manifest.json").exists():
        return model_dir
    from worker.core.model import AlsParams
    from worker.data.synth import synthesize
    from worker.train import DEFAULT_ALPHA, DEFAULT_REGULARIZATION, bootstrap

    data = cache / f"data-{users}-{videos}-{events}"
    if not (data / "logs.parquet").exists():
        synthesize(data, users=users, videos=videos, events=events, seed=7, progress=False)
    bootstrap(
        data / "logs.parquet",
        data / "video_stat.parquet",
        model_dir,
        params=AlsParams(
            factors=factors,
            regularization=DEFAULT_REGULARIZATION,
            alpha=DEFAULT_ALPHA,
            iterations=5,  # enough for realistic factor norms; quality is not measured here
            decay=decay,  # type: ignore[arg-type]
            decay_half_life=half_life,
        ),
        progress=False,
    )
    return model_dir


def event_bytes(eid: str, user: str, video: str, watch: float) -> bytes:
    return json.dumps(
        {
            "event_id": eid,
            "user_id": user,
            "video_id": video,
            "action": "view",
            "watch_seconds": watch,
            "ts": datetime.now(timezone.utc).isoformat(),
        }
    ).encode()


def _read_lists(bootstrap: str, topic: str, fetch_wait_ms: int, conn: Connection) -> None:
    """Reader process: the arrival time of every event id reflected in a list."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer
    from confluent_kafka import TopicPartition as Partition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-reader-unused",  # assign() only: no join, no commits
            "enable.auto.commit": False,
            "fetch.wait.max.ms": fetch_wait_ms,
        }
    )
    while True:
        md = consumer.list_topics(timeout=10).topics.get(topic)
        if md is not None and md.partitions:
            break
        time.sleep(0.05)  # topic not created yet
    consumer.assign([Partition(topic, p, OFFSET_BEGINNING) for p in md.partitions])
    seen: dict[str, float] = {}
    first, last = 0.0, 0.0
    while True:
        if conn.poll():  # a request: ("count", id prefix), ("time", id) or ("stop", None)
            what, arg = conn.recv()
            if what == "stop":
                break
            if what == "count":
                conn.send(len(seen) if not arg else sum(1 for e in seen if e.startswith(arg)))
            else:
                conn.send(seen.get(arg))
        m = consumer.poll(0.05)
        if m is None:
            continue
        now = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        for r in (m, *consumer.consume(10_000, 0)):
            if r.error() is not None:
                continue
            for e in json.loads(r.value())["event_ids"]:
                seen.setdefault(e, now)
            first = first or now
            last = now
    consumer.close()
    conn.send((seen, first, last))


class ListReader:
    """Records the arrival time of every event id reflected in a list.

    It runs in a process of its own, as an app's consumer would: sharing the load
    generator's interpreter lock would delay both the sends and the arrival times.
    """

    def __init__(self, bootstrap: str, topic: str, fetch_wait_ms: int = 5) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_read_lists, args=(bootstrap, topic, fetch_wait_ms, child), daemon=True
        )
        self.seen: dict[str, float] = {}
        self.first = self.last = 0.0

    def start(self) -> None:
        self._proc.start()

    def _ask(self, what: str, arg: str | None) -> Any:
        # Asked for: a reader that wrote unasked would fill the pipe while the load
        # generator is busy, and then block.
        self._conn.send((what, arg))
        if not self._conn.poll(120):  # it answers between two polls once the topic exists
            raise TimeoutError("list reader did not answer")
        return self._conn.recv()

    def progress(self, prefix: str = "") -> int:
        """Event ids seen so far (those starting with ``prefix``)."""
        count: int = self._ask("count", prefix)
        return count

    def arrival(self, event_id: str) -> float | None:
        """When the first list reflecting ``event_id`` arrived, or None."""
        t: float | None = self._ask("time", event_id)
        return t

    def stop(self) -> None:
        self._conn.send(("stop", None))
        self.seen, self.first, self.last = self._conn.recv()
        self._proc.join(timeout=30)


def wait(cond, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_worker(
    broker: Broker, model_dir: Path, prefix: str, durable: bool
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "REFOLD_BOOTSTRAP_SERVERS": broker.bootstrap,
        "REFOLD_MODEL": str(model_dir),
        "REFOLD_GROUP": f"{prefix}-g",
        "REFOLD_TOPIC_RATINGS": f"{prefix}.ratings",
        "REFOLD_TOPIC_RECOMMENDATIONS": f"{prefix}.recs",
        "REFOLD_TOPIC_DLQ": f"{prefix}.dlq",
        "REFOLD_TOPIC_VIDEOS": f"{prefix}.videos",
        "REFOLD_TOPIC_CHANGELOG": f"{prefix}.changelog",
        "REFOLD_TOPIC_CONTROL": f"{prefix}.models",
        "REFOLD_TOPIC_ITEM_CONTRIBUTIONS": f"{prefix}.item-contributions",
        "REFOLD_TOPIC_ITEM_UPDATES": f"{prefix}.item-updates",
        "REFOLD_TOPIC_POPULARITY_PAIRS": f"{prefix}.popularity-pairs",
        "REFOLD_TOPIC_POPULARITY": f"{prefix}.popularity",
        "REFOLD_DURABLE": "true" if durable else "false",
        "REFOLD_FETCH_MAX_WAIT_MS": str(broker.worker_wait_ms),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "worker"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sample_events(
    rng: np.random.Generator, n: int, users: list[str], videos: list[str]
) -> list[tuple[str, str, str, float]]:
    u = rng.integers(0, len(users), n)
    v = rng.integers(0, len(videos), n)
    w = rng.uniform(5, 600, n)
    tag = uuid.uuid4().hex[:6]
    return [(f"{tag}-{i}", users[u[i]], videos[v[i]], float(w[i])) for i in range(n)]


def throughput(broker: Broker, model_dir: Path, events, durable: bool = True) -> float:
    prefix = f"tp{uuid.uuid4().hex[:6]}"
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap, linger_ms=20, batch_size=256 * 1024, acks=1
    )
    for eid, user, video, watch in events:
        producer.send(
            f"{prefix}.ratings", key=user.encode(), value=event_bytes(eid, user, video, watch)
        )
    producer.flush()
    producer.close()
    reader = ListReader(broker.bootstrap, f"{prefix}.recs", broker.reader_wait_ms)
    reader.start()
    proc = run_worker(broker, model_dir, prefix, durable)
    try:
        wait(lambda: reader.progress() >= len(events), 900, "all events reflected")
    finally:
        stop_worker(proc)
        reader.stop()
    # The first list comes after the worker's start-up; count the events after it.
    first_batch = sum(1 for t in reader.seen.values() if t <= reader.first)
    return (len(events) - first_batch) / (reader.last - reader.first)


def app_producer(bootstrap: str, linger_ms: int) -> Any:
    """An app's producer: librdkafka (what most apps use, through it or the Java client)."""
    from confluent_kafka import Producer

    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": linger_ms,
            "acks": 1,
            "partitioner": "murmur2_random",  # the Java clients' and kafka-python's choice
        }
    )


@dataclass
class Stream:
    """What :func:`paced_stream` measured: each event's send time and the list arrivals."""

    sent: np.ndarray  # perf_counter() at each event's produce(), in event order
    arrivals: np.ndarray  # when the first list reflecting each event arrived
    offered_events_per_s: float


def paced_stream(
    broker: Broker,
    model_dir: Path,
    events: list[tuple[str, str, str, float]],
    rate: float,
    linger_ms: int = 5,
    before_send: Callable[[int, Any, str], None] | None = None,
) -> Stream:
    """A fresh worker serving ``events`` sent by an app producer at ``rate`` per second.

    ``before_send(i, producer, prefix)`` runs before event ``i`` is sent (bench_swap
    announces a model from it); the worker's topics are named ``{prefix}.*``.
    """
    prefix = f"lat{uuid.uuid4().hex[:6]}"
    reader = ListReader(broker.bootstrap, f"{prefix}.recs", broker.reader_wait_ms)
    reader.start()
    proc = run_worker(broker, model_dir, prefix, durable=True)
    producer = app_producer(broker.bootstrap, linger_ms)
    topic = f"{prefix}.ratings"
    sent = np.zeros(len(events))
    try:
        # Warm up: the group join and the first fetches are not steady state.
        producer.produce(topic, event_bytes("warm", "warm", events[0][2], 1.0), b"warm")
        producer.flush(30)
        wait(lambda: reader.progress() >= 1, 120, "warm-up list")
        start = time.perf_counter()
        for i, (eid, user, video, watch) in enumerate(events):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if before_send is not None:
                before_send(i, producer, prefix)
            sent[i] = time.perf_counter()
            producer.produce(topic, event_bytes(eid, user, video, watch), user.encode())
            producer.poll(0)  # serve delivery reports
        if producer.flush(60):
            raise RuntimeError("the load generator's events were not all acknowledged")
        offered = len(events) / (time.perf_counter() - start)
        wait(lambda: reader.progress() >= len(events) + 1, 120, "latency events")
    finally:
        stop_worker(proc)
        reader.stop()
    arrivals = np.array([reader.seen[e[0]] for e in events])
    return Stream(sent=sent, arrivals=arrivals, offered_events_per_s=offered)


def p99_by_second(lat_ms: np.ndarray, rate: float) -> list[float]:
    """p99 per second of the stream, bucketed by when each event was due (event i at
    i / rate), so that every second holds the same number of events (by send time, a
    last sliver of a few events could stand for the whole last second)."""
    second = (np.arange(len(lat_ms)) / rate).astype(int)
    return [float(np.percentile(lat_ms[second == s], 99)) for s in np.unique(second)]


def latency(
    broker: Broker, model_dir: Path, events, rate: float, linger_ms: int = 5, lead_in: int = 0
) -> dict[str, Any]:
    """Latency of ``events[lead_in:]``; the first ``lead_in`` events are sent, not counted."""
    run = paced_stream(broker, model_dir, events, rate, linger_ms)
    lat = (run.arrivals - run.sent)[lead_in:] * 1000.0
    # Per second of sending: on the embedded broker latency grows through the run, as its
    # fetches get dearer with every record batch in a partition (README, Brokers).
    by_second = p99_by_second(lat, rate)
    return {
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "offered_events_per_s": run.offered_events_per_s,
        "p99_ms_first_second": by_second[0],
        "p99_ms_last_second": by_second[-1],
        "p99_ms_by_second": [round(v, 1) for v in by_second],
    }


def naive(bootstrap: str, model_dir: Path, events) -> float:
    """The loop a seed user writes: per event, recalculate_user + recommend, then produce."""
    from implicit.cpu.als import AlternatingLeastSquares

    m = load_model(model_dir)
    als = AlternatingLeastSquares(
        factors=m.params.factors,
        regularization=m.params.regularization,
        alpha=m.params.alpha,
        num_threads=1,  # one event at a time: thread start-up per call only costs
    )
    als.user_factors = m.user_factors
    als.item_factors = m.item_factors
    # Per-user histories as dicts, filled from the bootstrap rows on first touch; each
    # event builds its one-row CSR straight from arrays (no lil/COO conversions).
    csr = m.user_rows
    history: dict[int, dict[int, float]] = {}
    n_items = m.n_items
    prefix = f"nv{uuid.uuid4().hex[:6]}"
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks=1)
    for eid, user, video, watch in events:
        producer.send(
            f"{prefix}.ratings", key=user.encode(), value=event_bytes(eid, user, video, watch)
        )
    producer.flush()
    consumer = KafkaConsumer(
        f"{prefix}.ratings",
        bootstrap_servers=bootstrap,
        group_id=f"{prefix}-g",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        enable_auto_commit=False,
    )
    durations = dict(zip(m.items.ids, m.videos.duration_s.tolist(), strict=True))
    done = 0
    start = None
    with threadpool_limits(1, "blas"):
        while done < len(events):
            for recs in consumer.poll(timeout_ms=200, max_records=500).values():
                start = start or time.perf_counter()
                for r in recs:
                    e = json.loads(r.value)
                    uid = m.users.get(e["user_id"])
                    iid = m.items.get(e["video_id"])
                    row = history.get(uid)
                    if row is None:
                        lo, hi = csr.indptr[uid], csr.indptr[uid + 1]
                        row = history[uid] = dict(
                            zip(csr.indices[lo:hi].tolist(), csr.data[lo:hi].tolist(), strict=True)
                        )
                    row[iid] = row.get(iid, 0.0) + min(
                        e["watch_seconds"] / durations[e["video_id"]], 1.0
                    )
                    cols = np.fromiter(row.keys(), dtype=np.int32, count=len(row))
                    vals = np.fromiter(row.values(), dtype=np.float32, count=len(row))
                    user_items = sp.csr_matrix((vals, cols, [0, len(row)]), shape=(1, n_items))
                    ids, scores = als.recommend(
                        uid,
                        user_items,
                        N=10,
                        filter_already_liked_items=True,
                        recalculate_user=True,
                    )
                    doc = {
                        "user_id": e["user_id"],
                        "items": [
                            {"video_id": m.items.id_of(int(i)), "score": float(s)}
                            for i, s in zip(ids, scores, strict=True)
                        ],
                        "event_ids": [e["event_id"]],
                    }
                    producer.send(f"{prefix}.recs", key=r.key, value=json.dumps(doc).encode())
                    done += 1
                consumer.commit()
    producer.flush()
    elapsed = time.perf_counter() - start
    consumer.close()
    producer.close()
    return len(events) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--videos", type=int, default=100_000)
    ap.add_argument("--train-events", type=int, default=3_000_000)
    ap.add_argument("--factors", type=int, default=64)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--naive-events", type=int, default=3_000)
    ap.add_argument("--latency-events", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument(
        "--app-linger-ms", type=int, default=5, help="linger of the app producer (latency run)"
    )
    ap.add_argument(
        "--broker",
        choices=("tansu", "apache"),
        default="tansu",
        help="the embedded broker (default) or Apache Kafka 4 (KRaft, from its Maven jars)",
    )
    ap.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help="seconds of the latency run's traffic before the measured run, not counted "
        "(default: 60 on Apache Kafka, whose JVM compiles its hot paths under the first "
        "minute of traffic; 0 on the embedded broker, which has nothing to warm)",
    )
    ap.add_argument(
        "--lead-in-s",
        type=float,
        default=0.0,
        help="seconds of each latency run's stream sent before the measured events and not "
        "counted (default 0: every event counts, the worker's first second included)",
    )
    ap.add_argument(
        "--decay",
        choices=("none", "items", "time"),
        default="none",
        help="row recency decay of the benchmark model (AlsParams.decay; default none)",
    )
    ap.add_argument("--decay-half-life", type=float, default=25.0)
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench_worker")
    args = ap.parse_args()
    if args.warmup_s is None:
        args.warmup_s = 60.0 if args.broker == "apache" else 0.0
    args.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = build_model(
        args.cache,
        args.users,
        args.videos,
        args.train_events,
        args.factors,
        args.decay,
        args.decay_half_life,
    )
    m = load_model(model_dir)
    users, videos = list(m.users.ids), list(m.items.ids)
    print(
        f"model ready in {time.perf_counter() - t0:.0f}s: {len(users)} users, {len(videos)} videos",
        flush=True,
    )
    rng = np.random.default_rng(3)
    warmup: list[float] = []
    with start_broker(args.broker) as broker:
        eps = throughput(broker, model_dir, sample_events(rng, args.events, users, videos))
        print(f"refold: {eps:.0f} events/s", flush=True)
        lead_in = int(args.lead_in_s * args.rate)

        def run(n: int) -> dict[str, Any]:
            events = sample_events(rng, lead_in + n, users, videos)
            return latency(broker, model_dir, events, args.rate, args.app_linger_ms, lead_in)

        # Warm-up runs: the same traffic in runs of at most 10 s (plus the lead-in), each
        # with a worker and topics of its own; only their p99 is kept, to show the warm-up.
        left = int(args.warmup_s * args.rate)
        while left > 0:
            n = min(left, int(10 * args.rate))
            r = run(n)
            warmup.append(round(r["p99_ms"], 2))
            print(f"warm-up run: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms", flush=True)
            left -= n
        lat = run(args.latency_events)
        print(f"latency: {lat}", flush=True)
        naive_eps = naive(
            broker.bootstrap, model_dir, sample_events(rng, args.naive_events, users, videos)
        )
        print(f"naive: {naive_eps:.0f} events/s", flush=True)
    result = {
        "events_per_s": round(eps, 1),
        "naive_events_per_s": round(naive_eps, 1),
        "speedup": round(eps / naive_eps, 2),
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in lat.items()},
        "users": len(users),
        "videos": len(videos),
        "factors": args.factors,
        "events": args.events,
        "app_linger_ms": args.app_linger_ms,
        "broker": args.broker,
        "warmup_s": args.warmup_s,
        "warmup_p99_ms": warmup,
        "lead_in_s": args.lead_in_s,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
