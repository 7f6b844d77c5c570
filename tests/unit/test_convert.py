"""MovieLens and generic interaction tables → the seed's Rutube Parquet layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worker.data.ingest import build_interactions
from worker.errors import DataError
from worker.eval.convert import (
    DEFAULT_DURATION_S,
    LOGS_SCHEMA,
    REACTIONS_SCHEMA,
    VIDEOS_SCHEMA,
    convert_interactions,
    convert_movielens,
    reaction_of_rating,
)

RATINGS_CSV = """userId,movieId,rating,timestamp
1,1,4.0,964982703
1,3,3.5,964981247
1,6,2.5,964982224
2,1,5.0,964983815
2,47,0.5,964982931
2,3,3.0,964982400
3,6,1.0,964980868
"""
MOVIES_CSV = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
3,Grumpier Old Men (1995),Romance|Comedy
6,Heat (1995),Action|Crime|Thriller
47,"Seven (a.k.a. Se7en) (1995)",Mystery|Thriller
99,Unrated Movie,(no genres listed)
"""
U_DATA = (
    "196\t242\t3\t881250949\n"
    "186\t302\t3\t891717742\n"
    "22\t377\t1\t878887116\n"
    "196\t302\t5\t881251000\n"
)
U_ITEM = (
    "242|Kolya (1996)|24-Jan-1997||http://x|" + "|".join(["0"] * 5 + ["1"] + ["0"] * 13) + "\n"
    "302|L.A. Confidential (1997)|01-Jan-1997||http://x|"
    + "|".join(["0"] * 6 + ["1"] + ["0"] * 4 + ["0"] * 4 + ["0", "1", "0", "0"])
    + "\n"
    "377|Heavyweights (1994)|01-Jan-1994||http://x|"
    + "|".join(["0"] * 3 + ["0", "1", "1"] + ["0"] * 13)
    + "\n"
)


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def _read(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return (
        pd.read_parquet(out / "logs.parquet"),
        pd.read_parquet(out / "video_stat.parquet"),
        pd.read_parquet(out / "reactions.parquet"),
    )


def _assert_schemas(out: Path) -> None:
    assert pq.read_schema(out / "logs.parquet").remove_metadata() == LOGS_SCHEMA
    assert pq.read_schema(out / "video_stat.parquet").remove_metadata() == VIDEOS_SCHEMA
    assert pq.read_schema(out / "reactions.parquet").remove_metadata() == REACTIONS_SCHEMA
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


def test_reaction_thresholds_include_half_stars() -> None:
    ratings = np.array([5.0, 4.5, 4.0, 3.5, 3.0, 2.5, 2.0, 1.0, 0.5])
    assert reaction_of_rating(ratings).tolist() == [
        "like",
        "like",
        "like",
        "neutral",
        "neutral",
        "dislike",
        "dislike",
        "dislike",
        "dislike",
    ]


def test_movielens_csv(tmp_path: Path) -> None:
    src = tmp_path / "ml"
    _write(src / "ratings.csv", RATINGS_CSV)
    _write(src / "movies.csv", MOVIES_CSV)
    out = tmp_path / "out"
    summary = convert_movielens(src, out)
    _assert_schemas(out)
    logs, videos, reactions = _read(out)

    assert summary["users"] == 3
    assert summary["views"] == 7
    assert summary["reactions"] == {"like": 2, "neutral": 2, "dislike": 3}
    assert summary["source"] == "movielens-csv"

    # One view per rating, ids prefixed, watch time = duration × rating / 5.
    assert len(logs) == 7
    assert set(logs["viewer_uid"]) == {"u1", "u2", "u3"}
    assert set(logs["rutube_video_id"]) == {"m1", "m3", "m6", "m47"}
    row = logs[(logs["viewer_uid"] == "u1") & (logs["rutube_video_id"] == "m3")].iloc[0]
    assert row["total_watchtime"] == round(DEFAULT_DURATION_S * 3.5 / 5)
    assert row["event_timestamp"] == pd.Timestamp(964981247, unit="s", tz="UTC")
    full = logs[(logs["viewer_uid"] == "u2") & (logs["rutube_video_id"] == "m1")].iloc[0]
    assert full["total_watchtime"] == DEFAULT_DURATION_S

    # Reactions keep the timestamps; 3.5 is neutral and 2.5 a dislike.
    r = reactions.set_index(["user_id", "video_id"])
    assert r.loc[("u1", "m1"), "action"] == "like"
    assert r.loc[("u1", "m3"), "action"] == "neutral"
    assert r.loc[("u1", "m6"), "action"] == "dislike"
    assert r.loc[("u2", "m47"), "action"] == "dislike"
    assert r.loc[("u1", "m6"), "ts"] == pd.Timestamp(964982224, unit="s", tz="UTC")

    # Every movie of movies.csv is listed, in file order; unrated ones too.
    v = videos.set_index("video_id")
    assert list(videos["video_id"]) == ["m1", "m3", "m6", "m47", "m99"]
    assert v.loc["m1", "category"] == "Adventure"
    assert v.loc["m3", "category"] == "Romance"  # the first genre as listed
    assert v.loc["m3", "author_id"] == "g:Comedy|Romance"  # the sorted genre combination
    assert v.loc["m99", "category"] == "unknown"
    assert v.loc["m1", "title"] == "Toy Story (1995)"
    assert v.loc["m1", "v_pub_datetime"] == pd.Timestamp("1995-01-01", tz="UTC")
    assert (videos["duration"] == DEFAULT_DURATION_S).all()
    assert v.loc["m1", "v_year_views"] == 2
    assert v.loc["m1", "v_likes"] == 2
    assert v.loc["m6", "v_dislikes"] == 2
    assert v.loc["m99", "v_year_views"] == 0

    # The batched ingest reads the output: one cell per rating, view + reaction.
    ingested = build_interactions(
        out / "logs.parquet",
        out / "video_stat.parquet",
        reactions=out / "reactions.parquet",
        batch_size=3,
        progress=False,
    )
    assert ingested.summary["duration_unit"] == "s"
    assert ingested.summary["rows_used"] == 7 and not ingested.summary["rows_skipped"]
    assert ingested.matrix.shape == (3, 5) and ingested.matrix.nnz == 7
    cell = ingested.matrix[ingested.users.get("u1"), ingested.items.get("m1")]
    assert cell == pytest.approx(4.0 / 5 + 2.0)  # a 4/5 watch plus a like (default weights)


def test_movielens_ratings_file_without_movies(tmp_path: Path) -> None:
    ratings = _write(tmp_path / "ml" / "ratings.csv", RATINGS_CSV)
    out = tmp_path / "out"
    summary = convert_movielens(ratings, out, chunk_rows=2)  # chunked reading
    _assert_schemas(out)
    logs, videos, _ = _read(out)
    assert len(logs) == 7
    assert summary["videos"] == 4
    assert set(videos["category"]) == {"unknown"}
    # Without a movie list, publication falls back to the first rating.
    m6 = videos.set_index("video_id").loc["m6", "v_pub_datetime"]
    assert m6 == pd.Timestamp(964980868, unit="s", tz="UTC")


def test_movielens_100k(tmp_path: Path) -> None:
    src = tmp_path / "ml-100k"
    _write(src / "u.data", U_DATA)
    _write(src / "u.item", U_ITEM, encoding="latin-1")
    out = tmp_path / "out"
    summary = convert_movielens(src, out)
    _assert_schemas(out)
    logs, videos, reactions = _read(out)
    assert summary["source"] == "movielens-100k"
    assert len(logs) == 4
    assert sorted(reactions["action"]) == ["dislike", "like", "neutral", "neutral"]
    v = videos.set_index("video_id")
    assert v.loc["m242", "category"] == "Comedy"
    assert v.loc["m242", "v_pub_datetime"] == pd.Timestamp("1997-01-24", tz="UTC")
    assert v.loc["m302", "category"] == "Crime"
    assert v.loc["m302", "author_id"] == "g:Crime|Thriller"
    assert v.loc["m377", "author_id"] == "g:Children's|Comedy"
    assert logs.set_index(["viewer_uid", "rutube_video_id"]).loc[
        ("u22", "m377"), "total_watchtime"
    ] == round(DEFAULT_DURATION_S / 5)


def test_movielens_1m_dat(tmp_path: Path) -> None:
    src = tmp_path / "ml-1m"
    _write(
        src / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::2::978298413\n"
    )
    _write(
        src / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n",
        encoding="latin-1",
    )
    out = tmp_path / "out"
    summary = convert_movielens(src, out, chunk_rows=2)
    _assert_schemas(out)
    _, videos, reactions = _read(out)
    assert summary["source"] == "movielens-dat"
    assert summary["reactions"] == {"like": 1, "neutral": 1, "dislike": 1}
    v = videos.set_index("video_id")
    assert v.loc["m661", "category"] == "Animation"
    assert v.loc["m1193", "v_pub_datetime"] == pd.Timestamp("1975-01-01", tz="UTC")
    assert sorted(reactions["user_id"]) == ["u1", "u1", "u2"]


def test_missing_input_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        convert_movielens(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        convert_movielens(tmp_path / "empty", tmp_path / "out")


def test_interactions_event_types_csv(tmp_path: Path) -> None:
    # Retailrocket-like: epoch milliseconds, event types as strings.
    src = _write(
        tmp_path / "events.csv",
        "timestamp,visitorid,event,itemid,transactionid\n"
        "1433221332117,257597,view,355908,\n"
        "1433224214164,992329,view,248676,\n"
        "1433221999827,111016,addtocart,318965,\n"
        "1433222147345,111016,transaction,318965,4000\n"
        "1433223236124,483717,Add_To_Cart,253185,\n",
    )
    out = tmp_path / "out"
    summary = convert_interactions(
        src, out, user_col="visitorid", item_col="itemid", time_col="timestamp", value_col="event"
    )
    _assert_schemas(out)
    logs, videos, reactions = _read(out)
    assert len(logs) == 5
    assert summary["reactions"] == {"like": 1, "neutral": 2, "dislike": 0}
    keys = logs["rutube_video_id"] + "/" + logs["viewer_uid"]
    watch = dict(zip(keys, logs["total_watchtime"], strict=True))
    assert watch["355908/257597"] == round(0.25 * DEFAULT_DURATION_S)
    assert sorted(reactions["action"]) == ["like", "neutral", "neutral"]
    assert logs["event_timestamp"].iloc[0] == pd.Timestamp(1433221332117, unit="ms", tz="UTC")
    assert len(videos) == 4
    assert videos["author_id"].isna().all()
    ingested = build_interactions(
        out / "logs.parquet",
        out / "video_stat.parquet",
        reactions=out / "reactions.parquet",
        progress=False,
    )
    assert ingested.matrix.nnz == 4  # visitor 111016 added to cart, then bought: one cell


def test_interactions_unknown_event_type(tmp_path: Path) -> None:
    src = _write(tmp_path / "e.csv", "u,i,t,e\n1,2,100,teleport\n")
    with pytest.raises(DataError, match="teleport"):
        convert_interactions(
            src, tmp_path / "out", user_col="u", item_col="i", time_col="t", value_col="e"
        )
    assert not (tmp_path / "out" / "logs.parquet").exists()
    convert_interactions(
        src,
        tmp_path / "out",
        user_col="u",
        item_col="i",
        time_col="t",
        value_col="e",
        event_map={"teleport": (1.0, "like")},
    )
    _, _, reactions = _read(tmp_path / "out")
    assert reactions["action"].tolist() == ["like"]


def test_interactions_numeric_parquet(tmp_path: Path) -> None:
    src = tmp_path / "dwell.parquet"
    pq.write_table(
        pa.table(
            {
                "user": ["a", "a", "b", "c"],
                "item": [10, 11, 10, 12],
                "when": ["2024-01-01T00:00:00Z", "2024-01-02", "2024-01-03", "2024-01-04"],
                "dwell": [30.0, 60.0, 120.0, None],
                "cat": ["x", "y", "x", "z"],
            }
        ),
        src,
    )
    out = tmp_path / "out"
    summary = convert_interactions(
        src,
        out,
        user_col="user",
        item_col="item",
        time_col="when",
        value_col="dwell",
        category_col="cat",
        chunk_rows=3,
    )
    _assert_schemas(out)
    logs, videos, reactions = _read(out)
    assert summary["value_scale"] == 120.0
    assert summary["rows"] == 4 and summary["zero_watch_rows"] == 1  # the null dwell
    assert logs["total_watchtime"].tolist() == [
        round(DEFAULT_DURATION_S * 0.25),
        round(DEFAULT_DURATION_S * 0.5),
        DEFAULT_DURATION_S,
    ]
    assert logs["rutube_video_id"].tolist() == ["10", "11", "10"]
    assert len(reactions) == 0
    assert dict(zip(videos["video_id"], videos["category"], strict=True)) == {
        "10": "x",
        "11": "y",
        "12": "z",
    }


def test_interactions_without_value_are_full_watches(tmp_path: Path) -> None:
    src = _write(tmp_path / "clicks.tsv", "u\ti\tt\n1\t5\t1700000000\n2\t5\t1700000100\n")
    out = tmp_path / "out"
    convert_interactions(src, out, user_col="u", item_col="i", time_col="t")
    logs, _, _ = _read(out)
    assert (logs["total_watchtime"] == DEFAULT_DURATION_S).all()
    assert logs["event_timestamp"].iloc[0] == pd.Timestamp(1700000000, unit="s", tz="UTC")


def test_interactions_missing_column(tmp_path: Path) -> None:
    src = _write(tmp_path / "e.csv", "u,i,t\n1,2,3\n")
    with pytest.raises(DataError, match="missing columns"):
        convert_interactions(src, tmp_path / "out", user_col="u", item_col="item", time_col="t")


# Taobao UserBehavior.csv as published: no header row; user, item, category, behavior type
# (pv, cart, fav, buy), epoch seconds.
TAOBAO_CSV = (
    "1,2268318,2520377,pv,1511544070\n"
    "1,2333346,2520771,pv,1511561733\n"
    "1,2576651,149192,fav,1511572885\n"
    "100,2268318,2520377,cart,1511601234\n"
    "100,2268318,2520377,buy,1511604321\n"
    "1000014,4022701,4756105,pv,1511693012\n"
)
TAOBAO_ARGS = [
    "--names", "user,item,category,behavior,time",
    "--user", "user", "--item", "item", "--time", "time",
    "--value", "behavior", "--category", "category",
]  # fmt: skip


def test_cli_converts_taobao_without_an_event_map(tmp_path: Path) -> None:
    from worker.cli import main

    src = _write(tmp_path / "UserBehavior.csv", TAOBAO_CSV)
    out = tmp_path / "out"
    assert main(["convert", "interactions", str(src), "--out", str(out), *TAOBAO_ARGS]) == 0
    _assert_schemas(out)
    logs, videos, reactions = _read(out)
    assert len(logs) == 6 and set(logs["viewer_uid"]) == {"1", "100", "1000014"}
    keys = logs["rutube_video_id"] + "/" + logs["viewer_uid"]
    watch = dict(zip(keys, logs["total_watchtime"], strict=True))
    assert watch["2333346/1"] == round(0.25 * DEFAULT_DURATION_S)  # pv: a page view
    assert watch["2576651/1"] == round(0.6 * DEFAULT_DURATION_S)  # fav: saved
    assert sorted(reactions["action"]) == ["like", "neutral", "neutral"]  # buy, cart, fav
    assert logs["event_timestamp"].min() == pd.Timestamp(1511544070, unit="s", tz="UTC")
    cats = dict(zip(videos["video_id"], videos["category"], strict=True))
    assert cats["2268318"] == "2520377" and cats["4022701"] == "4756105"


def test_cli_converts_retailrocket_events(tmp_path: Path) -> None:
    from worker.cli import main

    src = _write(
        tmp_path / "events.csv",
        "timestamp,visitorid,event,itemid,transactionid\n"
        "1433221332117,257597,view,355908,\n"
        "1433221999827,111016,addtocart,318965,\n"
        "1433222147345,111016,transaction,318965,4000\n",
    )
    out = tmp_path / "out"
    args = ["--user", "visitorid", "--item", "itemid", "--time", "timestamp", "--value", "event"]
    assert main(["convert", "interactions", str(src), "--out", str(out), *args]) == 0
    logs, _, reactions = _read(out)
    assert len(logs) == 3 and sorted(reactions["action"]) == ["like", "neutral"]


def test_cli_unknown_event_type_names_the_flag(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from worker.cli import main

    src = _write(tmp_path / "e.csv", "u,i,t,e\n1,2,100,teleport\n1,3,101,view\n")
    base = ["convert", "interactions", str(src), "--out", str(tmp_path / "out")]
    base += ["--user", "u", "--item", "i", "--time", "t", "--value", "e"]
    assert main(base) == 1
    assert "--event-map" in caplog.text and "teleport" in caplog.text
    assert "event_map=" not in caplog.text  # the Python keyword means nothing to a CLI user
    assert not (tmp_path / "out" / "logs.parquet").exists()

    assert main([*base, "--event-map", "teleport=0.8:like"]) == 0
    logs, _, reactions = _read(tmp_path / "out")
    assert reactions["action"].tolist() == ["like"]
    assert sorted(logs["total_watchtime"]) == [
        round(0.25 * DEFAULT_DURATION_S),  # view: still the built-in meaning
        round(0.8 * DEFAULT_DURATION_S),
    ]


def test_event_map_forms() -> None:
    from worker.eval.event_map import parse_event_map

    assert parse_event_map("pv=0.1, buy=1:like,fav=0.5:neutral") == {
        "pv": (0.1, None),
        "buy": (1.0, "like"),
        "fav": (0.5, "neutral"),
    }
    for bad, match in (
        ("pv", "TYPE=FRACTION"),
        ("pv=lots", "not a number"),
        ("pv=1.5", r"not in \[0, 1\]"),
        ("pv=0.5:love", "reaction 'love'"),
    ):
        with pytest.raises(DataError, match=match):
            parse_event_map(bad)


def test_event_map_json_file(tmp_path: Path) -> None:
    from worker.eval.event_map import parse_event_map

    good = _write(tmp_path / "map.json", '{"pv": [0.1, null], "buy": [1.0, "like"], "x": 0.3}')
    assert parse_event_map(f"@{good}") == {
        "pv": (0.1, None),
        "buy": (1.0, "like"),
        "x": (0.3, None),
    }
    with pytest.raises(DataError, match="not JSON"):
        parse_event_map("@" + str(_write(tmp_path / "bad.json", "{pv: 1}")))
    with pytest.raises(DataError, match="cannot read"):
        parse_event_map(f"@{tmp_path / 'missing.json'}")
    with pytest.raises(DataError, match="expected"):
        parse_event_map("@" + str(_write(tmp_path / "odd.json", '{"pv": "high"}')))
