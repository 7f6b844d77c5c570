#!/usr/bin/env python3
"""Benchmark: recovery after kill -9 with state for 1M users, and the cost of durability.

Setup: the embedded broker; a changelog holding the state of 1,000,000 users
(10 videos each, as a worker writes it), and a small bootstrapped model.

1. Cold start: a worker restores all 1M users from the changelog (reported as
   ``cold_restore_s``) and, having read a long tail, writes a local snapshot.
2. Under load, the worker is killed with SIGKILL and started again with the
   same state directory. ``recovery_s`` is the time from the restart to the
   first list for an event sent at the restart: it includes the interpreter
   start, the model load, the group join (the dead member's 2 s session must
   expire first), the snapshot load (in parallel with the join) and the
   changelog tail. Static membership is not used: on the embedded broker a
   static member's rejoin took about 6 s.
3. Durability overhead: the same 60k-event stream drained by a worker with the
   changelog and by one without it, in ``--overhead-pairs`` (7) alternating
   pairs; ``durability_overhead = 1 - median(durable)/median(plain)``. On the
   shared 2-core machine one 30k-event drain varied from 4,500 to 7,450
   events/s, and runs of five such pairs gave overheads from -1% to 20%.

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
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
from bench_worker import ListReader, event_bytes, stop_worker, wait  # noqa: E402
from kafka import KafkaProducer  # noqa: E402
from kafka.partitioner.default import murmur2  # noqa: E402

from worker.brokers.tansu import TansuBroker  # noqa: E402
from worker.config import KafkaSettings  # noqa: E402
from worker.kafkaio import ensure_topics  # noqa: E402
from worker.storage import load_model  # noqa: E402

PARTITIONS = 4


def build_model(cache: Path) -> Path:
    model_dir = cache / "model"
    if (model_dir / "manifest.json").exists():
        return model_dir
    from worker.data.synth import synthesize
    from worker.train import bootstrap

    synthesize(cache / "data", users=2000, videos=5000, events=200_000, seed=3, progress=False)
    bootstrap(
        cache / "data" / "logs.parquet",
        cache / "data" / "video_stat.parquet",
        model_dir,
        factors=64,
        iterations=5,
        progress=False,
    )
    return model_dir


def topic_names(prefix: str) -> dict[str, str]:
    from worker.config import TopicSettings

    return {
        **{name: f"{prefix}.{name}" for name in TopicSettings.model_fields},
        "ratings": f"{prefix}.ratings",
        "recommendations": f"{prefix}.recs",
        "videos": f"{prefix}.videos",
        "dlq": f"{prefix}.dlq",
        "changelog": f"{prefix}.changelog",
        "control": f"{prefix}.models",
    }


def create(bootstrap: str, t: dict[str, str]) -> None:
    ensure_topics(
        KafkaSettings(bootstrap_servers=bootstrap),
        {
            t["ratings"]: PARTITIONS,
            t["recommendations"]: PARTITIONS,
            t["changelog"]: PARTITIONS,
            t["dlq"]: 1,
            t["videos"]: 1,
            t["control"]: 1,
        },
        compacted={t["changelog"], t["videos"], t["control"]},
    )


def partition_of(key: bytes) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % PARTITIONS  # kafka's default partitioner


def fill_changelog(bootstrap: str, topic: str, users: int, videos: list[str]) -> None:
    rng = np.random.default_rng(1)
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=50,
        batch_size=1024 * 1024,
        acks=1,
    )
    picks = rng.integers(0, len(videos), (users, 10))
    vals = np.round(rng.uniform(0.1, 2.0, (users, 10)), 3)
    for i in range(users):
        key = f"s{i}".encode()
        rec = {
            "v": 1,
            "videos": sorted({videos[j] for j in picks[i]}),
            "events_applied": 10,
            "recent_ids": [f"s{i}-{k}" for k in range(10)],
            "partition": partition_of(key),
            "offset": -1,
        }
        rec["values"] = vals[i, : len(rec["videos"])].tolist()
        producer.send(
            topic,
            key=key,
            value=json.dumps(rec, separators=(",", ":")).encode(),
            partition=rec["partition"],
        )
    producer.flush()
    producer.close()


def spawn(
    bootstrap: str,
    model: Path,
    t: dict[str, str],
    group: str,
    *,
    durable: bool,
    state_dir: Path | None = None,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "REFOLD_BOOTSTRAP_SERVERS": bootstrap,
        "REFOLD_MODEL": str(model),
        "REFOLD_GROUP": group,
        "REFOLD_DURABLE": "true" if durable else "false",
        # Tansu joins a group in about session_timeout/2 (DESIGN.md); 2 s is in its safe range.
        "REFOLD_SESSION_TIMEOUT_MS": "2000",
        "REFOLD_HEARTBEAT_INTERVAL_MS": "500",
        **{f"REFOLD_TOPIC_{k.upper()}": v for k, v in t.items()},
    }
    if state_dir is not None:
        env["REFOLD_STATE_DIR"] = str(state_dir)
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "worker"], env=env, cwd=ROOT, stdout=out, stderr=out
    )


def send(producer: KafkaProducer, topic: str, eid: str, user: str, video: str) -> None:
    producer.send(topic, key=user.encode(), value=event_bytes(eid, user, video, 120.0))


def drain_rate(bootstrap: str, model: Path, videos: list[str], n: int, durable: bool) -> float:
    prefix = f"ov{uuid.uuid4().hex[:6]}"
    t = topic_names(prefix)
    create(bootstrap, t)
    rng = np.random.default_rng(5)
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024, acks=1
    )
    for i in range(n):
        send(
            producer,
            t["ratings"],
            f"{prefix}-{i}",
            f"n{rng.integers(0, 10 * n)}",
            videos[rng.integers(0, len(videos))],
        )
    producer.flush()
    producer.close()
    reader = ListReader(bootstrap, t["recommendations"])
    reader.start()
    proc = spawn(bootstrap, model, t, f"{prefix}-g", durable=durable)
    try:
        wait(lambda: reader.progress() >= n, 600, "drain")
    finally:
        stop_worker(proc)
        reader.stop()
    first_batch = sum(1 for v in reader.seen.values() if v <= reader.first)
    return (n - first_batch) / (reader.last - reader.first)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--overhead-events", type=int, default=60_000)
    ap.add_argument("--overhead-pairs", type=int, default=7)
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench_recovery")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    model = build_model(args.cache)
    videos = list(load_model(model).items.ids)
    with (
        tempfile.TemporaryDirectory(prefix="refold-recovery-", ignore_cleanup_errors=True) as tmp,
        TansuBroker() as broker,
    ):
        work = Path(tmp)  # the worker's state and log; a full run leaves ~400 MB here
        bs = broker.bootstrap_servers
        plains, durables = [], []
        for _ in range(args.overhead_pairs):
            plains.append(drain_rate(bs, model, videos, args.overhead_events, durable=False))
            durables.append(drain_rate(bs, model, videos, args.overhead_events, durable=True))
            print(
                f"drain: plain {plains[-1]:.0f} ev/s, durable {durables[-1]:.0f} ev/s", flush=True
            )
        plain, durable = float(np.median(plains)), float(np.median(durables))

        prefix = f"rc{uuid.uuid4().hex[:6]}"
        t = topic_names(prefix)
        create(bs, t)
        t0 = time.perf_counter()
        fill_changelog(bs, t["changelog"], args.users, videos)
        print(
            f"changelog with {args.users} users written in {time.perf_counter() - t0:.0f}s",
            flush=True,
        )
        reader = ListReader(bs, t["recommendations"])
        reader.start()
        producer = KafkaProducer(bootstrap_servers=bs, linger_ms=0, acks=1)
        state_dir, log = work / "state", work / "worker.log"

        def start_and_probe(probe: str, user: str, video: str, timeout_s: float):
            """Spawn the worker, send one event, return (process, seconds to its list)."""
            t0 = time.perf_counter()
            proc = spawn(bs, model, t, f"{prefix}-g", durable=True, state_dir=state_dir, log=log)
            send(producer, t["ratings"], probe, user, video)
            producer.flush()
            wait(lambda: reader.arrival(probe) is not None, timeout_s, f"the list for {probe}")
            return proc, reader.arrival(probe) - t0

        proc, cold = start_and_probe("probe-cold", "s1", videos[0], 600)
        print(f"cold restore of {args.users} users: {cold:.1f}s", flush=True)
        # Load, then kill -9 in the middle of it.
        rng = np.random.default_rng(9)
        for i in range(3000):
            send(
                producer,
                t["ratings"],
                f"load-{i}",
                f"s{rng.integers(0, args.users)}",
                videos[rng.integers(0, len(videos))],
            )
        producer.flush()
        wait(
            lambda: reader.progress("load-") >= 500,
            300,
            "load in progress",
        )
        proc.kill()
        proc.wait()
        proc, recovery = start_and_probe("probe-warm", "s2", videos[1], 300)
        wait(
            lambda: reader.progress("load-") >= 3000,
            300,
            "load drained",
        )
        stop_worker(proc)
        reader.stop()
        producer.close()
        restore_lines = [ln for ln in log.read_text().splitlines() if "restored" in ln]
        for ln in restore_lines:
            print(ln, flush=True)
    result = {
        "recovery_s": round(recovery, 2),
        "durability_overhead": round(1.0 - durable / plain, 4),
        "cold_restore_s": round(cold, 2),
        "users_in_state": args.users,
        "durable_events_per_s": round(durable, 1),
        "plain_events_per_s": round(plain, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
