"""A small producer helper for apps and scripts that send rating events.

Example::

    from worker.producer import RatingProducer

    with RatingProducer(bootstrap_servers="127.0.0.1:9092") as p:
        p.like("u1", "video_42")
        p.view("u1", "video_7", watch_seconds=312)

Each event gets a fresh UUID ``event_id`` unless one is given, so a retry of
the same call with the same id is deduplicated by the worker.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

from worker.config import KafkaSettings, TopicSettings
from worker.core.wire import RatingEvent, VideoEvent, encode
from worker.kafkaio import Publisher, make_producer


class RatingProducer:
    """Validates events with the wire models and sends them keyed by ``user_id``."""

    def __init__(
        self,
        *,
        bootstrap_servers: str | None = None,
        kafka: KafkaSettings | None = None,
        topics: TopicSettings | None = None,
        **producer_overrides: Any,  # librdkafka properties, e.g. **{"linger.ms": 20}
    ) -> None:
        if kafka is None:
            kafka = (
                KafkaSettings()
                if bootstrap_servers is None
                else KafkaSettings(bootstrap_servers=bootstrap_servers)
            )
        self.topics = topics or TopicSettings()
        self.publisher = Publisher(make_producer(kafka, **producer_overrides))

    def send(self, event: RatingEvent) -> RatingEvent:
        self.publisher.send(
            self.topics.ratings, key=event.user_id.encode("utf-8"), value=encode(event)
        )
        return event

    def rate(
        self,
        user_id: str,
        video_id: str,
        action: str,
        *,
        watch_seconds: float | None = None,
        event_id: str | None = None,
        ts: datetime | None = None,
    ) -> RatingEvent:
        """Build, validate and send one event; returns it (with its event_id)."""
        event = RatingEvent.model_validate(
            {
                "event_id": event_id or uuid.uuid4().hex,
                "user_id": user_id,
                "video_id": video_id,
                "action": action,
                "watch_seconds": watch_seconds,
                "ts": ts or datetime.now(timezone.utc),
            }
        )
        return self.send(event)

    def like(self, user_id: str, video_id: str, **kw: Any) -> RatingEvent:
        return self.rate(user_id, video_id, "like", **kw)

    def dislike(self, user_id: str, video_id: str, **kw: Any) -> RatingEvent:
        return self.rate(user_id, video_id, "dislike", **kw)

    def neutral(self, user_id: str, video_id: str, **kw: Any) -> RatingEvent:
        return self.rate(user_id, video_id, "neutral", **kw)

    def view(self, user_id: str, video_id: str, *, watch_seconds: float, **kw: Any) -> RatingEvent:
        return self.rate(user_id, video_id, "view", watch_seconds=watch_seconds, **kw)

    def announce_video(self, video: VideoEvent) -> None:
        """Register a new or updated video on the ``videos`` topic."""
        self.publisher.send(
            self.topics.videos, key=video.video_id.encode("utf-8"), value=encode(video)
        )

    def send_raw(self, value: bytes, *, key: bytes | None = None, topic: str | None = None) -> None:
        """Send bytes as they are (for tests of the dead-letter path)."""
        self.publisher.send(topic or self.topics.ratings, key=key, value=value)

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait until every sent event is acknowledged; returns how many were."""
        return len(self.publisher.confirm(timeout_s))

    def close(self) -> None:
        self.flush()
        self.publisher.close(timeout_s=10)

    def __enter__(self) -> RatingProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
