"""Wire models: what travels on the Kafka topics, as pydantic v2 models.

Every field carries a description and constraints, and every model forbids
unknown fields, so the JSON Schema exported from here (``schemas/*.json``)
documents itself for apps written in other languages.

Decoding happens in the worker loop, never in a Kafka deserializer: a
deserializer that raises makes the consumer retry the same record forever.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from worker.errors import DecodeError

SCHEMA_VERSION = 1
TOP_K = 10
# Longest id accepted on the wire; ids end up in Kafka keys, headers and logs.
MAX_ID_CHARS = 128
# A single view longer than a week is a client bug, not a signal.
MAX_WATCH_SECONDS = 7 * 24 * 3600.0
# Messages above this size are dead-lettered before JSON parsing (a rating is < 1 KiB).
MAX_MESSAGE_BYTES = 64 * 1024

# Printable ids only: no control characters (newlines, ANSI escapes, NUL), so an
# id can never forge a log line or a Kafka header.
_ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+$"

_ID_RE = re.compile(_ID_PATTERN)


def is_valid_id(value: str) -> bool:
    """True when ``value`` is a valid wire id (1-128 printable characters)."""
    return 0 < len(value) <= MAX_ID_CHARS and _ID_RE.match(value) is not None


Identifier = Annotated[
    str,
    Field(min_length=1, max_length=MAX_ID_CHARS, pattern=_ID_PATTERN),
]
Action = Literal["like", "dislike", "neutral", "view"]
Strategy = Literal["als", "popular"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class RatingEvent(_Wire):
    """One user's reaction to one video, as an app sends it to the ``ratings`` topic."""

    schema_version: Literal[1] = Field(
        default=1, description="Version of this event schema; only 1 exists."
    )
    event_id: Identifier = Field(
        description="Unique id of this event, chosen by the app (a UUID is fine). "
        "The worker deduplicates on it, so an app may safely retry a send."
    )
    user_id: Identifier = Field(description="The user who reacted. Also the Kafka message key.")
    video_id: Identifier = Field(description="The video reacted to.")
    action: Action = Field(
        description="like, dislike, neutral, or view (a view needs watch_seconds)."
    )
    watch_seconds: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_WATCH_SECONDS,
        allow_inf_nan=False,
        description="Seconds of the video watched; required for action=view, finite, >= 0.",
    )
    ts: AwareDatetime = Field(
        description="When the user acted, RFC 3339 with a UTC offset "
        "(for example 2026-11-29T10:00:00Z)."
    )

    @model_validator(mode="after")
    def _view_needs_watch_time(self) -> RatingEvent:
        if self.action == "view" and self.watch_seconds is None:
            raise ValueError("watch_seconds is required when action is 'view'")
        return self


class VideoEvent(_Wire):
    """A new or updated video, sent to the ``videos`` topic by the catalog service."""

    schema_version: Literal[1] = Field(default=1, description="Version of this event schema.")
    video_id: Identifier = Field(description="Id of the video; also the Kafka message key.")
    duration_seconds: float = Field(
        gt=0.0, le=MAX_WATCH_SECONDS, allow_inf_nan=False, description="Length in seconds, > 0."
    )
    category: Identifier = Field(description="Category name or id, used for the content prior.")
    author_id: Identifier = Field(description="Author or channel id, used for the content prior.")
    title: str = Field(default="", max_length=1000, description="Human-readable title.")
    published_at: AwareDatetime = Field(description="Publication time, RFC 3339.")


class RecommendedItem(_Wire):
    """One entry of a top-10 list."""

    video_id: Identifier = Field(description="Recommended video.")
    score: float = Field(
        allow_inf_nan=False, description="Model score; higher is better. Comparable within a list."
    )


class SourceOffset(_Wire):
    """Where a reflected event sat in Kafka."""

    topic: str = Field(min_length=1, max_length=249, description="Source topic.")
    partition: int = Field(ge=0, description="Source partition.")
    offset: int = Field(ge=0, description="Offset of the last reflected event in that partition.")


class Recommendations(_Wire):
    """A fresh top-10 list for one user, published to ``recommendations`` keyed by user_id."""

    schema_version: Literal[1] = Field(default=1, description="Version of this message schema.")
    user_id: Identifier = Field(description="The user the list is for.")
    items: list[RecommendedItem] = Field(
        max_length=TOP_K, description="Up to 10 videos, best first."
    )
    model_version: str = Field(
        min_length=1, max_length=200, description="Version of the base model that scored the list."
    )
    strategy: Strategy = Field(
        description="als: personalised from the user's folded-in factors; popular: "
        "popularity fallback for a user without positive signal yet."
    )
    generated_at: AwareDatetime = Field(description="When the worker published the list.")
    event_ids: list[Identifier] = Field(
        max_length=10_000,
        description="Ids of the events of this user that this list reflects for the first time "
        "(all of the user's events in the batch; duplicates excluded).",
    )
    last_event_ts: AwareDatetime | None = Field(
        default=None, description="Latest event time among event_ids, for latency measurement."
    )
    source: SourceOffset | None = Field(
        default=None, description="Kafka position of the last event this list reflects."
    )
    events_applied: int = Field(
        ge=0, description="How many distinct events of this user the worker has applied in total."
    )


def _reason_of(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "<root>"
    return f"{first.get('type', 'invalid')} at {loc}"


def _decode(model: type[_Wire], raw: bytes | None) -> Any:
    if raw is None:
        raise DecodeError("empty", "message has no value (tombstone)")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise DecodeError("oversized", f"{len(raw)} bytes > limit {MAX_MESSAGE_BYTES}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError("invalid_utf8", str(exc)) from None
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid" or (
            first["type"] in {"model_type", "model_attributes_type"} and not first["loc"]
        ):
            raise DecodeError("invalid_json", _short(str(first["msg"]))) from None
        raise DecodeError("validation", _reason_of(exc) + ": " + _short(str(exc))) from None


def _short(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def decode_rating(raw: bytes | None) -> RatingEvent:
    """Decode one ``ratings`` message value; raise :class:`DecodeError` when it is invalid."""
    event: RatingEvent = _decode(RatingEvent, raw)
    return event


def decode_video(raw: bytes | None) -> VideoEvent:
    """Decode one ``videos`` message value; raise :class:`DecodeError` when it is invalid."""
    event: VideoEvent = _decode(VideoEvent, raw)
    return event


def decode_recommendations(raw: bytes) -> Recommendations:
    """Decode a ``recommendations`` message (for consumers and tests)."""
    recs: Recommendations = _decode(Recommendations, raw)
    return recs


def encode(model: BaseModel) -> bytes:
    """Serialise a wire model to compact JSON bytes."""
    return model.model_dump_json(exclude_none=True).encode("utf-8")


def encode_recommendations(
    *,
    user_id: str,
    video_ids: list[str],
    scores: list[float],
    model_version: str,
    strategy: str,
    generated_at: datetime | str,
    event_ids: list[str],
    last_event_ts: datetime | None,
    source: tuple[str, int, int] | None,
    events_applied: int,
) -> bytes:
    """The JSON of a :class:`Recommendations`, built directly on the hot path.

    Building one pydantic model per list (and per item) costs more than the
    fold-in, and so does ``json.dumps`` of nested dicts; the text is assembled
    from JSON-escaped strings and ``repr`` of floats, which is what
    ``json.dumps`` writes. The tests check that these bytes validate as
    ``Recommendations`` and equal the model's own serialisation.
    ``generated_at`` may be given preformatted (:func:`to_rfc3339`), once per batch.
    """
    q = _json_str
    items = ",".join(
        [
            f'{{"video_id":{q(v)},"score":{finite(sc)!r}}}'
            for v, sc in zip(video_ids, scores, strict=True)
        ]
    )
    gen = generated_at if isinstance(generated_at, str) else to_rfc3339(generated_at)
    parts = [
        f'{{"schema_version":{SCHEMA_VERSION},"user_id":{q(user_id)},"items":[{items}],'
        f'"model_version":{q(model_version)},"strategy":{q(strategy)},"generated_at":{q(gen)},'
        f'"event_ids":[{",".join([q(e) for e in event_ids])}]'
    ]
    if last_event_ts is not None:
        parts.append(f',"last_event_ts":{q(to_rfc3339(last_event_ts))}')
    if source is not None:
        parts.append(
            f',"source":{{"topic":{q(source[0])},"partition":{int(source[1])},'
            f'"offset":{int(source[2])}}}'
        )
    parts.append(f',"events_applied":{int(events_applied)}}}')
    return "".join(parts).encode("utf-8")


# JSON string literal of a str with non-ASCII kept, as json.dumps(..., ensure_ascii=False)
# writes it (the C encoder when the interpreter has one).
_json_str = json.encoder.encode_basestring


def finite(x: float) -> float:
    """Map non-finite scores to a finite sentinel so a list always serialises."""
    return x if math.isfinite(x) else -1e30


def to_rfc3339(dt: datetime) -> str:
    """Format an aware datetime as RFC 3339, as pydantic does (``Z`` for UTC)."""
    text = dt.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


WIRE_MODELS: dict[str, type[BaseModel]] = {
    "rating_event": RatingEvent,
    "video_event": VideoEvent,
    "recommendations": Recommendations,
}


def json_schema_text(model: type[BaseModel]) -> str:
    """The JSON Schema of a wire model as deterministic text (sorted keys, trailing newline)."""
    schema = model.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
