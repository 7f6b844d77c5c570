"""The pure decisions of ``refold retrain``: durations, holdout window, gate, retention."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from worker.core.retrain import (
    DEFAULT_TOLERANCE,
    decide,
    holdout_start_us,
    parse_duration,
    parse_since,
    select_prune,
)

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("6h", 21_600), ("1d", 86_400), ("2w", 1_209_600),
     ("1.5h", 5400), (" 3 d ", 259_200)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1h", "1y", "h", "1h30m", "abc"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_since() -> None:
    assert parse_since("7d", NOW) == NOW - timedelta(days=7)
    assert parse_since("2026-12-01T00:00:00Z", NOW) == datetime(2026, 12, 1, tzinfo=timezone.utc)
    naive = parse_since("2026-12-01T06:00:00", NOW)
    assert naive == datetime(2026, 12, 1, 6, tzinfo=timezone.utc)  # naive: UTC
    with pytest.raises(ValueError, match="since"):
        parse_since("yesterday", NOW)


def test_holdout_is_the_newest_tenth_by_default() -> None:
    assert holdout_start_us(0, 1_000_000, fraction=None, duration_s=None) == 900_000
    assert holdout_start_us(0, 1_000_000, fraction=0.25, duration_s=None) == 750_000


def test_holdout_duration_is_clamped_to_the_archive() -> None:
    day = 86_400_000_000
    assert holdout_start_us(0, 10 * day, fraction=None, duration_s=86_400) == 9 * day
    assert holdout_start_us(5, 10, fraction=None, duration_s=3600) == 5  # longer than the span
    with pytest.raises(ValueError):
        holdout_start_us(0, 10, fraction=1.0, duration_s=None)
    with pytest.raises(ValueError):
        holdout_start_us(10, 0, fraction=None, duration_s=None)


def test_gate_swaps_when_not_worse_beyond_tolerance() -> None:
    better = decide(0.12, 0.10, DEFAULT_TOLERANCE, lists_scored=100)
    assert better.swap and ">=" in better.reason
    slightly_worse = decide(0.098, 0.10, 0.005, lists_scored=100)
    assert slightly_worse.swap
    edge = decide(0.095, 0.10, 0.005, lists_scored=100)
    assert edge.swap  # exactly at the tolerance passes
    worse = decide(0.05, 0.10, 0.005, lists_scored=100)
    assert not worse.swap and "worse by 0.0500" in worse.reason


def test_gate_refuses_a_corrupt_candidate_and_an_empty_slice() -> None:
    bad = decide(None, 0.1, 0.005, candidate_error="item_factors.npy: sha256 mismatch")
    assert not bad.swap and "verification" in bad.reason
    bad_no_current = decide(None, None, 0.005, candidate_error="x")
    assert not bad_no_current.swap
    empty = decide(0.0, 0.0, 0.005, lists_scored=0)
    assert not empty.swap and "no scored list" in empty.reason


def test_gate_with_no_current_model_swaps() -> None:
    first = decide(0.1, None, 0.005, lists_scored=10)
    assert first.swap and first.current_ndcg is None


def test_select_prune_keeps_the_newest_and_protected() -> None:
    versions = [("a", "2026-01-01"), ("b", "2026-01-02"), ("c", "2026-01-03"), ("d", "2026-01-04")]
    assert select_prune(versions, 2, set()) == ["b", "a"]
    assert select_prune(versions, 2, {"a"}) == ["b"]  # the served one survives
    assert select_prune(versions, 10, set()) == []
    assert select_prune([], 1, set()) == []
    with pytest.raises(ValueError):
        select_prune(versions, 0, set())


def test_since_copy_keeps_rows_at_or_after_since_and_range(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pyarrow as pa
    import pyarrow.parquet as pq

    from worker.retrain import _filtered_copy, _time_range_us

    src = tmp_path / "logs"
    src.mkdir()
    times = [NOW - timedelta(days=d) for d in (10, 5, 1, 0)]
    pq.write_table(
        pa.table({"event_timestamp": pa.array(times, pa.timestamp("us", tz="UTC")),
                  "x": [1, 2, 3, 4]}),
        src / "a.parquet",
    )  # fmt: skip
    out = _filtered_copy([str(src)], "event_timestamp", NOW - timedelta(days=5), tmp_path / "o")
    assert pq.read_table(out[0])["x"].to_pylist() == [2, 3, 4]
    lo, hi = _time_range_us(out, "event_timestamp")  # type: ignore[misc]
    assert (lo, hi) == (
        int((NOW - timedelta(days=5)).timestamp() * 1e6),
        int(NOW.timestamp() * 1e6),
    )


def test_a_rerun_on_the_same_data_is_not_swapped_again() -> None:
    from worker.core.retrain import same_training

    assert same_training("20261206T163442Z-c22879ae", "20261206T162013Z-c22879ae")
    assert not same_training("20261206T163442Z-c22879ae", "20261206T162013Z-00000000")
    assert not same_training("20261206T163442Z-c22879ae", "v0-base")
    assert not same_training("20261206T163442Z-c22879ae", None)
    d = decide(0.1, 0.1, 0.005, lists_scored=10, unchanged=True)
    assert not d.swap and "same data" in d.reason
