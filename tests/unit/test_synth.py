"""The synthetic data generator: schemas, determinism, and the planted structure."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worker.data.synth import synthesize

USERS, VIDEOS, EVENTS = 400, 200, 20_000


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(
        out, users=USERS, videos=VIDEOS, events=EVENTS, seed=11, row_group_size=6000,
        progress=False,
    )  # fmt: skip
    return out


def test_schemas(synth_dir: Path) -> None:
    logs = pq.read_schema(synth_dir / "logs.parquet")
    assert logs.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    for col in ("viewer_uid", "rutube_video_id", "region", "ua_device_type"):
        assert logs.field(col).type == pa.string()
    assert pa.types.is_integer(logs.field("total_watchtime").type)
    videos = pq.read_schema(synth_dir / "video_stat.parquet")
    assert set(videos.names) == {
        "video_id", "title", "category", "duration", "author_id", "v_pub_datetime",
        "v_likes", "v_dislikes", "v_year_views",
    }  # fmt: skip
    assert pa.types.is_integer(videos.field("duration").type)
    assert pa.types.is_timestamp(videos.field("v_pub_datetime").type)
    reactions = pq.read_schema(synth_dir / "reactions.parquet")
    assert reactions.names == ["user_id", "video_id", "action", "ts"]
    assert reactions.field("ts").type == pa.timestamp("us", tz="UTC")


def test_written_in_row_groups(synth_dir: Path) -> None:
    pf = pq.ParquetFile(synth_dir / "logs.parquet")
    assert pf.metadata.num_rows == EVENTS
    assert pf.metadata.num_row_groups == -(-EVENTS // 6000)


def test_contents_are_plausible(synth_dir: Path) -> None:
    logs = pq.read_table(synth_dir / "logs.parquet").to_pandas()
    videos = pq.read_table(synth_dir / "video_stat.parquet").to_pandas()
    reactions = pq.read_table(synth_dir / "reactions.parquet").to_pandas()
    assert logs["viewer_uid"].str.fullmatch(r"u\d+").all()
    assert logs["rutube_video_id"].str.fullmatch(r"video_\d+").all()
    assert set(logs["rutube_video_id"]) <= set(videos["video_id"])
    assert len(videos) == VIDEOS and videos["video_id"].is_unique
    assert (logs["total_watchtime"] >= 1).all()
    assert (videos["duration"] >= 10).all() and (videos["duration"] <= 4 * 3600).all()
    span = logs["event_timestamp"].max() - logs["event_timestamp"].min()
    assert span.total_seconds() / 86_400 > 25  # spread over the 30 default days
    assert logs["event_timestamp"].is_monotonic_increasing
    # Some (user, video) pairs are watched more than once.
    assert logs.duplicated(["viewer_uid", "rutube_video_id"]).mean() > 0.05
    # 10-15% of the views carry a reaction; all three kinds occur.
    assert 0.08 < len(reactions) / len(logs) < 0.16
    assert set(reactions["action"]) == {"like", "dislike", "neutral"}


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    kw = {"users": 50, "videos": 30, "events": 3000, "row_group_size": 1000, "progress": False}
    synthesize(tmp_path / "a", seed=5, **kw)  # type: ignore[arg-type]
    synthesize(tmp_path / "b", seed=5, **kw)  # type: ignore[arg-type]
    synthesize(tmp_path / "c", seed=6, **kw)  # type: ignore[arg-type]
    for name in ("logs.parquet", "video_stat.parquet", "reactions.parquet"):
        a = pq.read_table(tmp_path / "a" / name)
        assert a.equals(pq.read_table(tmp_path / "b" / name))
        assert not a.equals(pq.read_table(tmp_path / "c" / name))


def test_tastes_are_planted(synth_dir: Path) -> None:
    """Users concentrate on a few categories, and react in line with how long they watch."""
    logs = pq.read_table(synth_dir / "logs.parquet").to_pandas()
    videos = pq.read_table(synth_dir / "video_stat.parquet").to_pandas().set_index("video_id")
    logs["category"] = videos.loc[logs["rutube_video_id"], "category"].to_numpy()
    logs["fraction"] = (
        logs["total_watchtime"] / videos.loc[logs["rutube_video_id"], "duration"].to_numpy()
    )
    per_user = logs.groupby("viewer_uid")["category"].agg(
        lambda c: c.value_counts(normalize=True).iloc[0]
    )
    global_top = logs["category"].value_counts(normalize=True).iloc[0]
    assert per_user.median() > 2 * global_top
    reactions = pq.read_table(synth_dir / "reactions.parquet").to_pandas()
    frac = logs.groupby(["viewer_uid", "rutube_video_id"])["fraction"].mean()
    keys = list(zip(reactions["user_id"], reactions["video_id"], strict=True))
    reactions["fraction"] = frac.loc[keys].to_numpy()
    mean = reactions.groupby("action")["fraction"].mean()
    assert mean["like"] > mean["neutral"] > mean["dislike"]


def test_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        synthesize(tmp_path, users=0, videos=10, events=10, seed=1, progress=False)


def _favourite_category_agreement(out: Path) -> float:
    """Share of active users whose most-watched category is the same early and late."""
    logs = pq.read_table(out / "logs.parquet").to_pandas()
    cats = pq.read_table(out / "video_stat.parquet", columns=["video_id", "category"]).to_pandas()
    logs = logs.merge(cats, left_on="rutube_video_id", right_on="video_id")
    t = logs["event_timestamp"]
    early = logs[t < t.quantile(0.25)]
    late = logs[t >= t.quantile(0.75)]

    def top(df: object) -> object:
        return df.groupby("viewer_uid")["category"].agg(lambda c: c.mode().iloc[0])  # type: ignore[attr-defined]

    a, b = top(early), top(late)
    both = a.index.intersection(b.index)  # type: ignore[attr-defined]
    return float((a[both] == b[both]).mean())  # type: ignore[index]


def test_drift_moves_tastes_and_zero_drift_changes_nothing(tmp_path: Path) -> None:
    kw = {"users": 300, "videos": 200, "events": 30_000, "seed": 5, "progress": False}
    synthesize(tmp_path / "fixed", **kw)  # type: ignore[arg-type]
    synthesize(tmp_path / "zero", drift=0.0, **kw)  # type: ignore[arg-type]
    synthesize(tmp_path / "drift", drift=0.5, **kw)  # type: ignore[arg-type]
    fixed = pq.read_table(tmp_path / "fixed" / "logs.parquet")
    assert fixed.equals(pq.read_table(tmp_path / "zero" / "logs.parquet"))
    stable, drifting = (_favourite_category_agreement(tmp_path / d) for d in ("fixed", "drift"))
    assert stable > 0.5  # planted tastes hold over the period
    assert drifting < stable - 0.3, (stable, drifting)
    with pytest.raises(ValueError):
        synthesize(tmp_path / "bad", drift=-1.0, **kw)  # type: ignore[arg-type]
