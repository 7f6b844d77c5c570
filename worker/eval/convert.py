"""Convert public rating / interaction datasets into the Rutube layout that bootstrap reads.

refold trains from Rutube-style watch logs. To evaluate it on public data, this
module rewrites a dataset as the three Parquet files of the seed layout, in a
directory ``out``:

``logs.parquet``
    ``event_timestamp`` (UTC), ``viewer_uid``, ``rutube_video_id``,
    ``total_watchtime`` (seconds), ``region``, ``ua_device_type`` (both null:
    the sources have no such columns). One row per source interaction, except
    that a 0-second view is left out (it carries no signal, and ingest would
    skip it); its reaction, if any, is still written.
``video_stat.parquet``
    ``video_id``, ``title``, ``category``, ``duration`` (seconds),
    ``author_id``, ``v_pub_datetime``, ``v_likes``, ``v_dislikes``,
    ``v_year_views``. One row per item, counts taken from the converted data.
``reactions.parquet``
    ``user_id``, ``video_id``, ``action`` (``like``/``neutral``/``dislike``),
    ``ts`` (UTC). Only for interactions that carry an explicit reaction.

**MovieLens** (:func:`convert_movielens`): ``ratings.csv`` + ``movies.csv``
(ml-latest, ml-20m, ml-25m…), ``u.data`` + ``u.item`` (ml-100k) or
``ratings.dat`` + ``movies.dat`` (ml-1m, ml-10m). Every rating becomes

* a view of ``duration × rating / 5`` seconds (a 5-star rating is a full
  watch, half a star a tenth of one), with every movie lasting
  :data:`DEFAULT_DURATION_S`;
* a reaction: rating ≥ 4 → ``like``, 3 ≤ rating < 4 → ``neutral`` (so 3.5 is
  neutral), rating < 3 → ``dislike`` (so 2.5 is dislike); the rating's
  timestamp is kept for both rows.

Users become ``u<userId>`` and movies ``m<movieId>``. A movie's ``category`` is
its first genre (``unknown`` when it has none); its ``author_id`` is its whole
genre combination, sorted (``g:Adventure|Animation|Children``), so that the
content prior of a new movie (mean factors of its category and of its
"author") sees a finer content group than the first genre alone. Its
``v_pub_datetime`` is January 1 of the year in the title (or the release date
of ``u.item``), else the time of its first rating.

**Generic interactions** (:func:`convert_interactions`): any CSV or Parquet
table with a user, an item and a time column, e.g. e-commerce logs (see its
docstring for how a value column maps to watch fractions and reactions).

Input is read in chunks and written with a Parquet writer per file, so
MovieLens 25M or a large click log converts in bounded memory; only the per-user
set and per-item counters are kept.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from worker.data.synth import LOGS_SCHEMA, REACTIONS_SCHEMA
from worker.errors import DataError
from worker.eval.event_map import (
    ACTIONS,
    DEFAULT_EVENT_MAP,
    map_events,
    normalise_event,
)

#: Length given to every converted item, in seconds. The sources have no
#: durations; 100 minutes is a typical feature film, and only the ratio
#: watchtime / duration matters to the confidence rules.
DEFAULT_DURATION_S = 6000
#: Rows read per chunk: about 100 MB of pandas frames for a 4-column table.
DEFAULT_CHUNK_ROWS = 1_000_000
#: MovieLens rating scale maximum: a rating of 5 stars is a full watch.
MOVIELENS_MAX_RATING = 5.0

LOGS_FILE = "logs.parquet"
VIDEOS_FILE = "video_stat.parquet"
REACTIONS_FILE = "reactions.parquet"

VIDEOS_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("title", pa.string()),
        ("category", pa.string()),
        ("duration", pa.int64()),
        ("author_id", pa.string()),
        ("v_pub_datetime", pa.timestamp("us", tz="UTC")),
        ("v_likes", pa.int64()),
        ("v_dislikes", pa.int64()),
        ("v_year_views", pa.int64()),
    ]
)

#: The 19 genre flags of ml-100k's ``u.item``, in file order (also in ``u.genre``).
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
UNKNOWN_CATEGORY = "unknown"
_NO_GENRES = {"(no genres listed)", "unknown", ""}
_YEAR_IN_TITLE = re.compile(r"\((\d{4})[-–]?\d{0,4}\)\s*$")


def reaction_of_rating(
    rating: npt.NDArray[np.floating] | pd.Series,
) -> npt.NDArray[np.object_]:
    """MovieLens rating → reaction: ≥ 4 like, [3, 4) neutral, < 3 dislike."""
    r = np.asarray(rating, dtype=np.float64)
    return np.where(r >= 4.0, "like", np.where(r >= 3.0, "neutral", "dislike")).astype(object)


# ---- writing ------------------------------------------------------------------------------


@dataclass
class _VideoInfo:
    title: str = ""
    category: str = UNKNOWN_CATEGORY
    author_id: str | None = None
    published: pd.Timestamp | None = None


@dataclass
class _Writer:
    """Streams logs and reactions to Parquet and keeps per-item counters for video_stat."""

    out: Path
    duration_s: int
    users: set[str] = field(default_factory=set)
    seen: pd.Series = field(default_factory=lambda: pd.Series(dtype=np.int64))
    views: pd.Series = field(default_factory=lambda: pd.Series(dtype=np.int64))
    likes: pd.Series = field(default_factory=lambda: pd.Series(dtype=np.int64))
    dislikes: pd.Series = field(default_factory=lambda: pd.Series(dtype=np.int64))
    first_seen: pd.Series = field(default_factory=lambda: pd.Series(dtype="datetime64[us, UTC]"))
    actions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACTIONS, 0))
    n_rows: int = 0
    n_views: int = 0
    t_min: pd.Timestamp | None = None
    t_max: pd.Timestamp | None = None

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self._logs = pq.ParquetWriter(self._tmp(LOGS_FILE), LOGS_SCHEMA)
        self._reactions = pq.ParquetWriter(self._tmp(REACTIONS_FILE), REACTIONS_SCHEMA)

    def _tmp(self, name: str) -> Path:
        return self.out / f".{name}.tmp"

    def write(
        self,
        user: pd.Series,
        item: pd.Series,
        ts: pd.Series,
        fraction: npt.NDArray[np.floating],
        action: npt.NDArray[np.object_] | None,
    ) -> None:
        """One chunk: string ids, UTC timestamps, watch fractions in [0, 1], reactions or None."""
        n = len(user)
        if n == 0:
            return
        ts = pd.to_datetime(ts, utc=True).astype("datetime64[us, UTC]")
        watch = np.rint(np.clip(fraction, 0.0, 1.0) * self.duration_s).astype(np.int64)
        # A 0-second view carries no signal (ingest would skip it): only reactions keep it.
        view = watch > 0
        nulls = pa.nulls(int(view.sum()), pa.string())
        self._logs.write_table(
            pa.table(
                [
                    pa.array(ts[view], pa.timestamp("us", tz="UTC")),
                    pa.array(user[view], pa.string()),
                    pa.array(item[view], pa.string()),
                    pa.array(watch[view], pa.int64()),
                    nulls,
                    nulls,
                ],
                schema=LOGS_SCHEMA,
            )
        )
        self.users.update(user.unique().tolist())
        self.n_rows += n
        self.n_views += int(view.sum())
        self.seen = self.seen.add(item.value_counts(), fill_value=0).astype(np.int64)
        self.views = self.views.add(item[view].value_counts(), fill_value=0).astype(np.int64)
        firsts = ts.groupby(item.to_numpy()).min()
        self.first_seen = pd.concat([self.first_seen, firsts]).groupby(level=0).min()
        lo, hi = ts.min(), ts.max()
        self.t_min = lo if self.t_min is None else min(self.t_min, lo)
        self.t_max = hi if self.t_max is None else max(self.t_max, hi)
        if action is None:
            return
        has = pd.notna(action)
        if not has.any():
            return
        acts = pd.Series(action[has], dtype=object)
        items = item.to_numpy()[has]
        self._reactions.write_table(
            pa.table(
                [
                    pa.array(user.to_numpy()[has], pa.string()),
                    pa.array(items, pa.string()),
                    pa.array(acts, pa.string()),
                    pa.array(ts.to_numpy()[has], pa.timestamp("us", tz="UTC")),
                ],
                schema=REACTIONS_SCHEMA,
            )
        )
        for a, c in acts.value_counts().items():
            self.actions[str(a)] = self.actions.get(str(a), 0) + int(c)
        self.likes = self.likes.add(
            pd.Series(items[acts.to_numpy() == "like"]).value_counts(), fill_value=0
        ).astype(np.int64)
        self.dislikes = self.dislikes.add(
            pd.Series(items[acts.to_numpy() == "dislike"]).value_counts(), fill_value=0
        ).astype(np.int64)

    def finish(self, info: Mapping[str, _VideoInfo]) -> dict[str, Any]:
        """Write video_stat (every item seen in the data or in ``info``), rename files in place."""
        self._logs.close()
        self._reactions.close()
        ids = list(dict.fromkeys([*info.keys(), *self.seen.index.astype(str)]))
        empty = _VideoInfo()
        rows = [info.get(v, empty) for v in ids]
        first = self.first_seen.reindex(ids)
        published = [
            r.published if r.published is not None else (None if pd.isna(f) else f)
            for r, f in zip(rows, first, strict=True)
        ]
        table = pa.table(
            [
                pa.array(ids, pa.string()),
                pa.array([r.title for r in rows], pa.string()),
                pa.array([r.category for r in rows], pa.string()),
                pa.array(np.full(len(ids), self.duration_s, dtype=np.int64), pa.int64()),
                pa.array([r.author_id for r in rows], pa.string()),
                pa.array(published, pa.timestamp("us", tz="UTC")),
                pa.array(_counts(self.likes, ids), pa.int64()),
                pa.array(_counts(self.dislikes, ids), pa.int64()),
                pa.array(_counts(self.views, ids), pa.int64()),
            ],
            schema=VIDEOS_SCHEMA,
        )
        pq.write_table(table, self._tmp(VIDEOS_FILE))
        for name in (LOGS_FILE, REACTIONS_FILE, VIDEOS_FILE):
            os.replace(self._tmp(name), self.out / name)
        return {
            "out": str(self.out),
            "users": len(self.users),
            "videos": len(ids),
            "videos_with_interactions": len(self.seen),
            "rows": self.n_rows,
            "views": self.n_views,
            "zero_watch_rows": self.n_rows - self.n_views,
            "reactions": dict(self.actions),
            "duration_s": self.duration_s,
            "time_range": [
                None if self.t_min is None else self.t_min.isoformat(),
                None if self.t_max is None else self.t_max.isoformat(),
            ],
            "files": [LOGS_FILE, VIDEOS_FILE, REACTIONS_FILE],
        }

    def abort(self) -> None:
        """Close and remove the partial files after a failure."""
        for w in (self._logs, self._reactions):
            with contextlib.suppress(Exception):  # best effort: already failing
                w.close()
        for name in (LOGS_FILE, REACTIONS_FILE, VIDEOS_FILE):
            self._tmp(name).unlink(missing_ok=True)


def _counts(series: pd.Series, ids: list[str]) -> npt.NDArray[np.int64]:
    counts: npt.NDArray[np.int64] = series.reindex(ids, fill_value=0).to_numpy(dtype=np.int64)
    return counts


def _run(
    out: Path,
    duration_s: int,
    chunks: Iterable[tuple[pd.Series, pd.Series, pd.Series, npt.NDArray[np.floating], Any]],
    info: Callable[[], Mapping[str, _VideoInfo]],
) -> dict[str, Any]:
    writer = _Writer(Path(out), duration_s)
    try:
        for chunk in chunks:
            writer.write(*chunk)
        return writer.finish(info())
    except BaseException:
        writer.abort()
        raise


# ---- MovieLens ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _MovieLensFiles:
    kind: str  # "csv" | "100k" | "dat"
    ratings: Path
    movies: Path | None


def _locate_movielens(path: Path) -> _MovieLensFiles:
    path = Path(path)
    names = {
        "ratings.csv": ("csv", "movies.csv"),
        "u.data": ("100k", "u.item"),
        "ratings.dat": ("dat", "movies.dat"),
    }
    if path.is_file():
        if path.name not in names:
            raise DataError(f"{path}: not a MovieLens ratings file ({', '.join(names)})")
        kind, movies = names[path.name]
        folder = path.parent
        ratings = path
    elif path.is_dir():
        found = [n for n in names if (path / n).is_file()]
        if not found:
            raise DataError(f"{path}: no MovieLens ratings file ({', '.join(names)}) in it")
        kind, movies = names[found[0]]
        folder, ratings = path, path / found[0]
    else:
        raise DataError(f"{path}: no such file or directory")
    movie_path = folder / movies
    return _MovieLensFiles(kind, ratings, movie_path if movie_path.is_file() else None)


def _movielens_ratings(files: _MovieLensFiles, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Chunks with columns user, item, rating (float), ts (int epoch seconds)."""
    cols = ["user", "item", "rating", "ts"]
    dtypes = {"user": str, "item": str, "rating": np.float64, "ts": np.int64}
    if files.kind == "csv":
        reader = pd.read_csv(
            files.ratings,
            header=0,
            names=cols,
            usecols=[0, 1, 2, 3],
            dtype=dtypes,
            chunksize=chunk_rows,
        )
    elif files.kind == "100k":
        reader = pd.read_csv(
            files.ratings, sep="\t", header=None, names=cols, dtype=dtypes, chunksize=chunk_rows
        )
    else:
        # "::" is a multi-character separator: pandas needs the python engine (slower; ml-1m
        # and ml-10m are the only users of this layout).
        reader = pd.read_csv(
            files.ratings,
            sep="::",
            engine="python",
            header=None,
            names=cols,
            dtype=dtypes,
            chunksize=chunk_rows,
        )
    try:
        yield from reader
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{files.ratings}: unreadable ratings ({exc})") from None


def _year_of(title: str) -> pd.Timestamp | None:
    m = _YEAR_IN_TITLE.search(title)
    return pd.Timestamp(int(m.group(1)), 1, 1, tz="UTC") if m else None


def _genre_info(title: str, genres: list[str], published: pd.Timestamp | None) -> _VideoInfo:
    genres = [g for g in genres if g not in _NO_GENRES]
    if not genres:
        return _VideoInfo(title, UNKNOWN_CATEGORY, f"g:{UNKNOWN_CATEGORY}", published)
    return _VideoInfo(title, genres[0], "g:" + "|".join(sorted(genres)), published)


def _movielens_movies(files: _MovieLensFiles) -> dict[str, _VideoInfo]:
    if files.movies is None:
        return {}
    path = files.movies
    try:
        if files.kind == "csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
            triples = zip(df.iloc[:, 0], df.iloc[:, 1], df.iloc[:, 2], strict=True)
            return {f"m{mid}": _genre_info(t, g.split("|"), _year_of(t)) for mid, t, g in triples}
        if files.kind == "dat":
            df = pd.read_csv(
                path,
                sep="::",
                engine="python",
                header=None,
                dtype=str,
                encoding="latin-1",
                keep_default_na=False,
            )
            triples = zip(df[0], df[1], df[2], strict=True)
            return {f"m{mid}": _genre_info(t, g.split("|"), _year_of(t)) for mid, t, g in triples}
        df = pd.read_csv(
            path, sep="|", header=None, dtype=str, encoding="latin-1", keep_default_na=False
        )
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable movie list ({exc})") from None
    flags = df.iloc[:, -len(ML100K_GENRES) :].to_numpy() == "1"
    out: dict[str, _VideoInfo] = {}
    for row, flag in zip(df.itertuples(index=False), flags, strict=True):
        mid, title, released = str(row[0]), str(row[1]), str(row[2])
        when = pd.to_datetime(released, format="%d-%b-%Y", utc=True, errors="coerce")
        published = None if pd.isna(when) else when
        genres = [g for g, on in zip(ML100K_GENRES, flag, strict=True) if on]
        out[f"m{mid}"] = _genre_info(title, genres, published or _year_of(title))
    return out


def convert_movielens(
    path: Path,
    out: Path,
    *,
    duration_s: int = DEFAULT_DURATION_S,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[str, Any]:
    """Convert a MovieLens dataset to the seed layout (logs, video_stat, reactions Parquet).

    ``path`` is the dataset directory or its ratings file (``ratings.csv``,
    ``u.data`` or ``ratings.dat``); the movie list beside it is optional. See
    the module docstring for the mapping. Returns a summary: counts of users,
    videos, views and reactions by action, the time range and the files.
    Raises :class:`~worker.errors.DataError` for a missing or unreadable input.
    """
    files = _locate_movielens(Path(path))

    def chunks() -> Iterator[tuple[pd.Series, pd.Series, pd.Series, npt.NDArray[np.floating], Any]]:
        for df in _movielens_ratings(files, chunk_rows):
            rating = df["rating"].to_numpy(dtype=np.float64)
            if np.isnan(rating).any():
                raise DataError(f"{files.ratings}: missing rating values")
            yield (
                "u" + df["user"],
                "m" + df["item"],
                pd.to_datetime(df["ts"], unit="s", utc=True),
                rating / MOVIELENS_MAX_RATING,
                reaction_of_rating(rating),
            )

    summary = _run(Path(out), duration_s, chunks(), lambda: _movielens_movies(files))
    summary["source"] = f"movielens-{files.kind}"
    return summary


# ---- generic interactions -----------------------------------------------------------------


def _parse_time(col: pd.Series, unit: str) -> tuple[pd.Series, str]:
    """UTC timestamps from epoch numbers (unit detected from magnitude) or date strings."""
    if pd.api.types.is_datetime64_any_dtype(col):
        return pd.to_datetime(col, utc=True), unit
    if pd.api.types.is_numeric_dtype(col):
        if unit == "auto":
            top = float(np.nanmax(np.abs(col.to_numpy(dtype=np.float64)))) if len(col) else 0.0
            # Epoch seconds stay below 1e11 until the year 5138; larger means finer units.
            unit = "ns" if top >= 1e17 else "us" if top >= 1e14 else "ms" if top >= 1e11 else "s"
        return pd.to_datetime(col, unit=unit, utc=True), unit
    try:
        return pd.to_datetime(col, utc=True, format="mixed"), unit
    except (ValueError, TypeError) as exc:
        raise DataError(f"unparseable time values ({exc})") from None


def _read_table(
    path: Path, columns: list[str], chunk_rows: int, names: Sequence[str] | None = None
) -> Iterator[pd.DataFrame]:
    """Chunks of ``columns`` from a Parquet file or a CSV/TSV file (optionally compressed).

    ``names``: the column names of a CSV without a header row (Taobao's UserBehavior.csv).
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path}: unreadable Parquet ({exc})") from None
        names = pf.schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path}: missing columns {missing}; has {names}")
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
            yield batch.to_pandas()
        return
    stem = path.name.lower().removesuffix(".gz").removesuffix(".bz2").removesuffix(".zst")
    sep = "\t" if stem.endswith(".tsv") else ","
    if names is not None:
        header = list(names)
    else:
        try:
            header = pd.read_csv(path, sep=sep, nrows=0).columns.tolist()
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: unreadable CSV ({exc})") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}: missing columns {missing}; has {header}")
    extra: dict[str, Any] = {"header": None, "names": header} if names is not None else {}
    try:
        yield from pd.read_csv(path, sep=sep, usecols=columns, chunksize=chunk_rows, **extra)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: unreadable CSV ({exc})") from None


def _event_table(
    event_map: Mapping[str, tuple[float, str | None]] | None,
) -> dict[str, tuple[float, str | None]]:
    """The built-in event map extended by ``event_map``, keys normalised, reactions checked."""
    events = {normalise_event(k): v for k, v in {**DEFAULT_EVENT_MAP, **(event_map or {})}.items()}
    for name, (_, reaction) in events.items():
        if reaction is not None and reaction not in ACTIONS:
            raise DataError(f"event_map[{name!r}]: reaction {reaction!r} not in {ACTIONS}")
    return events


def _column_max(path: Path, column: str, chunk_rows: int, names: Sequence[str] | None) -> float:
    """The largest value of a numeric column (1.0 when it has none, or holds event types)."""
    top = 0.0
    for df in _read_table(path, [column], chunk_rows, names):
        col = df[column]
        if not pd.api.types.is_numeric_dtype(col):
            break  # event types: no scale needed
        if col.notna().any():
            top = max(top, float(col.max()))
    return top if top > 0 else 1.0


def convert_interactions(
    path: Path,
    out: Path,
    *,
    user_col: str,
    item_col: str,
    time_col: str,
    value_col: str | None = None,
    category_col: str | None = None,
    event_map: Mapping[str, tuple[float, str | None]] | None = None,
    value_scale: float | None = None,
    time_unit: str = "auto",
    duration_s: int = DEFAULT_DURATION_S,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Convert a generic interaction table (CSV, TSV or Parquet) to the Rutube layout.

    Every input row becomes one view in ``logs.parquet`` whose watch time is
    ``fraction × duration_s`` (left out when that is 0 s, see the module
    docstring); the fraction depends on ``value_col``:

    * no ``value_col``: every row is a full watch (fraction 1), no reaction;
    * a **numeric** ``value_col`` (dwell time, quantity, implicit score):
      fraction = ``clip(value / value_scale, 0, 1)``, where ``value_scale``
      defaults to the column's maximum (one extra read of that column); no
      reaction;
    * a **string** ``value_col`` (event type): looked up, after normalising to
      lower-case letters and digits (``add_to_cart`` → ``addtocart``), in
      ``event_map`` (default :data:`DEFAULT_EVENT_MAP`): ``view``/``click`` →
      fraction 0.25; ``addtocart``/``wishlist`` → 0.6 and a ``neutral``
      reaction; ``transaction``/``purchase``/``buy``/``order`` → 1.0 and a
      ``like``; ``dislike`` → 0 and a ``dislike``; Taobao's ``pv``/``cart``/
      ``fav``/``buy`` and RetailRocket's ``view``/``addtocart``/``transaction``
      are known. ``event_map`` entries extend and override the default map. An
      event type missing from the map raises :class:`UnknownEventTypeError`
      (a :class:`~worker.errors.DataError`) naming it.

    ``names`` gives the column names of a CSV file without a header row.

    ``time_col`` holds epoch numbers (seconds, ms, µs or ns, told apart by
    magnitude unless ``time_unit`` says) or date strings. Ids are kept as
    strings, unchanged. ``category_col`` (optional) fills ``video_stat.category``
    from an item's first row (else ``unknown``); ``author_id`` is null (no
    source has one) and ``v_pub_datetime`` is the item's first interaction.
    Returns the same summary as :func:`convert_movielens`.
    """
    path = Path(path)
    events = _event_table(event_map)
    columns = list(
        dict.fromkeys(c for c in (user_col, item_col, time_col, value_col, category_col) if c)
    )
    categories: dict[str, str] = {}

    scale = value_scale
    if value_col is not None and scale is None:
        scale = _column_max(path, value_col, chunk_rows, names)

    def chunks() -> Iterator[tuple[pd.Series, pd.Series, pd.Series, npt.NDArray[np.floating], Any]]:
        unit = time_unit
        mode: str | None = None
        for df in _read_table(path, columns, chunk_rows, names):
            df = df.dropna(subset=[user_col, item_col, time_col])
            if df.empty:
                continue
            user = df[user_col].astype(str).reset_index(drop=True)
            item = df[item_col].astype(str).reset_index(drop=True)
            ts, unit = _parse_time(df[time_col].reset_index(drop=True), unit)
            action: npt.NDArray[np.object_] | None = None
            if value_col is None:
                fraction = np.ones(len(df), dtype=np.float64)
            else:
                col = df[value_col].reset_index(drop=True)
                kind = "numeric" if pd.api.types.is_numeric_dtype(col) else "events"
                if mode is not None and kind != mode:
                    raise DataError(f"{path}: column {value_col!r} mixes numbers and strings")
                mode = kind
                if kind == "numeric":
                    values = col.to_numpy(dtype=np.float64)
                    fraction = np.clip(np.nan_to_num(values, nan=0.0) / (scale or 1.0), 0.0, 1.0)
                else:
                    fraction, action = map_events(col, events, path, value_col)
            if category_col is not None:
                cats = df[category_col].reset_index(drop=True)
                for it, cat in zip(item, cats, strict=True):
                    if it not in categories and pd.notna(cat):
                        categories[it] = str(cat)
            yield user, item, ts, fraction, action

    def info() -> dict[str, _VideoInfo]:
        return {k: _VideoInfo(category=v) for k, v in categories.items()}

    summary = _run(Path(out), duration_s, chunks(), info)
    summary["source"] = f"interactions:{path.name}"
    if value_col is not None:
        summary["value_scale"] = scale
    return summary
