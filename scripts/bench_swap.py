#!/usr/bin/env python3
"""Benchmark: how long a model hot-swap holds up the worker's loop.

Setup: the bench_worker model (200k users with bootstrap rows, 100k videos × 64
factors, cached under .cache/bench_worker), an engine with ``--live-users`` users
holding live state (each with one event applied on top of their bootstrap row)
and ``--announced`` videos announced on ``videos`` (half of them rated).

Measured in the same run, on the loop's thread, each the best of ``--repeats``:

* **baseline, in place**: what a swap costs when everything happens between two
  batches: build the new catalog, its top-k index and the user gramian, then
  move every live user's row to the new item indices (``swap_model(model)``,
  then touching every user);
* **refold**: the swap as the worker does it. ``prepare(model)`` runs in the
  model-loader thread while the loop serves (timed too, but not on the loop),
  and ``swap_model(prepared)`` only installs it and sets the live states aside;
  each user's row moves on their next event, whose cost is reported per user.

Also: the first batch of 10 events on a fresh engine against the next ones (the
top-k index is built with the engine, not by the first batch).

Live (``--live-s``, 0 to skip): a worker on the embedded broker serves 1,000
events/s from an app producer (as in bench_worker); 5 s in, ``refold swap``'s
control message announces a retrained model (the same factors under a new
version). Reported: the p99 end-to-end latency of the events sent in the 4 s
before the announcement, and the p99 and maximum of those sent in the 3 s after
it, while the worker loads and prepares the model and swaps it in. The
baseline above says what the in-place swap would add: the whole of it, at once.

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
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
    build_model,
    p99_by_second,
    paced_stream,
    sample_events,
)
from threadpoolctl import threadpool_limits  # noqa: E402

from worker.brokers.tansu import TansuBroker  # noqa: E402
from worker.core.engine import Recommender  # noqa: E402
from worker.core.handler import Source, handle_batch  # noqa: E402
from worker.core.model import Model  # noqa: E402
from worker.core.wire import RatingEvent, VideoEvent  # noqa: E402
from worker.storage import load_model, save_model  # noqa: E402

NOW = datetime(2026, 11, 29, tzinfo=timezone.utc)


def engine_with_state(model: Model, live_users: int, announced: int) -> Recommender:
    """An engine as a long-running worker has it: live users and announced videos."""
    eng = Recommender(model)
    rng = np.random.default_rng(1)
    for j in range(announced):
        eng.register_video(
            VideoEvent(
                video_id=f"new-{j}",
                duration_seconds=60.0,
                category=f"c{j % 20}",
                author_id=f"a{j}",
                published_at=NOW,
            )
        )
    users = model.users.ids
    items = model.items.ids
    for n, u in enumerate(rng.choice(len(users), size=live_users, replace=False).tolist()):
        video = f"new-{n % announced}" if announced and n % 2 else items[n % len(items)]
        eng.apply(
            RatingEvent(event_id=f"e{n}", user_id=users[u], video_id=video, action="like", ts=NOW)
        )
    return eng


def live_swap(
    model_dir: Path, retrained_dir: Path, seconds: float, swap_at: float = 5.0
) -> dict[str, Any]:
    """Latency (ms) of events sent before and after a model announcement, in a live worker."""
    m = load_model(model_dir)
    rate = 1000.0
    events = sample_events(
        np.random.default_rng(5), int(rate * seconds), list(m.users.ids), list(m.items.ids)
    )
    announce = json.dumps({"model_dir": str(retrained_dir)}).encode()
    swap_sent: list[float] = []

    def announce_once(i: int, producer: Any, prefix: str) -> None:
        if i == int(swap_at * rate):
            producer.produce(f"{prefix}.models", announce, b"model")
            swap_sent.append(time.perf_counter())

    with TansuBroker() as tansu:
        broker = Broker("tansu", tansu.bootstrap_servers, worker_wait_ms=10, reader_wait_ms=5)
        run = paced_stream(broker, model_dir, events, rate, before_send=announce_once)
    lat = (run.arrivals - run.sent) * 1000.0
    at = run.sent - swap_sent[0]
    before, after = lat[(at > -4) & (at < 0)], lat[(at >= 0) & (at < 3)]
    return {
        "live_p99_ms_before_swap": round(float(np.percentile(before, 99)), 1),
        "live_p99_ms_after_swap": round(float(np.percentile(after, 99)), 1),
        "live_max_ms_after_swap": round(float(after.max()), 1),
        "live_p99_ms_by_second": [round(v, 1) for v in p99_by_second(lat, rate)],
    }


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--live-users", type=int, default=100_000)
    ap.add_argument("--announced", type=int, default=1_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--live-s", type=float, default=12.0, help="live run length (0: skip)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench_worker")
    args = ap.parse_args()
    model_dir = build_model(args.cache, 200_000, 100_000, 3_000_000, 64)
    model = load_model(model_dir)
    # A retrained model as far as a swap can tell: the same factors, another version.
    retrained_dir = args.cache / f"{model_dir.name}-retrained"
    if not (retrained_dir / "manifest.json").exists():
        save_model(dataclasses.replace(model, version=f"{model.version}-retrained"), retrained_dir)
    retrained = load_model(retrained_dir)

    with threadpool_limits(1, "blas"):
        # First batch on a fresh engine vs the batches after it.
        eng = Recommender(model)
        users, items = model.users.ids, model.items.ids
        batches = []
        for b in range(6):
            batch = [
                (
                    RatingEvent(
                        event_id=f"f{b}-{i}",
                        user_id=users[(b * 10 + i) * 997 % len(users)],
                        video_id=items[(b * 10 + i) * 31 % len(items)],
                        action="like",
                        ts=NOW,
                    ),
                    Source("ratings", 0, b * 10 + i),
                )
                for i in range(10)
            ]
            t0 = time.perf_counter()
            handle_batch(eng, batch, (), now=NOW)
            batches.append(time.perf_counter() - t0)
        print(f"first batch {ms(batches[0])} ms, then {[ms(b) for b in batches[1:]]}", flush=True)

        in_place, prepare_s, swap_s, adopt_us = [], [], [], []
        for r in range(args.repeats):
            eng = engine_with_state(model, args.live_users, args.announced)
            live = [u for u, _ in eng.live_users()]
            t0 = time.perf_counter()
            eng.swap_model(retrained)
            for u in live:
                eng.state_of(u)
            in_place.append(time.perf_counter() - t0)

            eng = engine_with_state(model, args.live_users, args.announced)
            live = [u for u, _ in eng.live_users()]
            t0 = time.perf_counter()
            prepared = eng.prepare(retrained)
            t1 = time.perf_counter()
            eng.swap_model(prepared)
            t2 = time.perf_counter()
            for u in live:
                eng.state_of(u)
            t3 = time.perf_counter()
            prepare_s.append(t1 - t0)
            swap_s.append(t2 - t1)
            adopt_us.append((t3 - t2) / len(live) * 1e6)
            print(
                f"repeat {r}: in place {ms(in_place[-1])} ms; prepare {ms(t1 - t0)} ms "
                f"(loader thread), swap {ms(t2 - t1)} ms, then {adopt_us[-1]:.1f} µs per user",
                flush=True,
            )

    in_worker = live_swap(model_dir, retrained_dir, args.live_s) if args.live_s > 0 else {}
    if in_worker:
        print(f"live: {in_worker}", flush=True)
    result = {
        "swap_loop_ms": ms(min(swap_s)),
        "in_place_swap_loop_ms": ms(min(in_place)),
        "speedup": round(min(in_place) / min(swap_s), 1),
        "prepare_ms": ms(min(prepare_s)),
        "move_per_user_us": round(float(min(adopt_us)), 1),
        "first_batch_ms": ms(batches[0]),
        "later_batch_ms": ms(float(np.median(batches[1:]))),
        "live_users": args.live_users,
        "announced_videos": args.announced,
        **in_worker,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
