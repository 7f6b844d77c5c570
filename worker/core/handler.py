"""Handling one polled batch: apply events, fold in touched users, build the lists.

Pure: the loop hands in decoded events and gets back the messages to publish
and the users whose durable state changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from worker.core.engine import Recommender
from worker.core.wire import RatingEvent, VideoEvent, encode_recommendations


@dataclass(frozen=True, slots=True)
class Source:
    """Kafka position of a decoded event (``partition=-1`` when not from Kafka)."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class OutgoingList:
    """A list ready to publish: its key facts and its ``Recommendations`` JSON."""

    user_id: str
    strategy: str
    event_ids: list[str]
    payload: bytes


@dataclass
class BatchOutcome:
    """What a batch produced."""

    recommendations: list[OutgoingList] = field(default_factory=list)
    changed_users: list[str] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    videos: int = 0


def handle_batch(
    engine: Recommender,
    ratings: Sequence[tuple[RatingEvent, Source]],
    videos: Sequence[VideoEvent],
    *,
    now: datetime,
) -> BatchOutcome:
    """Apply a batch and return one list per user whose row changed.

    Videos register first, so a rating in the same batch already sees the
    video's duration and content prior. A user's events coalesce into one list.
    """
    out = BatchOutcome()
    for video in videos:
        engine.register_video(video)
        out.videos += 1
    reflected: dict[str, list[tuple[RatingEvent, Source]]] = {}
    for event, src in ratings:
        if engine.apply(event, partition=src.partition, offset=src.offset):
            reflected.setdefault(event.user_id, []).append((event, src))
            out.applied += 1
        else:
            out.duplicates += 1
    users = list(reflected)
    out.changed_users = users
    for lst in engine.recommend(users):
        events = reflected[lst.user_id]
        _, last_src = events[-1]
        event_ids = [e.event_id for e, _ in events]
        payload = encode_recommendations(
            user_id=lst.user_id,
            video_ids=lst.video_ids,
            scores=lst.scores,
            model_version=engine.model_version,
            strategy=lst.strategy,
            generated_at=now,
            event_ids=event_ids,
            last_event_ts=max(e.ts for e, _ in events),
            source=(
                (last_src.topic, last_src.partition, last_src.offset)
                if last_src.partition >= 0
                else None
            ),
            events_applied=engine.users[lst.user_id].events_applied,
        )
        out.recommendations.append(OutgoingList(lst.user_id, lst.strategy, event_ids, payload))
    return out
