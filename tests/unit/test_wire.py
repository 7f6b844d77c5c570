"""Wire models: validation rules, decoding errors, and schema files in sync."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.core.wire import (
    MAX_MESSAGE_BYTES,
    WIRE_MODELS,
    RatingEvent,
    decode_rating,
    decode_video,
    json_schema_text,
)
from worker.errors import DecodeError

ROOT = Path(__file__).resolve().parents[2]
GOOD = {
    "event_id": "e1",
    "user_id": "u1",
    "video_id": "v1",
    "action": "like",
    "ts": "2026-11-29T10:00:00Z",
}


def raw(**over) -> bytes:
    doc = {**GOOD, **over}
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def test_valid_events_decode():
    e = decode_rating(raw())
    assert isinstance(e, RatingEvent) and e.action == "like"
    v = decode_rating(raw(action="view", watch_seconds=12.5))
    assert v.watch_seconds == 12.5
    assert decode_rating(raw(ts="2026-11-29T12:00:00+02:00")).ts.utcoffset().total_seconds() == 7200


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe", "invalid_utf8"),
        (b"{", "invalid_json"),
        (b"[]", "invalid_json"),
        (None, "empty"),
        (b"x" * (MAX_MESSAGE_BYTES + 1), "oversized"),
        (raw(action="love"), "validation"),
        (raw(action="view"), "validation"),  # view without watch time
        (raw(action="view", watch_seconds=-1), "validation"),
        (
            raw(action="view", watch_seconds="12"),
            "validation",
        ),  # strings are not numbers here? see below
        (raw(user_id="x" * 129), "validation"),
        (raw(user_id=""), "validation"),
        (raw(user_id="a\nb"), "validation"),
        (raw(video_id="v\x1b[31m"), "validation"),
        (raw(ts="yesterday"), "validation"),
        (raw(ts="2026-11-29T10:00:00"), "validation"),  # no offset
        (raw(extra=1), "validation"),
        (raw(event_id=...), "validation"),
        (raw(user_id=5), "validation"),
        (raw(action="view", watch_seconds=True), "validation"),
        (b"null", "invalid_json"),
        (b"42", "invalid_json"),
        (
            b'{"event_id":"e","user_id":"u","video_id":"v","action":"view","watch_seconds":NaN,"ts":"2026-11-29T10:00:00Z"}',
            "validation",
        ),
        (
            b'{"event_id":"e","user_id":"u","video_id":"v","action":"view","watch_seconds":1e999,"ts":"2026-11-29T10:00:00Z"}',
            "validation",
        ),
    ],
)
def test_bad_events_raise_decode_error(payload, reason):
    with pytest.raises(DecodeError) as info:
        decode_rating(payload)
    assert info.value.reason == reason
    assert info.value.message


def test_video_event_rules():
    good = {
        "video_id": "v",
        "duration_seconds": 10,
        "category": "c",
        "author_id": "a",
        "published_at": "2026-01-01T00:00:00Z",
    }
    assert decode_video(json.dumps(good).encode()).duration_seconds == 10
    with pytest.raises(DecodeError):
        decode_video(json.dumps({**good, "duration_seconds": 0}).encode())


def test_committed_schemas_match_models():
    for name, model in WIRE_MODELS.items():
        path = ROOT / "schemas" / f"{name}.json"
        assert path.read_text() == json_schema_text(model), (
            f"{path} drifted; run scripts/export_schemas.py"
        )


def test_every_field_is_described():
    for model in WIRE_MODELS.values():
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
        assert model.model_config.get("extra") == "forbid"
