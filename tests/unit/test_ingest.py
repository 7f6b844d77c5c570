"""The Parquet edge: layouts, column mapping, units, bad input, and exact values."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from worker.core.scoring import Weights
from worker.data.ingest import Interactions, build_interactions
from worker.data.layout import MAX_WATCH_S, ColumnMapping, resolve_paths
from worker.data.synth import synthesize
from worker.errors import DataError

T0 = datetime(2024, 6, 1, tzinfo=timezone.utc)


def write(path: Path, columns: dict[str, Any], **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, **kw)
    return path


def seed_logs(path: Path, rows: list[tuple[Any, Any, Any]]) -> Path:
    """Seed-layout logs from (user, video, watch seconds) rows, one minute apart."""
    return write(
        path,
        {
            "event_timestamp": pa.array(
                [T0 + timedelta(minutes=i) for i in range(len(rows))],
                pa.timestamp("us", tz="UTC"),
            ),
            "viewer_uid": pa.array([r[0] for r in rows], pa.string()),
            "rutube_video_id": pa.array([r[1] for r in rows], pa.string()),
            "total_watchtime": pa.array([r[2] for r in rows], pa.float64()),
            "region": pa.array(["Moscow"] * len(rows)),
        },
    )


def seed_videos(path: Path, videos: Mapping[str, float | None]) -> Path:
    ids = list(videos)
    return write(
        path,
        {
            "video_id": ids,
            "title": [f"t{v}" for v in ids],
            "category": [f"cat{i % 3}" for i in range(len(ids))],
            "duration": pa.array([videos[v] for v in ids], pa.float64()),
            "author_id": pa.array([i % 2 for i in range(len(ids))], pa.int64()),
        },
    )


def as_dict(data: Interactions) -> dict[tuple[str, str], float]:
    """The matrix as {(user_id, video_id): value}."""
    coo = data.matrix.tocoo()
    return {
        (data.users.id_of(int(u)), data.items.id_of(int(i))): float(v)
        for u, i, v in zip(coo.row, coo.col, coo.data, strict=True)
    }


def reference(
    logs: Sequence[tuple[Any, Any, Any]],
    durations: Mapping[str, float | None],
    reactions: Sequence[tuple[Any, Any, Any]] = (),
    weights: Weights | None = None,
) -> dict[tuple[str, str], float]:
    """Slow, obviously correct: one row at a time, the rules of the ingest docstring."""
    w = weights or Weights()
    out: dict[tuple[str, str], float] = {}
    for user, video, watch in logs:
        if user is None or video is None or video not in durations:
            continue
        if watch is None or math.isnan(watch) or watch <= 0 or watch > MAX_WATCH_S:
            continue
        raw = durations[video]
        dur = raw if raw is not None and raw > 0 else None
        if dur is not None and watch > 10 * dur:
            continue
        value = w.event_value("view", watch, dur)
        out[(user, video)] = out.get((user, video), 0.0) + value
    for user, video, action in reactions:
        if user is None or video not in durations or action not in ("like", "dislike", "neutral"):
            continue
        out[(user, video)] = out.get((user, video), 0.0) + w.event_value(action, None, None)
    return {k: v for k, v in out.items() if v != 0.0}


def assert_same(got: dict[tuple[str, str], float], want: dict[tuple[str, str], float]) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6), k


VIDEOS = {"video_1": 100.0, "video_2": 50.0, "video_3": 600.0, "video_4": 30.0}
LOGS = [
    ("u1", "video_1", 50.0),
    ("u1", "video_1", 80.0),  # repeated view: sums (capped per view)
    ("u2", "video_2", 25.0),
    ("u2", "video_3", 1200.0),  # watched twice its length: capped at 1
    ("u3", "video_1", 10.0),
    ("u10", "video_4", 30.0),
]


# ---- the happy path ------------------------------------------------------------------------


def test_seed_layout_matches_reference(tmp_path: Path) -> None:
    data = build_interactions(
        seed_logs(tmp_path / "logs.parquet", LOGS),
        seed_videos(tmp_path / "videos.parquet", VIDEOS),
        progress=False,
    )
    assert_same(as_dict(data), reference(LOGS, VIDEOS))
    assert data.matrix.dtype == np.float32
    assert data.summary["layout"] == "seed"
    assert data.summary["rows_read"] == data.summary["rows_used"] == len(LOGS)
    assert data.summary["duration_unit"] == "s"
    # Every metadata video is an item, in metadata order; users are those with rows.
    assert list(data.items.ids) == list(VIDEOS)
    assert set(data.users.ids) == {"u1", "u2", "u3", "u10"}
    assert data.matrix.shape == (4, 4)


def test_video_meta_and_popularity(tmp_path: Path) -> None:
    videos = {**VIDEOS, "video_9": 20.0}  # a cold video: nobody watched it
    data = build_interactions(
        seed_logs(tmp_path / "logs.parquet", LOGS),
        seed_videos(tmp_path / "videos.parquet", videos),
        progress=False,
    )
    meta = data.videos
    assert meta.duration_s.tolist() == [100.0, 50.0, 600.0, 30.0, 20.0]
    assert [meta.categories[c] for c in meta.category] == [
        "cat0", "cat1", "cat2", "cat0", "cat1",
    ]  # fmt: skip
    assert [meta.authors[a] for a in meta.author] == ["0", "1", "0", "1", "0"]
    # Popularity: users with a positive value per video.
    assert meta.popularity.tolist() == [2.0, 1.0, 1.0, 1.0, 0.0]
    assert data.matrix[:, data.items.get("video_9")].nnz == 0


def test_hackathon_layout_with_ms_durations(tmp_path: Path) -> None:
    logs = write(
        tmp_path / "logs.parquet",
        {
            "event_timestamp": pa.array([T0] * 3, pa.timestamp("ms")),
            "user_id": ["user_1", "user_2", "user_1"],
            "video_id": ["video_7", "video_8", "video_8"],
            "watchtime": pa.array([30, 60, 120], pa.int32()),
        },
    )
    videos = write(
        tmp_path / "videos.parquet",
        {
            "video_id": ["video_7", "video_8"],
            "v_duration": pa.array([60_000, 240_000], pa.int64()),  # milliseconds
            "category_id": pa.array([3, 4], pa.int64()),
            "author_id": pa.array([11, 12], pa.int64()),
        },
    )
    data = build_interactions(logs, videos, progress=False)
    assert data.summary["layout"] == "hackathon"
    assert data.summary["duration_unit"] == "ms"
    assert "auto" in data.summary["duration_unit_source"]
    assert data.videos.duration_s.tolist() == [60.0, 240.0]
    assert_same(
        as_dict(data),
        {("user_1", "video_7"): 0.5, ("user_2", "video_8"): 0.25, ("user_1", "video_8"): 0.5},
    )


def test_duration_unit_configured_wins(tmp_path: Path) -> None:
    videos = {"video_1": 30_000.0}  # a median above the threshold: auto says ms
    logs = seed_logs(tmp_path / "logs.parquet", [("u1", "video_1", 15.0)])
    vids = seed_videos(tmp_path / "videos.parquet", videos)
    auto = build_interactions(logs, vids, progress=False)
    assert auto.summary["duration_unit"] == "ms"
    assert auto.videos.duration_s[0] == 30.0
    assert as_dict(auto) == {("u1", "video_1"): 0.5}
    secs = build_interactions(logs, vids, duration_unit="s", progress=False)
    assert secs.summary["duration_unit"] == "s"
    assert secs.summary["duration_unit_source"] == "configured"
    assert secs.videos.duration_s[0] == 30_000.0
    assert as_dict(secs) == {("u1", "video_1"): pytest.approx(15 / 30_000)}


def test_column_mapping_overrides_names(tmp_path: Path) -> None:
    logs = write(
        tmp_path / "logs.parquet",
        {"uid": ["a", "b"], "vid": ["x", "y"], "secs": [10.0, 20.0]},
    )
    videos = write(
        tmp_path / "videos.parquet",
        {"vid_id": ["x", "y"], "length": [20.0, 40.0], "category": ["c", "d"]},
    )
    mapping = ColumnMapping(
        log_user="uid", log_video="vid", log_watchtime="secs", video_id="vid_id",
        video_duration="length",
    )  # fmt: skip
    data = build_interactions(logs, videos, mapping=mapping, progress=False)
    assert as_dict(data) == {("a", "x"): 0.5, ("b", "y"): 0.5}
    # author_id is absent: optional, recorded, codes are -1.
    assert data.summary["videos"]["missing_optional_columns"] == ["author_id"]
    assert data.videos.author.tolist() == [-1, -1]


def test_column_mapping_is_strict() -> None:
    with pytest.raises(ValidationError):
        ColumnMapping(log_usr="uid")  # type: ignore[call-arg]
    assert "description" in ColumnMapping.model_json_schema()["properties"]["log_user"]


def test_reactions_add_weights(tmp_path: Path) -> None:
    reactions = [
        ("u1", "video_1", "like"),
        ("u2", "video_2", "dislike"),
        ("u3", "video_3", "neutral"),
        ("u99", "video_4", "like"),  # a user known only from reactions
        ("u1", "video_404", "like"),  # unknown video
        ("u1", "video_2", "love"),  # unknown action
    ]
    rpath = write(
        tmp_path / "reactions.parquet",
        {
            "user_id": [r[0] for r in reactions],
            "video_id": [r[1] for r in reactions],
            "action": [r[2] for r in reactions],
            "ts": pa.array([T0] * len(reactions), pa.timestamp("us", tz="UTC")),
        },
    )
    weights = Weights(like=3.0, dislike=4.0, neutral=0.25)
    data = build_interactions(
        seed_logs(tmp_path / "logs.parquet", LOGS),
        seed_videos(tmp_path / "videos.parquet", VIDEOS),
        reactions=rpath,
        weights=weights,
        progress=False,
    )
    assert_same(as_dict(data), reference(LOGS, VIDEOS, reactions, weights))
    got = as_dict(data)
    assert got[("u2", "video_2")] == pytest.approx(0.5 - 4.0)  # the dislike makes it negative
    assert got[("u99", "video_4")] == 3.0
    assert data.summary["reactions"]["rows_skipped"] == {"unknown_video": 1, "unknown_action": 1}


# ---- id mapping ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 1000])
def test_non_numeric_and_mixed_ids(tmp_path: Path, batch_size: int) -> None:
    """Numeric ids first, then ids of another form: the encoder switches to hashing."""
    videos = {"video_1": 100.0, "video_2": 100.0, "clip-x": 100.0, "007": 100.0}
    logs = [
        ("u1", "video_1", 10.0),
        ("u2", "video_2", 20.0),
        ("u1", "clip-x", 30.0),
        ("alice", "video_1", 40.0),
        ("u01", "video_2", 50.0),  # not u1: leading zero
        ("u2", "007", 60.0),
        ("bob", "clip-x", 70.0),
        ("u1", "video_1", 5.0),
    ]
    data = build_interactions(
        seed_logs(tmp_path / "logs.parquet", logs),
        seed_videos(tmp_path / "videos.parquet", videos),
        batch_size=batch_size,
        progress=False,
    )
    assert_same(as_dict(data), reference(logs, videos))
    assert data.summary["id_mapping"]["users"] == "hash"
    assert len(data.users) == 5


def test_leading_zeros_are_distinct_ids(tmp_path: Path) -> None:
    videos = {"video_1": 100.0, "video_01": 100.0, "video_001": 100.0}
    logs = [("u1", "video_1", 10.0), ("u1", "video_01", 20.0), ("u1", "video_001", 30.0)]
    data = build_interactions(
        seed_logs(tmp_path / "logs.parquet", logs),
        seed_videos(tmp_path / "videos.parquet", videos),
        progress=False,
    )
    assert_same(as_dict(data), reference(logs, videos))


def test_integer_id_columns(tmp_path: Path) -> None:
    logs = write(
        tmp_path / "logs.parquet",
        {
            "viewer_uid": pa.array([5, 7, 5, None], pa.int64()),
            "rutube_video_id": pa.array([1, 2, 2, 1], pa.int32()),
            "total_watchtime": [10, 20, 30, 40],
        },
    )
    videos = write(
        tmp_path / "videos.parquet",
        {"video_id": pa.array([1, 2], pa.int64()), "duration": [100, 100]},
    )
    data = build_interactions(logs, videos, progress=False)
    assert as_dict(data) == pytest.approx({("5", "1"): 0.1, ("7", "2"): 0.2, ("5", "2"): 0.3})
    assert data.summary["rows_skipped"] == {"null_user_id": 1}


def test_csr_equals_pandas_reference_on_synthetic(tmp_path: Path) -> None:
    """Every rule at once on a small synthetic log with reactions, over several batches,
    against a reference that reads the files with pandas and walks them row by row."""
    synthesize(tmp_path, users=60, videos=40, events=3000, seed=2, progress=False)
    logs_df = pd.read_parquet(tmp_path / "logs.parquet")
    videos_df = pd.read_parquet(tmp_path / "video_stat.parquet")
    react_df = pd.read_parquet(tmp_path / "reactions.parquet")
    durations = {str(r.video_id): float(r.duration) for r in videos_df.itertuples()}
    logs = [
        (r.viewer_uid, r.rutube_video_id, float(r.total_watchtime)) for r in logs_df.itertuples()
    ]
    reactions = [(r.user_id, r.video_id, r.action) for r in react_df.itertuples()]
    data = build_interactions(
        tmp_path / "logs.parquet",
        tmp_path / "video_stat.parquet",
        reactions=tmp_path / "reactions.parquet",
        batch_size=700,
        progress=False,
    )
    want = reference(logs, durations, reactions)
    assert_same(as_dict(data), want)
    assert data.matrix.shape == (len({u for u, _ in want}), 40)


# ---- several files -------------------------------------------------------------------------


def test_glob_directory_and_list_inputs(tmp_path: Path) -> None:
    vids = seed_videos(tmp_path / "videos.parquet", VIDEOS)
    parts = [LOGS[:2], LOGS[2:4], LOGS[4:]]
    paths = [seed_logs(tmp_path / "logs" / f"part-{i}.parquet", p) for i, p in enumerate(parts)]
    (tmp_path / "logs" / "_SUCCESS").write_text("")  # Spark's marker is ignored
    want = reference(LOGS, VIDEOS)
    for spec in (tmp_path / "logs", str(tmp_path / "logs" / "part-*.parquet"), paths):
        data = build_interactions(spec, vids, progress=False)
        assert_same(as_dict(data), want)
        assert len(data.summary["files"]["logs"]) == 3


def test_resolve_paths_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        resolve_paths(tmp_path / "nope.parquet", what="logs")
    with pytest.raises(DataError, match="matches no file"):
        resolve_paths(str(tmp_path / "*.parquet"), what="logs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \*\.parquet"):
        resolve_paths(tmp_path / "empty", what="logs")


# ---- bad input -----------------------------------------------------------------------------


def test_bad_rows_are_counted_and_skipped(tmp_path: Path) -> None:
    videos: dict[str, float | None] = {**VIDEOS, "video_0": 0.0, "video_n": None}
    rows: list[tuple[Any, Any, Any]] = [
        ("u1", "video_1", 50.0),  # fine
        (None, "video_1", 50.0),  # null user
        ("u1", None, 50.0),  # null video
        ("u1", "video_404", 50.0),  # not in the metadata
        ("u1", "video_1", None),  # null watch time
        ("u1", "video_1", float("nan")),  # NaN watch time
        ("u1", "video_1", -5.0),  # negative
        ("u1", "video_1", 0.0),  # zero: no signal
        ("u1", "video_3", MAX_WATCH_S + 1),  # over a day
        ("u1", "video_4", 301.0),  # over 10 durations of a 30 s video
        ("u5", "video_0", 300.0),  # zero duration: counted as default_duration_s
        ("u6", "video_n", 60.0),  # missing duration: same
        ("u7", "video_404", 10.0),  # u7 has no usable row: not a user
    ]
    data = build_interactions(
        seed_logs(tmp_path / "logs.parquet", rows),
        seed_videos(tmp_path / "videos.parquet", videos),
        progress=False,
    )
    s = data.summary
    assert s["rows_read"] == len(rows)
    assert s["rows_skipped"] == {
        "null_user_id": 1,
        "null_video_id": 1,
        "unknown_video": 2,
        "missing_watchtime": 2,
        "negative_watchtime": 1,
        "zero_watchtime": 1,
        "watchtime_over_24h": 1,
        "watchtime_over_10x_duration": 1,
    }
    assert s["rows_used"] == 3
    assert s["rows_default_duration"] == 2
    assert s["videos"]["without_duration"] == 2
    assert set(data.users.ids) == {"u1", "u5", "u6"}
    default = Weights().default_duration_s
    assert as_dict(data) == pytest.approx(
        {
            ("u1", "video_1"): 0.5,
            ("u5", "video_0"): 300.0 / default,
            ("u6", "video_n"): 60.0 / default,
        }
    )
    assert_same(as_dict(data), reference(rows, videos))
    i0 = data.items.get("video_0")
    assert i0 is not None and math.isnan(data.videos.duration_s[i0])


def test_until_keeps_the_past_only(tmp_path: Path) -> None:
    logs = seed_logs(tmp_path / "logs.parquet", LOGS)  # one minute apart from T0
    vids = seed_videos(tmp_path / "videos.parquet", VIDEOS)
    data = build_interactions(logs, vids, until=T0 + timedelta(minutes=3), progress=False)
    assert_same(as_dict(data), reference(LOGS[:3], VIDEOS))
    assert data.summary["rows_skipped"] == {"after_until": 3}
    naive = build_interactions(
        logs, vids, until=datetime(2024, 6, 1, 0, 3), progress=False
    )  # a naive time is UTC
    assert as_dict(naive) == as_dict(data)


def test_duplicate_and_null_video_ids_in_metadata(tmp_path: Path) -> None:
    videos = write(
        tmp_path / "videos.parquet",
        {"video_id": ["video_1", "video_2", "video_1", None], "duration": [100.0, 50, 999, 1]},
    )
    data = build_interactions(
        seed_logs(tmp_path / "logs.parquet", LOGS[:3]), videos, progress=False
    )
    assert list(data.items.ids) == ["video_1", "video_2"]
    assert data.videos.duration_s.tolist() == [100.0, 50.0]  # the first row wins
    assert data.summary["videos"]["duplicate_ids"] == 1
    assert data.summary["videos"]["null_ids"] == 1


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    logs = write(tmp_path / "logs.parquet", {"viewer_uid": ["u1"], "rutube_video_id": ["v"]})
    vids = seed_videos(tmp_path / "videos.parquet", VIDEOS)
    with pytest.raises(DataError, match="total_watchtime") as err:
        build_interactions(logs, vids, progress=False)
    assert str(logs) in str(err.value)
    bad_videos = write(tmp_path / "v2.parquet", {"video_id": ["v"], "title": ["t"]})
    with pytest.raises(DataError, match="duration") as err:
        build_interactions(seed_logs(tmp_path / "l2.parquet", LOGS), bad_videos, progress=False)
    assert str(bad_videos) in str(err.value)


def test_mistyped_columns(tmp_path: Path) -> None:
    vids = seed_videos(tmp_path / "videos.parquet", VIDEOS)
    logs = write(
        tmp_path / "logs.parquet",
        {"viewer_uid": ["u1"], "rutube_video_id": ["video_1"], "total_watchtime": ["ten"]},
    )
    with pytest.raises(DataError, match="'total_watchtime' has type string") as err:
        build_interactions(logs, vids, progress=False)
    assert str(logs) in str(err.value)
    logs2 = write(
        tmp_path / "logs2.parquet",
        {"viewer_uid": [1.5], "rutube_video_id": ["video_1"], "total_watchtime": [1.0]},
    )
    with pytest.raises(DataError, match="'viewer_uid' has type double"):
        build_interactions(logs2, vids, progress=False)
    videos_bad = write(tmp_path / "v.parquet", {"video_id": ["video_1"], "duration": ["long"]})
    with pytest.raises(DataError, match="'duration' has type string"):
        build_interactions(logs2, videos_bad, progress=False)


def test_empty_and_corrupt_files(tmp_path: Path) -> None:
    vids = seed_videos(tmp_path / "videos.parquet", VIDEOS)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as err:
        build_interactions(empty, vids, progress=False)
    assert str(empty) in str(err.value)

    good = seed_logs(tmp_path / "good.parquet", LOGS)
    blob = good.read_bytes()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(blob[: len(blob) // 2])
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all" * 10)
    footer = tmp_path / "footer.parquet"
    mangled = bytearray(blob)
    for k in range(12, 40):  # the footer (metadata) sits before the last 8 bytes
        mangled[-k] ^= 0xFF
    footer.write_bytes(bytes(mangled))
    for bad in (truncated, garbage, footer):
        with pytest.raises(DataError) as err:
            build_interactions([good, bad], vids, progress=False)
        assert str(bad) in str(err.value)
    with pytest.raises(DataError, match=str(garbage)):
        build_interactions(good, garbage, progress=False)  # corrupt metadata file too


def test_corrupt_data_page(tmp_path: Path) -> None:
    """Damage inside a column chunk (not the footer) surfaces while streaming."""
    vids = seed_videos(tmp_path / "videos.parquet", VIDEOS)
    path = seed_logs(tmp_path / "logs.parquet", LOGS * 50)
    pf = pq.ParquetFile(path)
    col = pf.metadata.row_group(0).column(1)  # viewer_uid
    start = col.dictionary_page_offset or col.data_page_offset
    blob = bytearray(path.read_bytes())
    for k in range(start, start + col.total_compressed_size):
        blob[k] = 0xAB
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="corrupt") as err:
        build_interactions(path, vids, progress=False)
    assert str(path) in str(err.value)


def test_no_usable_rows(tmp_path: Path) -> None:
    vids = seed_videos(tmp_path / "videos.parquet", VIDEOS)
    schema_only = seed_logs(tmp_path / "zero.parquet", [])
    with pytest.raises(DataError, match="no usable rows"):
        build_interactions(schema_only, vids, progress=False)
    all_bad = seed_logs(tmp_path / "bad.parquet", [("u1", "video_404", 10.0)])
    with pytest.raises(DataError, match="unknown_video"):
        build_interactions(all_bad, vids, progress=False)
    # An empty file next to a good one is fine: it just adds no rows.
    data = build_interactions(
        [schema_only, seed_logs(tmp_path / "good.parquet", LOGS)], vids, progress=False
    )
    assert data.summary["rows_used"] == len(LOGS)


def test_progress_bar_reports_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_interactions(
        seed_logs(tmp_path / "logs.parquet", LOGS),
        seed_videos(tmp_path / "videos.parquet", VIDEOS),
        progress=True,
    )
    assert "rows" in capsys.readouterr().err
