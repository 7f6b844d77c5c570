#!/usr/bin/env python3
"""Benchmark: the shared item side (new videos' factors solved by one owner per video and
installed by every worker) with three workers in one group on one broker.

Setup: the embedded broker (``--broker apache``: Apache Kafka 4 in KRaft mode); a model
trained by ``refold bootstrap`` on synthetic data (cached under .cache/bench_items);
``--new-videos`` videos new to the model, announced on ``videos`` one by one during the
run; 20% of the events (``--new-share``) are views of the videos announced so far.

Measured in the same run:
1. freshness, at an offered 1,000 events/s (``--rate``) through 3 workers: for each
   event on a new video, from the app's ``produce()`` (the record's Kafka timestamp)
   to the moment the *last* of the three workers installed an update of that video
   at least as new as the event (the update's ``event_ms``, the newest event time of the
   contributions it was solved from, is >= the event's). Workers log each install
   (``REFOLD_ITEMS_TRACE``); both ends are wall-clock times on this machine. This is
   the time until every worker's catalog holds factors reflecting the interaction,
   counted from before the handling worker read it, so it includes that worker's
   batch, the contribution's trip to the video's owner, the owner's solve and the
   update's trip to every worker. (When two workers' events on one video race, an
   update may carry the later event's time before the earlier contribution reached
   the owner: such an event counts as fresh slightly early; its own update follows
   in the owner's next turn.)
2. drain throughput, 3 workers against 1: the same backlog of events (new videos
   included) is produced first, then the workers start; the rate is events reflected
   in lists over the time between the first and the last list, as in bench_worker.

On a machine with fewer cores than workers the three processes share the cores: the
3-worker throughput then measures coordination cost more than scale-out.

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
from bench_worker import (  # noqa: E402
    Broker,
    ListReader,
    app_producer,
    build_model,
    event_bytes,
    start_broker,
    stop_worker,
    wait,
)

from worker.storage import load_model  # noqa: E402

PARTITIONS = 6


def topic_env(prefix: str) -> dict[str, str]:
    names = {
        "RATINGS": "ratings",
        "RECOMMENDATIONS": "recs",
        "DLQ": "dlq",
        "VIDEOS": "videos",
        "CHANGELOG": "changelog",
        "CONTROL": "models",
        "ITEM_CONTRIBUTIONS": "item-contributions",
        "ITEM_UPDATES": "item-updates",
        "POPULARITY_PAIRS": "popularity-pairs",
        "POPULARITY": "popularity",
    }
    return {f"REFOLD_TOPIC_{k}": f"{prefix}.{v}" for k, v in names.items()}


def start_worker(
    broker: Broker, model_dir: Path, prefix: str, i: int, trace: Path | None
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **topic_env(prefix),
        "REFOLD_BOOTSTRAP_SERVERS": broker.bootstrap,
        "REFOLD_MODEL": str(model_dir),
        "REFOLD_GROUP": f"{prefix}-g",
        "REFOLD_CLIENT_ID": f"{prefix}-w{i}",
        "REFOLD_FETCH_MAX_WAIT_MS": str(broker.worker_wait_ms),
        "REFOLD_CREATE_TOPICS_PARTITIONS": str(PARTITIONS),
    }
    if trace is not None:
        env["REFOLD_ITEMS_TRACE"] = str(trace)
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "worker"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def create_ratings(broker: Broker, prefix: str) -> None:
    """The ratings topic with PARTITIONS partitions, before any event is produced."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    name = topic_env(prefix)["REFOLD_TOPIC_RATINGS"]
    for f in admin.create_topics([NewTopic(name, PARTITIONS, 1)], operation_timeout=30).values():
        f.result(60)


def video_bytes(video_id: str) -> bytes:
    return json.dumps(
        {
            "video_id": video_id,
            "duration_seconds": 600.0,
            "category": "new",
            "author_id": "bench",
            "published_at": datetime.now(timezone.utc).isoformat(),
        }
    ).encode()


def make_events(
    rng: np.random.Generator,
    n: int,
    users: list[str],
    videos: list[str],
    new_videos: list[str],
    new_share: float,
) -> list[tuple[str, str, str, float, int]]:
    """(event id, user, video, watch seconds, index of the newest video announced so far).

    New videos are announced evenly over the stream; an event on a new video picks one of
    those announced before it (the first one is announced before the first event)."""
    tag = uuid.uuid4().hex[:6]
    per = max(1, n // len(new_videos))
    out = []
    for i in range(n):
        announced = min(len(new_videos), i // per + 1)
        if rng.random() < new_share:
            video = new_videos[int(rng.integers(0, announced))]
        else:
            video = videos[int(rng.integers(0, len(videos)))]
        user = users[int(rng.integers(0, len(users)))]
        out.append((f"{tag}-{i}", user, video, float(rng.uniform(60, 600)), announced))
    return out


def freshness(
    broker: Broker, model_dir: Path, events: list[tuple[str, str, str, float, int]], rate: float,
    new_videos: list[str], workers: int, tmp: Path,
) -> dict[str, Any]:  # fmt: skip
    prefix = f"fr{uuid.uuid4().hex[:6]}"
    traces = [tmp / f"{prefix}-w{i}.jsonl" for i in range(workers)]
    create_ratings(broker, prefix)
    fresh = frozenset(new_videos)
    reader = ListReader(broker.bootstrap, f"{prefix}.recs", broker.reader_wait_ms)
    reader.start()
    procs = [start_worker(broker, model_dir, prefix, i, traces[i]) for i in range(workers)]
    producer = app_producer(broker.bootstrap, 5)
    ratings, videos_topic = f"{prefix}.ratings", f"{prefix}.videos"
    sent_ms: dict[str, float] = {}
    try:
        # Warm up: every worker joined and serving (one list per worker's partitions).
        warm = [f"warm{i}" for i in range(4 * PARTITIONS)]
        for w in warm:
            producer.produce(ratings, event_bytes(w, w, events[0][2], 1.0), w.encode())
        producer.flush(30)
        wait(lambda: reader.progress("warm") >= len(warm), 180, "warm-up lists")
        announced = 0
        start = time.perf_counter()
        for i, (eid, user, video, watch, upto) in enumerate(events):
            while announced < upto:
                vid = new_videos[announced]
                producer.produce(videos_topic, video_bytes(vid), vid.encode())
                announced += 1
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if video in fresh:
                sent_ms[eid] = time.time() * 1000.0
            producer.produce(ratings, event_bytes(eid, user, video, watch), user.encode())
            producer.poll(0)
        if producer.flush(60):
            raise RuntimeError("the load generator's events were not all acknowledged")
        offered = len(events) / (time.perf_counter() - start)
        wait(lambda: reader.progress(events[0][0][:6]) >= len(events), 300, "all events")
        by_event = {e[0]: e for e in events}

        def fresh_times() -> list[float] | None:
            installs = [load_trace(t) for t in traces]
            out = []
            for eid, t_sent in sent_ms.items():
                video = by_event[eid][2]
                last = 0.0
                for per_worker in installs:
                    t = first_install(per_worker.get(video, []), t_sent)
                    if t is None:
                        return None
                    last = max(last, t)
                out.append(last - t_sent)
            return out

        got: list[list[float] | None] = [None]

        def settled() -> bool:
            got[0] = fresh_times()
            return got[0] is not None

        wait(settled, 120, "every worker holding every new video's latest factors")
    finally:
        for p in procs:
            stop_worker(p)
        reader.stop()
    lat = np.array(got[0])
    return {
        "freshness_p50_ms": float(np.percentile(lat, 50)),
        "freshness_p99_ms": float(np.percentile(lat, 99)),
        "freshness_max_ms": float(lat.max()),
        "new_video_events": len(lat),
        "offered_events_per_s": offered,
    }


def load_trace(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Per video, (update event_ms, installed_ms) of each update the worker installed."""
    out: dict[str, list[tuple[float, float]]] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if doc["installed"]:
            out.setdefault(doc["video_id"], []).append((doc["event_ms"], doc["installed_ms"]))
    return out


def first_install(installs: list[tuple[float, float]], event_ms: float) -> float | None:
    """When the first update at least as new as ``event_ms`` was installed.

    Kafka timestamps are whole milliseconds; the send time is the float before the
    produce(), so an update reflecting the event carries ``event_ms >= floor(sent)``."""
    floor = float(int(event_ms))
    times = [t for ms, t in installs if ms >= floor]
    return min(times) if times else None


def drain(
    broker: Broker, model_dir: Path, events: list[tuple[str, str, str, float, int]],
    new_videos: list[str], workers: int,
) -> float:  # fmt: skip
    """Events/s of ``workers`` workers draining a backlog of ``events``."""
    prefix = f"dr{uuid.uuid4().hex[:6]}"
    env = topic_env(prefix)
    create_ratings(broker, prefix)
    producer = app_producer(broker.bootstrap, 20)
    for vid in new_videos:
        producer.produce(env["REFOLD_TOPIC_VIDEOS"], video_bytes(vid), vid.encode())
    for eid, user, video, watch, _ in events:
        producer.produce(
            env["REFOLD_TOPIC_RATINGS"], event_bytes(eid, user, video, watch), user.encode()
        )
        producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("backlog not acknowledged")
    reader = ListReader(broker.bootstrap, f"{prefix}.recs", broker.reader_wait_ms)
    reader.start()
    procs = [start_worker(broker, model_dir, prefix, i, None) for i in range(workers)]
    try:
        wait(lambda: reader.progress() >= len(events), 900, "backlog reflected")
    finally:
        for p in procs:
            stop_worker(p)
        reader.stop()
    # Workers join at different moments: count from the first list, as bench_worker does.
    first_batch = sum(1 for t in reader.seen.values() if t <= reader.first)
    return (len(events) - first_batch) / (reader.last - reader.first)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--videos", type=int, default=20_000)
    ap.add_argument("--train-events", type=int, default=1_000_000)
    ap.add_argument("--factors", type=int, default=64)
    ap.add_argument("--events", type=int, default=20_000, help="events of the freshness run")
    ap.add_argument("--drain-events", type=int, default=40_000)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--new-videos", type=int, default=50)
    ap.add_argument("--new-share", type=float, default=0.2)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--broker", choices=("tansu", "apache"), default="tansu")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench_items")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.cache, args.users, args.videos, args.train_events, args.factors)
    m = load_model(model_dir)
    users, videos = list(m.users.ids), list(m.items.ids)
    rng = np.random.default_rng(11)
    tag = uuid.uuid4().hex[:4]
    result: dict[str, Any] = {
        "broker": args.broker,
        "workers": args.workers,
        "cpus": os.cpu_count(),
    }
    with start_broker(args.broker) as broker, tempfile.TemporaryDirectory() as tmp:
        new = [f"new-{tag}-{i}" for i in range(args.new_videos)]
        events = make_events(rng, args.events, users, videos, new, args.new_share)
        result.update(freshness(broker, model_dir, events, args.rate, new, args.workers, Path(tmp)))
        print(json.dumps({"freshness": result}), flush=True)
        for n in (args.workers, 1):
            new = [f"new-{tag}-d{n}-{i}" for i in range(args.new_videos)]
            backlog = make_events(rng, args.drain_events, users, videos, new, args.new_share)
            result[f"events_per_s_{n}"] = drain(broker, model_dir, backlog, new, n)
            print(json.dumps({f"events_per_s_{n}": result[f"events_per_s_{n}"]}), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
