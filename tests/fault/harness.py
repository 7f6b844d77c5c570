"""Fault-injection harness: a deterministic stream, an in-process fault-free reference,
and the comparison of a faulty Kafka run's final rows and lists against it."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from tests.kit import TopicReader, Topics
from worker.core.engine import Recommender
from worker.core.items import Contribution, ItemUpdate, item_solve_reference
from worker.core.model import Model
from worker.core.state import decode_record
from worker.core.wire import RatingEvent
from worker.kafkaio import ensure_topics
from worker.producer import RatingProducer

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
# Scores of two different runs may differ in the last bits (batched solves group
# rows differently); lists are compared up to ties within this tolerance.
SCORE_TOL = 1e-4


def make_stream(
    k: int, m: int, *, n_known: int = 40, n_items: int = 120, seed: int = 11
) -> list[RatingEvent]:
    """K events over M users (known and new), reproducible from the seed."""
    rng = random.Random(seed)
    users = [f"u{i}" for i in range(min(n_known, m))] + [
        f"new{i}" for i in range(m - min(n_known, m))
    ]
    actions = ["view"] * 5 + ["like"] * 2 + ["neutral", "dislike"]
    out = []
    for i in range(k):
        action = rng.choice(actions)
        out.append(
            RatingEvent(
                event_id=f"ev{seed}-{i}",
                user_id=rng.choice(users),
                video_id=f"v{rng.randrange(n_items)}",
                action=action,
                watch_seconds=rng.uniform(10, 900) if action == "view" else None,
                ts=T0 + timedelta(seconds=i),
            )
        )
    return out


@dataclass
class Expected:
    rows: dict[str, dict[str, float]]
    applied: dict[str, int]
    lists: dict[str, list[tuple[str, float]]]


def reference(model: Model, events: list[RatingEvent], *, swap_to: Model | None = None) -> Expected:
    """The fault-free run, in-process: apply every event once, in order, then rank everyone."""
    eng = Recommender(model)
    for e in events:
        eng.apply(e)
    if swap_to is not None:
        eng.swap_model(swap_to)
    users = sorted({e.user_id for e in events})
    lists = {
        lst.user_id: list(zip(lst.video_ids, lst.scores, strict=True))
        for lst in eng.recommend(users)
    }
    ids = eng.catalog.items
    return Expected(
        rows={u: {ids.id_of(i): v for i, v in eng.users[u].row.items()} for u in users},
        applied={u: eng.users[u].events_applied for u in users},
        lists=lists,
    )


def create_topics(bootstrap: str, topics: Topics, partitions: int) -> None:
    from tests.kit import kafka_settings

    t = topics.settings
    ensure_topics(
        kafka_settings(bootstrap),
        {
            t.ratings: partitions,
            t.recommendations: partitions,
            t.changelog: partitions,
            t.dlq: 1,
            t.videos: 1,
            t.control: 1,
            t.item_contributions: partitions,
            t.item_updates: 1,
            t.popularity_pairs: partitions,
            t.popularity: 1,
        },
        compacted={
            t.changelog,
            t.videos,
            t.control,
            t.item_contributions,
            t.item_updates,
            t.popularity_pairs,
            t.popularity,
        },
    )


def produce(producer: RatingProducer, events: list[RatingEvent]) -> None:
    for e in events:
        producer.send(e)
    producer.flush()


def last_per_user(records: list[Any], decode: Any = json.loads) -> dict[str, dict[str, Any]]:
    """The latest message per key; one key lives in one partition, read in offset order."""
    out: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        if r.value is not None:
            out[r.key.decode()] = decode(r.value)
    return out


def wait_all_applied(
    recs: TopicReader, expected: Expected, timeout_s: float
) -> dict[str, dict[str, Any]]:
    def done(records: list[Any]) -> bool:
        last = last_per_user(records)
        return all(last.get(u, {}).get("events_applied") == n for u, n in expected.applied.items())

    recs.wait_for(done, timeout_s=timeout_s, what="every user's final list")
    return last_per_user(recs.records)


def assert_final_state_matches(
    expected: Expected,
    final_lists: dict[str, dict[str, Any]],
    changelog: dict[str, dict[str, Any]],
    *,
    lists_for: set[str] | None = None,
) -> None:
    """Rows identical, no duplicate or missing event, lists identical up to score ties.

    ``lists_for`` limits the list comparison to those users (rows are always compared).
    """
    check_lists = set(expected.applied) if lists_for is None else lists_for
    assert set(final_lists) >= check_lists
    for user, n in expected.applied.items():
        rec = changelog[user]
        assert rec["events_applied"] == n, (
            f"{user}: {rec['events_applied']} events applied, expected {n}"
        )
        row = dict(zip(rec["videos"], rec["values"], strict=True))
        assert row.keys() == expected.rows[user].keys(), user
        for v, x in expected.rows[user].items():
            assert row[v] == x, f"{user}/{v}: row value {row[v]} != {x}"
        if user not in check_lists:
            continue
        got = [(i["video_id"], i["score"]) for i in final_lists[user]["items"]]
        want = expected.lists[user]
        assert len(got) == len(want), user
        np.testing.assert_allclose(
            [s for _, s in got], [s for _, s in want], rtol=SCORE_TOL, atol=SCORE_TOL
        )
        for (gv, gs), (wv, _ws) in zip(got, want, strict=True):
            if gv != wv:
                ties = [s for v, s in want if v == gv]
                assert ties and abs(ties[0] - gs) < SCORE_TOL, f"{user}: {gv} instead of {wv}"


def read_changelog(broker: str, topics: Topics) -> dict:
    """The latest changelog record per user (decoded), read to the end."""
    reader = TopicReader(broker, topics.settings.changelog)
    try:
        # The changelog is flushed with the lists, so it is complete once every final list is
        # out; read until two polls in a row bring nothing new.
        prev = -1
        while len(reader.records) != prev:
            prev = len(reader.records)
            for _ in range(5):
                reader.poll()
        return last_per_user(reader.records, decode=decode_record)
    finally:
        reader.close()


def latest_records(records: list, decode) -> dict:
    """The latest decoded value per key of a compacted topic's records (None: deleted)."""
    out = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        if r.value is not None:
            out[r.key] = decode(r.value)
    return out


def exact_item_solves(model: Model, contributions: dict) -> dict:
    """The reference solve (np.linalg.solve on the full system) of every new video from
    the latest contribution of each of its users."""
    by_video: dict[str, dict] = {}
    for c in contributions.values():
        if c.value != 0.0:
            by_video.setdefault(c.video_id, {})[c.user_id] = (c.value, c.factors)
    kw = {"regularization": model.params.regularization, "alpha": model.params.alpha}
    return {
        v: item_solve_reference(list(model.users.ids), model.user_factors, live, **kw)
        for v, live in by_video.items()
    }


def wait_items_settled(model: Model, contrib, updates, *, timeout_s: float) -> None:
    """Until the latest update of each new video is the exact solve of its latest
    contributions (owners may still be catching up right after the last list)."""

    def settled(_: list) -> bool:
        contrib.poll()
        want = exact_item_solves(model, latest_records(contrib.records, Contribution.decode))
        got = {u.video_id: u for u in latest_records(updates.records, ItemUpdate.decode).values()}
        return bool(want) and all(
            v in got and np.allclose(got[v].factors, x, rtol=1e-4, atol=1e-6)
            for v, x in want.items()
        )

    updates.wait_for(
        settled, timeout_s=timeout_s, what="owners' solves of the latest contributions"
    )
