"""``scripts/demo``: the seed's feedback session, played through Kafka on the embedded broker.

1. synthesize a small Rutube-style dataset;
2. hold one user out and bootstrap the model on everyone else;
3. start the embedded broker and a ``refold worker`` process;
4. send the held-out user's initial ratings, then run 15 rounds: read the
   fresh top-10 list from ``recommendations``, answer each video from the
   user's held-out ground truth (like / dislike / neutral; a video the user
   never watched is sent as a zero-second view, an impression), and send the
   answers as rating events;
5. print every round and the final precision (likes over shown videos), beside the
   precision of the most-popular list for the same user, rounds and answers.

Everything it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from worker.brokers.tansu import TansuBroker
from worker.config import KafkaSettings, TopicSettings
from worker.core.wire import decode_recommendations
from worker.kafkaio import open_topic_reader, poll_batch
from worker.notebook import NOT_WATCHED, answer_for, precision_colab, truth_from_frames
from worker.producer import RatingProducer

ROUNDS = 15
INITIAL_LIKES = 3
# The worker answers in tens of milliseconds; this bounds a hung round.
ROUND_TIMEOUT_S = 30.0


def _prepare(work: Path, seed: int) -> tuple[Path, str, dict[str, str]]:
    from worker.data.synth import synthesize
    from worker.train import bootstrap

    data = work / "data"
    synthesize(data, users=3000, videos=1500, events=300_000, seed=seed, progress=False)
    logs = pq.read_table(data / "logs.parquet")
    counts = pc.value_counts(logs["viewer_uid"]).to_pylist()
    # The demo user: a heavy viewer, so the held-out truth is rich enough to measure.
    user = max(counts, key=lambda c: (c["counts"], c["values"]))["values"]
    mask = pc.equal(logs["viewer_uid"], user)
    pq.write_table(logs.filter(pc.invert(mask)), work / "train_logs.parquet")
    reactions = pq.read_table(data / "reactions.parquet")
    r_mask = pc.equal(reactions["user_id"], user)
    pq.write_table(reactions.filter(pc.invert(r_mask)), work / "train_reactions.parquet")
    truth = truth_from_frames(
        user,
        reactions=reactions.filter(r_mask).to_pandas(),
        logs=logs.filter(mask).to_pandas(),
        videos=pd.read_parquet(data / "video_stat.parquet"),
    )
    model = work / "model"
    bootstrap(
        work / "train_logs.parquet",
        data / "video_stat.parquet",
        model,
        reactions=work / "train_reactions.parquet",
        factors=32,
        iterations=10,
        progress=False,
    )
    return model, user, truth


def popularity_rounds(
    popular: list[str], initial: list[str], held: dict[str, str], rounds: int, k: int = 10
) -> list[dict[str, str]]:
    """The baseline beside refold's session: each round shows the ``k`` most popular videos
    not yet rated or shown, answered from the same held-out truth as refold's lists."""
    rng = np.random.default_rng(0)  # answer_for's "truth" policy draws nothing
    seen = set(initial)
    remaining = (v for v in popular if v not in seen)
    out: list[dict[str, str]] = []
    for _ in range(rounds):
        shown = [v for _, v in zip(range(k), remaining, strict=False)]
        if not shown:
            break
        out.append({v: answer_for(v, held, "truth", rng) for v in shown})
    return out


def _popular_ids(model_dir: Path) -> list[str]:
    """The bootstrap model's videos, most popular first (the worker's cold-start order)."""
    from worker.storage import load_model

    model = load_model(model_dir)
    order = np.argsort(-model.videos.popularity.astype(np.float64), kind="stable")
    return [model.items.id_of(int(i)) for i in order]


def _next_list(consumer, user: str, want_event: str, deadline: float):  # type: ignore[no-untyped-def]
    while time.monotonic() < deadline:
        for r in poll_batch(consumer, 500, 0.1):
            value = r.value()
            if r.key() == user.encode() and value is not None:
                doc = decode_recommendations(value)
                if want_event in doc.event_ids:
                    return doc
    raise TimeoutError(f"no list reflecting {want_event} within {ROUND_TIMEOUT_S}s")


def run(work: Path, seed: int) -> float:
    started = time.monotonic()
    model, user, truth = _prepare(work, seed)
    likes = [v for v, a in sorted(truth.items()) if a == "like"]
    initial, held = (
        likes[:INITIAL_LIKES],
        {v: a for v, a in truth.items() if v not in likes[:INITIAL_LIKES]},
    )
    print(f"demo user {user}: {len(truth)} held-out reactions, initial likes {initial}")
    print(f"data + model ready in {time.monotonic() - started:.1f}s")
    rng = np.random.default_rng(seed)
    prefix = f"demo{uuid.uuid4().hex[:6]}"
    topics = TopicSettings(
        **{name: f"{prefix}.{name}" for name in TopicSettings.model_fields}  # isolated topics
    )
    with TansuBroker() as broker:
        env = {
            **os.environ,
            "REFOLD_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "REFOLD_MODEL": str(model),
            "REFOLD_GROUP": f"{prefix}-worker",
            **{f"REFOLD_TOPIC_{k.upper()}": v for k, v in topics.model_dump().items()},
        }
        worker = subprocess.Popen([sys.executable, "-m", "worker", "worker"], env=env)
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        consumer = None
        try:
            producer = RatingProducer(kafka=kafka, topics=topics)
            last = None
            for v in initial:
                last = producer.like(user, v).event_id
            producer.flush()
            # The worker creates the topic when it starts.
            consumer = open_topic_reader(
                kafka,
                topics.recommendations,
                deadline_s=ROUND_TIMEOUT_S * 3,
                stop=lambda: worker.poll() is not None,
                **{"fetch.wait.max.ms": 10},
            )
            if consumer is None:
                raise RuntimeError("the worker exited or did not create its topics in time")
            rounds: list[dict[str, str]] = []
            for rnd in range(1, ROUNDS + 1):
                assert last is not None
                # The first list waits for the worker's start-up and group join.
                timeout = ROUND_TIMEOUT_S * (3 if rnd == 1 else 1)
                recs = _next_list(consumer, user, last, time.monotonic() + timeout)
                answers = {}
                for item in recs.items:
                    answer = answer_for(item.video_id, held, "truth", rng)
                    answers[item.video_id] = answer
                    if answer == NOT_WATCHED:
                        last = producer.view(user, item.video_id, watch_seconds=0.0).event_id
                    else:
                        last = producer.rate(user, item.video_id, answer).event_id
                producer.flush()
                rounds.append(answers)
                shown = " ".join(f"{v}:{a[:4]}" for v, a in answers.items())
                n_likes = sum(a == "like" for a in answers.values())
                print(f"round {rnd:2d} [{recs.strategy}] likes {n_likes}/10  {shown}")
            precision = precision_colab(rounds)
            baseline = precision_colab(
                popularity_rounds(_popular_ids(model), initial, held, ROUNDS)
            )
            print(f"final precision (likes / shown over {ROUNDS} rounds): {precision:.3f}")
            print(f"most-popular list, same user, rounds and answers: {baseline:.3f}")
            producer.close()
        finally:
            if consumer is not None:
                consumer.close()
            worker.terminate()
            try:
                code = worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                code = worker.wait()
        print(f"worker exited with {code}; total {time.monotonic() - started:.1f}s")
    print(
        json.dumps(
            {
                "precision": round(precision, 4),
                "popularity_precision": round(baseline, 4),
                "rounds": ROUNDS,
                "user": user,
            }
        )
    )
    return precision


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, default=Path(".demo"))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    run(args.work, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
