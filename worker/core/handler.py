"""Handling one polled batch: apply events, fold in touched users, build the lists.

Pure: the loop hands in decoded events and gets back the messages to publish
and the users whose durable state changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from worker.core.engine import Applied, Recommender
from worker.core.wire import RatingEvent, VideoEvent, encode_recommendations, to_rfc3339


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
    replayed: int = 0
    videos: int = 0


def handle_batch(
    engine: Recommender,
    ratings: Sequence[tuple[RatingEvent, Source]],
    videos: Sequence[VideoEvent],
    *,
    now: datetime,
) -> BatchOutcome:
    """Apply a batch and return one list per user whose row changed or was replayed.

    Videos register first, so a rating in the same batch already sees the
    video's duration and content prior. A user's events coalesce into one list.

    An event re-read after a restart (at or before the offset the user's state
    already reflects) changes nothing, but its user's list is published again:
    the crash may have come after the state was saved and before that list was
    acknowledged. A second identical list is harmless; a missing one is not.
    """
    out = BatchOutcome()
    for video in videos:
        engine.register_video(video)
        out.videos += 1
    reflected: dict[str, list[tuple[RatingEvent, Source]]] = {}
    changed: dict[str, None] = {}
    for event, src in ratings:
        result = engine.apply_at(event, partition=src.partition, offset=src.offset)
        if result is Applied.DUPLICATE:
            out.duplicates += 1
            continue
        reflected.setdefault(event.user_id, []).append((event, src))
        if result is Applied.APPLIED:
            changed[event.user_id] = None
            out.applied += 1
        else:
            out.replayed += 1
    users = list(reflected)
    out.changed_users = list(changed)
    generated_at = to_rfc3339(now)
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
            generated_at=generated_at,
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
