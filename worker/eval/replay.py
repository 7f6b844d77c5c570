"""Prequential replay: train before a split, replay the rest through Kafka, score every list.

``refold replay`` does, in one run:

1. **Load** the watch logs (seed layout), the video metadata and, if given, the
   reactions, into one event table in event-time order. At equal timestamps a
   view comes before a reaction (a user watches, then reacts).
2. **Split** at ``--split-at`` (a time) or ``--split-frac`` (a fraction of the
   events, by time). Events before the split train the bootstrap model (with
   :func:`worker.train.bootstrap`, on Parquet files holding only those
   events), unless ``--model`` gives one.
3. **Replay live**: a broker (the embedded one unless ``--bootstrap-servers``),
   fresh topics and a real ``refold worker`` process. The events after the
   split are sent in event-time order as ``view`` and ``like``/``dislike``/
   ``neutral`` rating events, with at most ``--max-in-flight`` events not yet
   reflected by a published list (Tansu's end offsets are wrong, so progress is
   tracked with the ``event_ids`` each list reflects). Videos that the model
   does not know are announced on the ``videos`` topic just before their first
   event, as a catalog service would.
4. **Baselines in-process**, on the same events and at the same *list-request
   points* as the live worker's lists (a live list for user U that reflects U's
   events up to replay index i is a request point (U, i); every variant answers
   it with what it knew after event i):

   * ``popularity``: time-aware popularity, an exponentially decayed count of
     positive events (half-life ``--popularity-half-life``, by default a tenth
     of the replay's time span);
   * ``static``: the bootstrap model, never updated (known users keep their
     bootstrap factors, new users get the model's popularity list);
   * ``retrain``: the oracle that fold-in approximates. Fold-in keeps the
     bootstrap model's item factors and re-solves users exactly; the ideal it
     stands in for is a full ALS retrain on every event seen so far, at every
     list. That is too costly, so the oracle retrains fully (with the
     bootstrap model's hyper-parameters) every ``--retrain-every`` events
     (default: every 10% of the replay, so 9 retrains) and folds users in
     exactly, with the same engine, between retrains; it is hot-swapped in as
     the worker swaps models. The closer the retrains, the closer it gets to
     the ideal; with ``--retrain-every 0`` it equals fold-in;
   * ``retrain_nofoldin``: the same periodic retrains without fold-in in
     between: the batch-only system that refold replaces. A retrain exactly at
     the split is the static model, so it starts as ``static``;
   * a check, not a variant: the worker's own engine run in-process on the
     same events, compared with every ``--check-every``-th live list (they
     should be identical: the live path adds Kafka, not different maths).

   Every variant filters what the user has already seen (the worker does too),
   so differences come from the ranking, not from the filter.
5. **Score** every list prequentially: a list for user U that reflects U's
   event at replay index i is scored against U's *relevant* videos: among the
   next ``--horizon-events`` distinct videos U interacts with after i (and
   within ``--horizon-seconds`` of event i's time, if set) that U had not seen
   before, those U rated positively: a like, or, when there is no reaction, a
   view of at least ``--positive-fraction`` of the video. A list with no
   relevant video is not scored (it is counted).
6. **Report**: see :mod:`worker.eval.report`.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from tqdm import tqdm

from worker.config import KafkaSettings, TopicSettings
from worker.core.als import F32, I32, I64, ItemIndex, top_k
from worker.core.engine import Recommender
from worker.core.model import Model
from worker.core.scoring import Weights
from worker.core.wire import (
    MAX_WATCH_SECONDS,
    TOP_K,
    RatingEvent,
    Recommendations,
    VideoEvent,
    decode_recommendations,
    encode,
)
from worker.data.layout import MS_DETECT_THRESHOLD
from worker.errors import ConfigError, DataError, DecodeError, RefoldError
from worker.eval.metrics import (
    METRIC_DEFINITIONS,
    cluster_bootstrap,
    coverage,
    percentiles,
    score_list,
)

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]

#: Action codes of the event table, in this order.
ACTIONS = ("view", "like", "neutral", "dislike")
VIEW, LIKE, NEUTRAL, DISLIKE = range(4)
_ACTION_CODE = {a: i for i, a in enumerate(ACTIONS)}

#: Variant names, in report order.
POPULARITY, STATIC, RETRAIN_NOFOLDIN, RETRAIN, FOLDIN, FOLDIN_INPROCESS = (
    "popularity",
    "static",
    "retrain_nofoldin",
    "retrain",
    "foldin",
    "foldin_inprocess",
)
VARIANTS = (POPULARITY, STATIC, RETRAIN_NOFOLDIN, RETRAIN, FOLDIN, FOLDIN_INPROCESS)
VARIANT_DESCRIPTIONS = {
    POPULARITY: "time-aware popularity: exponentially decayed count of positive events",
    STATIC: "the bootstrap model, never updated (no fold-in); new users get its popular list",
    RETRAIN_NOFOLDIN: "full ALS retrain on all events seen so far, periodically; "
    "nothing changes between retrains",
    RETRAIN: "the oracle: full ALS retrain on all events seen so far, periodically, with the "
    "same exact fold-in between retrains (what fold-in on a stale model approximates)",
    FOLDIN: "refold's live worker through Kafka: exact per-user fold-in after every batch",
    FOLDIN_INPROCESS: "refold's core engine in-process, at the same request points (a check)",
}
METRIC_KEYS = ("ndcg_at_10", "precision_at_10", "recall_at_10", "map_at_10", "hit_rate_at_10")
_SCORE_FIELD = {
    "ndcg_at_10": "ndcg",
    "precision_at_10": "precision",
    "recall_at_10": "recall",
    "map_at_10": "average_precision",
    "hit_rate_at_10": "hit",
}

#: Rows per Parquet batch when reading or writing (about 100 MB of columns).
_BATCH_ROWS = 1_000_000
#: A median duration above this many "seconds" (5.5 hours) is taken as milliseconds.
#: Probe user of the live replay: its list tells that the worker has joined its group.
PROBE_USER = "__refold_replay_probe__"
#: Pending in-process list requests are answered in batches of at most this many users.
_FLUSH_USERS = 512
#: The popularity ranking is re-sorted this many times over the replay (staleness bound).
_POPULARITY_REFRESHES = 2000
#: Bins of the metrics-over-time plots (equal numbers of scored lists per bin).
TIME_BINS = 20
#: Largest |exponent| of the popularity decay, so 2**x stays finite in float64.
_MAX_DECAY_EXPONENT = 1000.0
_US = 1_000_000
#: Seconds a stopping worker gets to finish its batch after SIGTERM before SIGKILL.
_WORKER_STOP_S = 60.0
#: Seconds for other clean-ups (producer close, collector thread); then we move on.
_CLOSE_S = 30.0
#: Poll timeout of the list collector: short, so that stopping it is prompt.
_COLLECT_POLL_MS = 50
#: The wire's limit on a video title (VideoEvent.title).
_MAX_TITLE_CHARS = 1000
#: The worker's log lines on a group assignment change (worker.loop, on_assigned/on_revoked).
_ASSIGNMENT_LINE = re.compile(r"partitions \[([\d, ]*)\] (assigned|revoked)")


class ReplayError(RefoldError):
    """The replay could not run (the worker died, stalled, or the data cannot be replayed)."""


# ---- the event table -------------------------------------------------------------------------


@dataclass
class VideoInfo:
    """Metadata of one video, enough to announce it on the ``videos`` topic."""

    duration_s: float
    category: str | None
    author_id: str | None
    title: str
    published_at: datetime | None


@dataclass
class EventTable:
    """Every event of a dataset, in event-time order, with ids coded as integers.

    ``ts`` is microseconds since the epoch (UTC); ``watch`` is seconds (NaN for
    reactions); ``duration_s`` is per video code (NaN when unknown).
    """

    ts: I64
    user: I32
    video: I32
    action: npt.NDArray[np.int8]
    watch: F64
    user_ids: list[str]
    video_ids: list[str]
    duration_s: F64
    videos: dict[str, VideoInfo] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    _codes: dict[str, int] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ts)

    def code_of(self, video_id: str) -> int:
        """The code of a video id; an id absent from the data gets a distinct negative code."""
        if not self._codes:
            self._codes.update({v: i for i, v in enumerate(self.video_ids)})
        code = self._codes.get(video_id)
        if code is None:
            code = self._codes[video_id] = -len(self._codes) - 1
        return code

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_videos(self) -> int:
        return len(self.video_ids)

    def fractions(self, default_duration_s: float) -> F64:
        """Watched fraction of every view (NaN for reactions); unknown durations use the default."""
        dur = self.duration_s[self.video]
        dur = np.where(np.isfinite(dur) & (dur > 0), dur, default_duration_s)
        return self.watch / dur

    def values(self, weights: Weights) -> F32:
        """Each event's contribution to its (user, video) row value, as the worker scores it."""
        frac = np.nan_to_num(self.fractions(weights.default_duration_s), nan=0.0)
        out = np.zeros(len(self), dtype=np.float64)
        view = self.action == VIEW
        out[view] = weights.view * np.minimum(frac[view], weights.watch_cap)
        out[self.action == LIKE] = weights.like
        out[self.action == NEUTRAL] = weights.neutral
        out[self.action == DISLIKE] = -weights.dislike
        return out.astype(np.float32)

    def positives(
        self, positive_fraction: float, default_duration_s: float
    ) -> npt.NDArray[np.bool_]:
        """Events that are positive on their own: a like, or a view of >= positive_fraction."""
        frac = np.nan_to_num(self.fractions(default_duration_s), nan=0.0)
        out: npt.NDArray[np.bool_] = (self.action == LIKE) | (
            (self.action == VIEW) & (frac >= positive_fraction)
        )
        return out


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files, directories (every ``*.parquet`` below) and globs, as a sorted file list."""
    out: list[Path] = []
    for p in paths:
        text = str(p)
        if any(ch in text for ch in "*?["):
            out += [Path(x) for x in sorted(glob.glob(text, recursive=True))]
        elif Path(text).is_dir():
            out += sorted(Path(text).rglob("*.parquet"))
        else:
            out.append(Path(text))
    missing = [str(p) for p in out if not p.is_file()]
    if missing or not out:
        raise DataError(f"no such Parquet file(s): {missing or [str(p) for p in paths]}")
    return out


def _timestamps_us(arr: pa.Array | pa.ChunkedArray) -> I64:
    """A timestamp column (timestamp type, epoch number or text) as UTC microseconds."""
    t = arr.type
    if pa.types.is_timestamp(t):
        return np.asarray(pc.cast(arr, pa.timestamp("us", tz=t.tz)).cast(pa.int64()), np.int64)
    if pa.types.is_date(t):
        return np.asarray(pc.cast(pc.cast(arr, pa.timestamp("us")), pa.int64()), np.int64)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        x = np.asarray(arr, dtype=np.float64)
        mag = float(np.nanmedian(np.abs(x))) if len(x) else 0.0
        # Epoch seconds until 5138, ms until 5138, else µs: pick the unit by magnitude.
        scale = 1e6 if mag < 1e11 else 1e3 if mag < 1e14 else 1.0
        return (x * scale).astype(np.int64)
    import pandas as pd

    values = pd.to_datetime(pd.Series(arr.to_pylist()), utc=True, errors="coerce")
    if values.isna().any():
        raise DataError(f"{int(values.isna().sum())} timestamps could not be parsed")
    out: I64 = values.to_numpy("datetime64[us]").astype(np.int64)
    return out


#: Roles of each input, mapped to :class:`worker.data.layout.ColumnMapping` fields.
_LOG_ROLES = {
    "ts": "log_timestamp",
    "user": "log_user",
    "video": "log_video",
    "watch": "log_watchtime",
}
_VIDEO_ROLES = {
    "video_id": "video_id",
    "duration": "video_duration",
    "category": "video_category",
    "author_id": "video_author",
}
_REACTION_ROLES = {
    "ts": "reaction_timestamp",
    "user": "reaction_user",
    "video": "reaction_video",
    "action": "reaction_action",
}
_REACTION_DEFAULTS = {
    "reaction_user": "user_id",
    "reaction_video": "video_id",
    "reaction_action": "action",
    "reaction_timestamp": "ts",
}


def resolve_columns(
    path: Path, roles: dict[str, str], required: Sequence[str], mapping: Any, what: str
) -> dict[str, str]:
    """``{role: column}`` for one file: the first known layout (seed, hackathon) that fits.

    Layouts and overrides are :mod:`worker.data.layout`'s (``LAYOUTS`` and a
    ``ColumnMapping``), so replay reads whatever ``refold bootstrap`` reads.
    Optional roles missing from the file are left out.
    """
    from worker.data.layout import LAYOUTS

    names = set(pq.ParquetFile(path).schema_arrow.names)
    overrides = (
        {} if mapping is None else {k: v for k, v in mapping.model_dump().items() if v is not None}
    )
    for layout in LAYOUTS.values():
        cols = {**layout, **_REACTION_DEFAULTS, **overrides}
        picked = {role: cols.get(field, field) for role, field in roles.items()}
        if all(picked[r] in names for r in required):
            return {r: c for r, c in picked.items() if c in names}
    raise DataError(
        f"{what} file {path}: its columns {sorted(names)} match no known layout; "
        "name them with --columns (a ColumnMapping as JSON)"
    )


def _read_columns(
    files: Sequence[Path],
    roles: dict[str, str],
    required: Sequence[str],
    mapping: Any,
    what: str,
) -> Iterator[dict[str, pa.Array]]:
    """Batches of ``{role: column}`` from every file, each file's layout detected."""
    for f in files:
        cols = resolve_columns(f, roles, required, mapping, what)
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=list(cols.values())):
            yield {role: batch.column(col) for role, col in cols.items()}


def _as_text(arr: pa.Array) -> pa.Array:
    return arr if pa.types.is_large_string(arr.type) else pc.cast(arr, pa.large_string())


def detect_duration_scale(durations: F64, unit: str) -> float:
    """Divisor that turns stored durations into seconds (1 or 1000)."""
    if unit == "s":
        return 1.0
    if unit == "ms":
        return 1000.0
    if unit != "auto":
        raise ConfigError(f"duration unit must be auto, s or ms, got {unit!r}")
    finite = durations[np.isfinite(durations) & (durations > 0)]
    return 1000.0 if finite.size and float(np.median(finite)) > MS_DETECT_THRESHOLD else 1.0


def load_events(
    logs: Sequence[str | Path],
    videos: str | Path,
    reactions: str | Path | None = None,
    *,
    duration_unit: str = "auto",
    mapping: Any = None,
) -> EventTable:
    """Read logs (and reactions) into one :class:`EventTable`, sorted by event time.

    Columns are found as ``refold bootstrap`` finds them: the seed layout
    (``event_timestamp``, ``viewer_uid``, ``rutube_video_id``,
    ``total_watchtime`` in seconds; videos ``video_id``, ``duration``,
    ``category``, ``author_id``), the RUTUBE hackathon layout, or a
    :class:`worker.data.layout.ColumnMapping`. Reactions: ``user_id``,
    ``video_id``, ``action`` (like/dislike/neutral), ``ts``. Replay needs the
    event time, which bootstrap does not. Other datasets: ``refold convert``.
    """
    log_files = expand_paths(logs)
    ts_parts: list[I64] = []
    users: list[pa.Array] = []
    vids: list[pa.Array] = []
    watch_parts: list[F64] = []
    action_parts: list[npt.NDArray[np.int8]] = []
    kind_parts: list[npt.NDArray[np.int8]] = []
    for b in _read_columns(log_files, _LOG_ROLES, tuple(_LOG_ROLES), mapping, "logs"):
        n = len(b["ts"])
        ts_parts.append(_timestamps_us(b["ts"]))
        users.append(_as_text(b["user"]))
        vids.append(_as_text(b["video"]))
        w = np.asarray(pc.cast(b["watch"], pa.float64()).fill_null(0.0), dtype=np.float64)
        watch_parts.append(np.clip(w, 0.0, MAX_WATCH_SECONDS))
        action_parts.append(np.full(n, VIEW, np.int8))
        kind_parts.append(np.zeros(n, np.int8))
    n_views = sum(len(x) for x in ts_parts)
    skipped_reactions = 0
    if reactions is not None:
        files = expand_paths([reactions])
        roles, req = _REACTION_ROLES, tuple(_REACTION_ROLES)
        for b in _read_columns(files, roles, req, mapping, "reactions"):
            names = pc.utf8_lower(pc.utf8_trim_whitespace(pc.cast(b["action"], pa.string())))
            found = pc.index_in(names, value_set=pa.array(ACTIONS, pa.string()))
            codes = np.asarray(found.fill_null(-1), dtype=np.int64).astype(np.int8)
            keep = codes > VIEW  # like / neutral / dislike; a "view" reaction has no meaning
            skipped_reactions += int((~keep).sum())
            mask = pa.array(keep)
            ts_parts.append(_timestamps_us(b["ts"].filter(mask)))
            users.append(_as_text(b["user"].filter(mask)))
            vids.append(_as_text(b["video"].filter(mask)))
            watch_parts.append(np.full(int(keep.sum()), np.nan))
            action_parts.append(codes[keep])
            kind_parts.append(np.ones(int(keep.sum()), np.int8))
    if not ts_parts or sum(len(x) for x in ts_parts) == 0:
        raise DataError("the logs hold no events")
    ts = np.concatenate(ts_parts)
    kind = np.concatenate(kind_parts)
    # Stable: at equal times views come before reactions, each in file order.
    order = np.lexsort((kind, ts))
    user_enc = pa.concat_arrays(users).dictionary_encode()
    video_enc = pa.concat_arrays(vids).dictionary_encode()
    user_ids = [str(x) for x in user_enc.dictionary.to_pylist()]
    video_ids = [str(x) for x in video_enc.dictionary.to_pylist()]
    user_codes = np.asarray(user_enc.indices.fill_null(-1), dtype=np.int32)
    video_codes = np.asarray(video_enc.indices.fill_null(-1), dtype=np.int32)
    valid = (user_codes >= 0) & (video_codes >= 0)
    order = order[valid[order]]
    table = EventTable(
        ts=ts[order],
        user=user_codes[order],
        video=video_codes[order],
        action=np.concatenate(action_parts)[order],
        watch=np.concatenate(watch_parts)[order],
        user_ids=user_ids,
        video_ids=video_ids,
        duration_s=np.full(len(video_ids), np.nan),
    )
    _attach_videos(table, videos, duration_unit, mapping)
    table.summary = {
        "logs": [str(p) for p in log_files],
        "videos": str(videos),
        "reactions": None if reactions is None else str(reactions),
        "events": len(table),
        "views": n_views,
        "reactions_events": len(table) - n_views,
        "reactions_skipped": skipped_reactions,
        "rows_without_ids": int((~valid).sum()),
        "users": table.n_users,
        "videos_in_events": table.n_videos,
        "first_event": iso_time(int(table.ts[0])) if len(table) else None,
        "last_event": iso_time(int(table.ts[-1])) if len(table) else None,
    }
    return table


def _attach_videos(table: EventTable, videos: str | Path, duration_unit: str, mapping: Any) -> None:
    """Durations (in seconds) and announcement metadata of the videos that occur in events."""
    files = expand_paths([videos])
    code_of = {v: i for i, v in enumerate(table.video_ids)}
    optional = ("category", "author_id", "title", "v_pub_datetime")
    roles = {**_VIDEO_ROLES, "title": "title", "v_pub_datetime": "v_pub_datetime"}
    raw: list[tuple[int, float, dict[str, Any]]] = []
    for b in _read_columns(files, roles, ("video_id", "duration"), mapping, "videos"):
        ids = pc.cast(b["video_id"], pa.string()).to_pylist()
        dur = np.asarray(pc.cast(b["duration"], pa.float64()).fill_null(np.nan), dtype=np.float64)
        extra = {c: b[c].to_pylist() for c in optional if c in b}
        for j, vid in enumerate(ids):
            code = code_of.get(str(vid)) if vid is not None else None
            if code is None:
                continue
            raw.append((code, float(dur[j]), {c: extra[c][j] for c in extra}))
    scale = detect_duration_scale(np.array([d for _, d, _ in raw], dtype=np.float64), duration_unit)
    for code, stored, meta in raw:
        seconds = stored / scale
        table.duration_s[code] = seconds if math.isfinite(seconds) and seconds > 0 else np.nan
        published = meta.get("v_pub_datetime")
        if isinstance(published, datetime) and published.tzinfo is None:
            published = published.replace(tzinfo=timezone.utc)
        table.videos[table.video_ids[code]] = VideoInfo(
            duration_s=seconds,
            category=None if meta.get("category") is None else str(meta["category"]),
            author_id=None if meta.get("author_id") is None else str(meta["author_id"]),
            title=str(meta.get("title") or ""),
            published_at=published if isinstance(published, datetime) else None,
        )
    table.summary["duration_divisor"] = scale


def iso_time(ts_us: int) -> str:
    """Microseconds since the epoch as RFC 3339 text in UTC (Z suffix)."""
    return datetime.fromtimestamp(ts_us / _US, tz=timezone.utc).isoformat().replace("+00:00", "Z")


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _dt(ts_us: int) -> datetime:
    """Microseconds since the epoch as an aware UTC datetime (exact, no float rounding)."""
    return _EPOCH + timedelta(microseconds=int(ts_us))


def parse_time(text: str) -> int:
    """An ISO-8601 time (UTC when no offset) or epoch seconds, as microseconds."""
    try:
        return int(float(text) * _US)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"cannot parse split time {text!r}: {exc}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * _US)


def split_index(ts: I64, *, split_at: str | None, split_frac: float | None) -> int:
    """Index of the first replayed event: events before it train, the rest replay.

    ``split_frac`` picks the time at that fraction of the events; every event at
    or after that time is replayed, so a split never cuts a timestamp in two.
    """
    if (split_at is None) == (split_frac is None):
        raise ConfigError("give exactly one of --split-at and --split-frac")
    if split_frac is not None:
        if not 0.0 < split_frac < 1.0:
            raise ConfigError(f"--split-frac must be in (0, 1), got {split_frac}")
        cut = int(ts[min(len(ts) - 1, int(len(ts) * split_frac))])
    else:
        cut = parse_time(str(split_at))
    idx = int(np.searchsorted(ts, cut, side="left"))
    if idx == 0:
        raise DataError("no events before the split: nothing to train on")
    if idx >= len(ts):
        raise DataError("no events after the split: nothing to replay")
    return idx


def write_training_files(table: EventTable, end: int, out: Path) -> tuple[Path, Path | None]:
    """The events before ``end`` as seed-layout Parquet (logs, and reactions if any)."""
    out.mkdir(parents=True, exist_ok=True)
    users = pa.array(table.user_ids, pa.string())
    videos = pa.array(table.video_ids, pa.string())
    logs_path = out / "logs.parquet"
    react_path = out / "reactions.parquet"
    logs_schema = pa.schema(
        [
            ("event_timestamp", pa.timestamp("us", tz="UTC")),
            ("viewer_uid", pa.string()),
            ("rutube_video_id", pa.string()),
            ("total_watchtime", pa.float64()),
        ]
    )
    react_schema = pa.schema(
        [
            ("user_id", pa.string()),
            ("video_id", pa.string()),
            ("action", pa.string()),
            ("ts", pa.timestamp("us", tz="UTC")),
        ]
    )
    names = pa.array(ACTIONS, pa.string())
    n_react = 0
    with (
        pq.ParquetWriter(logs_path, logs_schema) as lw,
        pq.ParquetWriter(react_path, react_schema) as rw,
    ):
        for lo in range(0, end, _BATCH_ROWS):
            hi = min(end, lo + _BATCH_ROWS)
            act = table.action[lo:hi]
            ts = pa.array(table.ts[lo:hi], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
            u = pc.take(users, pa.array(table.user[lo:hi]))
            v = pc.take(videos, pa.array(table.video[lo:hi]))
            view = pa.array(act == VIEW)
            lw.write_table(
                pa.table(
                    [ts.filter(view), u.filter(view), v.filter(view),
                     pa.array(table.watch[lo:hi]).filter(view)],
                    schema=logs_schema,
                )
            )  # fmt: skip
            react = pa.array(act != VIEW)
            n_react += int((act != VIEW).sum())
            rw.write_table(
                pa.table(
                    [u.filter(react), v.filter(react),
                     pc.take(names, pa.array(act.astype(np.int64))).filter(react),
                     ts.filter(react)],
                    schema=react_schema,
                )
            )  # fmt: skip
    if n_react == 0:
        react_path.unlink()
        return logs_path, None
    return logs_path, react_path


# ---- prequential ground truth ----------------------------------------------------------------


@dataclass
class Relevance:
    """Per user, the videos they interact with after the split, for prequential scoring.

    A *unit* is one (user, video) pair first met after the split and not seen
    before it: its first replay index and time, and whether the user liked it
    (last reaction is ``like``; with no reaction, best watched fraction >=
    ``positive_fraction``).
    """

    user: I32  # units sorted by (user, first index)
    first_idx: I64
    first_ts: I64
    video: I32
    positive: npt.NDArray[np.bool_]
    starts: I64  # starts[u]..starts[u+1] are user u's units
    horizon_events: int
    horizon_us: int | None

    @classmethod
    def build(
        cls,
        table: EventTable,
        split: int,
        end: int,
        *,
        positive_fraction: float,
        default_duration_s: float,
        horizon_events: int,
        horizon_seconds: float | None,
    ) -> Relevance:
        nv = np.int64(table.n_videos)
        pre_keys = np.unique(table.user[:split].astype(np.int64) * nv + table.video[:split])
        keys = table.user[split:end].astype(np.int64) * nv + table.video[split:end]
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        act = table.action[split:end]
        frac = np.nan_to_num(table.fractions(default_duration_s)[split:end], nan=0.0)
        best_frac = np.zeros(len(uniq))
        view = act == VIEW
        np.maximum.at(best_frac, inverse[view], frac[view])
        # Last reaction per unit: the reaction with the largest replay index wins.
        last_reaction = np.full(len(uniq), -1, dtype=np.int64)
        react_idx = np.flatnonzero(~view)
        if react_idx.size:
            last_pos = np.full(len(uniq), -1, dtype=np.int64)
            np.maximum.at(last_pos, inverse[react_idx], react_idx)
            has = last_pos >= 0
            last_reaction[has] = act[last_pos[has]]
        positive = np.where(
            last_reaction >= 0, last_reaction == LIKE, best_frac >= positive_fraction
        )
        fresh = ~np.isin(uniq, pre_keys)
        users = (uniq // nv).astype(np.int32)[fresh]
        order = np.lexsort((first[fresh], users))
        users = users[order]
        first_idx = first[fresh][order].astype(np.int64)
        return cls(
            user=users,
            first_idx=first_idx,
            first_ts=table.ts[split + first_idx],
            video=(uniq % nv).astype(np.int32)[fresh][order],
            positive=positive[fresh][order],
            starts=np.searchsorted(users, np.arange(table.n_users + 1)).astype(np.int64),
            horizon_events=horizon_events,
            horizon_us=None if horizon_seconds is None else int(horizon_seconds * _US),
        )

    def relevant(self, user: int, idx: int, ts: int) -> set[int]:
        """Video codes relevant to a list for ``user`` reflecting replay event ``idx`` at ``ts``."""
        lo, hi = int(self.starts[user]), int(self.starts[user + 1])
        j = lo + int(np.searchsorted(self.first_idx[lo:hi], idx, side="right"))
        stop = min(hi, j + self.horizon_events)
        if self.horizon_us is not None:
            stop = j + int(np.searchsorted(self.first_ts[j:stop], ts + self.horizon_us, "right"))
        sel = slice(j, stop)
        return set(self.video[sel][self.positive[sel]].tolist())


# ---- baselines -------------------------------------------------------------------------------


class Popularity:
    """Time-aware popularity: each positive event counts ``2 ** ((t - t0) / half_life)``.

    Weighting by a growing factor instead of decaying every count gives the same
    ranking as an exponential decay of age, with O(1) work per event.
    """

    def __init__(self, n_videos: int, *, t0_us: int, half_life_us: float) -> None:
        self.t0 = t0_us
        self.half_life = max(1.0, half_life_us)
        self.counts = np.zeros(n_videos, dtype=np.float64)
        self.order: I64 = np.zeros(0, dtype=np.int64)

    def weight(self, ts_us: I64 | int) -> F64:
        x = (np.asarray(ts_us, dtype=np.float64) - self.t0) / self.half_life
        return np.exp2(np.clip(x, -_MAX_DECAY_EXPONENT, _MAX_DECAY_EXPONENT))

    def add_many(self, videos: I32, ts_us: I64) -> None:
        np.add.at(self.counts, videos, self.weight(ts_us))

    def add(self, video: int, ts_us: int) -> None:
        self.counts[video] += float(self.weight(ts_us))

    def refresh(self) -> None:
        """Re-sort the ranking (only videos with a positive count are eligible)."""
        eligible = np.flatnonzero(self.counts > 0)
        self.order = eligible[np.argsort(-self.counts[eligible], kind="stable")]

    def top(self, seen: set[int], k: int) -> list[int]:
        """The ``k`` most popular videos not in ``seen``, from the last refreshed ranking."""
        return first_unseen(self.order, seen, k)


@dataclass
class FactorModel:
    """User and item factors over the event table's codes, with eligible items and a fallback."""

    user_factors: F32  # (n_users_in_table, f); rows of unknown users are unused
    known_user: npt.NDArray[np.bool_]
    eligible: I64  # video codes that can be recommended
    index: ItemIndex
    pos_of: I64  # video code -> position in ``eligible`` or -1
    popular: I64  # fallback ranking (video codes), for users without factors

    @classmethod
    def build(
        cls,
        user_factors: F32,
        known_user: npt.NDArray[np.bool_],
        item_factors: F32,
        eligible: I64,
        popular: I64,
        n_videos: int,
    ) -> FactorModel:
        pos_of = np.full(n_videos, -1, dtype=np.int64)
        pos_of[eligible] = np.arange(len(eligible))
        return cls(
            user_factors=user_factors,
            known_user=known_user,
            eligible=eligible,
            index=ItemIndex.build(np.ascontiguousarray(item_factors[eligible])),
            pos_of=pos_of,
            popular=popular,
        )

    def recommend(self, users: Sequence[int], seen: Sequence[set[int]], k: int) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in users]
        personal = [j for j, u in enumerate(users) if self.known_user[u]]
        if personal:
            x = self.user_factors[[users[j] for j in personal]]
            exclude = []
            for j in personal:
                p = self.pos_of[np.fromiter(seen[j], dtype=np.int64, count=len(seen[j]))]
                exclude.append(p[p >= 0])
            items, _ = top_k(self.index, x, exclude, k)
            for row, j in enumerate(personal):
                out[j] = self.eligible[items[row][items[row] >= 0]].tolist()
        for j, u in enumerate(users):
            if not self.known_user[u]:
                out[j] = first_unseen(self.popular, seen[j], k)
        return out


def first_unseen(order: I64, seen: set[int], k: int) -> list[int]:
    """The first ``k`` entries of ``order`` that are not in ``seen``."""
    out: list[int] = []
    for v in order:
        iv = int(v)
        if iv not in seen:
            out.append(iv)
            if len(out) >= k:
                break
    return out


def static_factor_model(model: Model, table: EventTable) -> FactorModel:
    """The bootstrap model, re-indexed by the event table's codes."""
    code_of_user = {u: i for i, u in enumerate(table.user_ids)}
    code_of_video = {v: i for i, v in enumerate(table.video_ids)}
    f = model.item_factors.shape[1]
    uf = np.zeros((table.n_users, f), dtype=np.float32)
    known = np.zeros(table.n_users, dtype=bool)
    for row, uid in enumerate(model.users.ids):
        c = code_of_user.get(uid)
        if c is not None:
            uf[c] = model.user_factors[row]
            known[c] = True
    item_f = np.zeros((table.n_videos, f), dtype=np.float32)
    rows, codes = [], []
    for row, vid in enumerate(model.items.ids):
        c = code_of_video.get(vid)
        if c is not None:
            rows.append(row)
            codes.append(c)
    item_f[codes] = model.item_factors[rows]
    eligible = np.array(codes, dtype=np.int64)
    pop = model.videos.popularity[rows]
    popular = eligible[np.argsort(-pop, kind="stable")]
    return FactorModel.build(uf, known, item_f, eligible, popular, table.n_videos)


@dataclass
class Retrained:
    """A full retrain: as a refold :class:`Model` (for fold-in) and as a :class:`FactorModel`."""

    model: Model
    factors: FactorModel


def fit_factor_model(
    table: EventTable,
    end: int,
    values: F32,
    base: Model,
    *,
    seed: int,
    threads: int,
) -> Retrained:
    """Full ALS retrain on events ``[0, end)`` with the bootstrap model's hyper-parameters.

    The rows are the worker's: every event's value (:meth:`EventTable.values`)
    summed per (user, video). Videos keep the bootstrap model's metadata where it
    has them (for content priors), and the popularity of the retrained data.
    """
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from worker.core.ids import IdMap
    from worker.core.model import VideoMeta

    mat = sp.coo_matrix(
        (values[:end], (table.user[:end], table.video[:end])),
        shape=(table.n_users, table.n_videos),
        dtype=np.float32,
    ).tocsr()  # duplicates are summed, as the worker sums a user's events per video
    mat.eliminate_zeros()
    users = np.flatnonzero(mat.getnnz(axis=1) > 0)
    items = np.flatnonzero(mat.getnnz(axis=0) > 0).astype(np.int64)
    sub = mat[users][:, items].tocsr()
    p = base.params
    als = AlternatingLeastSquares(
        factors=p.factors,
        regularization=p.regularization,
        alpha=p.alpha,
        iterations=p.iterations,
        random_state=seed,
        num_threads=threads,
    )
    with threadpool_limits(1, "blas"):  # implicit parallelises itself; BLAS threads fight it
        als.fit(sub, show_progress=False)
    user_f = np.asarray(als.user_factors, dtype=np.float32)
    item_f = np.asarray(als.item_factors, dtype=np.float32)
    positive = np.asarray((sub > 0).sum(axis=0)).ravel().astype(np.float32)
    category = np.full(len(items), -1, dtype=np.int32)
    author = np.full(len(items), -1, dtype=np.int32)
    for j, code in enumerate(items.tolist()):
        row = base.items.get(table.video_ids[code])
        if row is not None:
            category[j] = base.videos.category[row]
            author[j] = base.videos.author[row]
    model = Model(
        version=f"{base.version}+retrain@{end}",
        params=p,
        user_factors=user_f,
        item_factors=item_f,
        users=IdMap(table.user_ids[u] for u in users.tolist()),
        items=IdMap(table.video_ids[v] for v in items.tolist()),
        user_rows=sub,
        videos=VideoMeta(
            duration_s=table.duration_s[items].astype(np.float32),
            category=category,
            author=author,
            popularity=positive,
            categories=list(base.videos.categories),
            authors=list(base.videos.authors),
        ),
    )
    full_users = np.zeros((table.n_users, user_f.shape[1]), dtype=np.float32)
    full_users[users] = user_f
    full_items = np.zeros((table.n_videos, item_f.shape[1]), dtype=np.float32)
    full_items[items] = item_f
    known = np.zeros(table.n_users, dtype=bool)
    known[users] = True
    popular = items[np.argsort(-positive, kind="stable")]
    return Retrained(
        model=model,
        factors=FactorModel.build(full_users, known, full_items, items, popular, table.n_videos),
    )


# ---- the live worker -------------------------------------------------------------------------


@dataclass
class LiveList:
    """A list read from the recommendations topic, with when it arrived."""

    recs: Recommendations
    received_s: float  # wall clock (time.time()) when the replay's consumer got it
    kafka_ts_ms: int  # the record's Kafka timestamp (the worker's producer create time)


class LiveWorker:
    """A broker, fresh topics, ``refold worker`` subprocesses, a producer and a list collector.

    Use as a context manager. The broker is the embedded Tansu one unless
    ``bootstrap_servers`` names a running one; topics get a unique prefix, so a
    shared broker is fine. The workers run with the ordinary CLI, so this is the
    same code path as production (``durable=False`` skips the changelog for speed).

    ``workers`` processes join one consumer group on topics of ``partitions``
    partitions (default: one per worker). The harness sends nothing until the
    group is stable, every worker owning at least one partition (read from the
    workers' ``partitions [...] assigned/revoked`` log lines: the embedded broker
    answers DescribeGroups with no members), and then one probe user per
    partition, sent to that partition, so that every partition's owner has
    published a list. Lists are keyed by user and a user's partition belongs to
    one worker at a time, so the collector reads every partition of the
    recommendations topic and needs no notion of which worker wrote a list.
    """

    def __init__(
        self,
        *,
        model_dir: Path,
        probe_video: str,
        bootstrap_servers: str | None = None,
        log_path: Path | None = None,
        durable: bool = False,
        startup_timeout_s: float = 180.0,
        extra_env: dict[str, str] | None = None,
        workers: int = 1,
        partitions: int | None = None,
    ) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        self.partitions = workers if partitions is None else partitions
        if self.partitions < workers:
            raise ConfigError(
                f"{workers} workers need at least as many partitions, got {self.partitions}"
            )
        self.workers = workers
        self.model_dir = model_dir
        self.probe_video = probe_video
        self.given_servers = bootstrap_servers
        self.log_path = log_path
        self.durable = durable
        self.startup_timeout_s = startup_timeout_s
        self.extra_env = extra_env or {}
        prefix = f"refold-eval-{uuid.uuid4().hex[:8]}"
        self.topics = TopicSettings(
            ratings=f"{prefix}.ratings",
            recommendations=f"{prefix}.recommendations",
            videos=f"{prefix}.videos",
            dlq=f"{prefix}.ratings.dlq",
            changelog=f"{prefix}.changelog",
            control=f"{prefix}.models",
        )
        self.group = f"{prefix}-worker"
        self.lists: list[LiveList] = []
        self.list_of_event: dict[str, int] = {}  # event id -> index in self.lists
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._topic_ready = threading.Event()
        self._broker: Any = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._thread: threading.Thread | None = None
        self._collector_error: BaseException | None = None
        self._log_files: list[Any] = []
        self._log_dir: tempfile.TemporaryDirectory[str] | None = None
        self.log_paths: list[Path | None] = []
        #: Probe events sent at start-up (one per partition); lists reflect them too.
        self.probes = 0
        self.producer: Any = None
        self.bootstrap_servers = ""

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> LiveWorker:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        from worker.kafkaio import Publisher, ensure_topics, make_producer

        if self.given_servers:
            self.bootstrap_servers = self.given_servers
        else:
            from worker.brokers.tansu import TansuBroker

            self._broker = TansuBroker().start()
            self.bootstrap_servers = self._broker.bootstrap_servers
        kafka = KafkaSettings(bootstrap_servers=self.bootstrap_servers)
        t = self.topics
        # Created here with every worker's partition count, before any worker starts
        # (each worker would otherwise create them with its default of one partition).
        ensure_topics(
            kafka,
            {
                t.ratings: self.partitions,
                t.recommendations: self.partitions,
                t.changelog: self.partitions,
                t.dlq: 1,
                t.videos: 1,
                t.control: 1,
            },
            compacted={t.changelog, t.videos, t.control},
        )
        pkg_root = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            "REFOLD_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "REFOLD_MODEL": str(self.model_dir),
            "REFOLD_GROUP": self.group,
            "REFOLD_DURABLE": "true" if self.durable else "false",
            "PYTHONUNBUFFERED": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(
                [pkg_root, *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            **{f"REFOLD_TOPIC_{k.upper()}": v for k, v in t.model_dump().items()},
            **self.extra_env,
        }
        self.log_paths = self._worker_log_paths()
        for i, path in enumerate(self.log_paths):
            log_file = (
                open(path, "ab")  # noqa: SIM115 - closed in close()
                if path is not None
                else subprocess.DEVNULL
            )
            self._log_files.append(log_file)
            self._procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "worker", "worker"],
                    env={**env, "REFOLD_CLIENT_ID": f"{self.group}-{i}"},
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            )
        self._thread = threading.Thread(target=self._collect, name="replay-collector", daemon=True)
        self._thread.start()
        self._wait(self._topic_ready.is_set, self.startup_timeout_s, "the worker's topics")
        if self.workers > 1:
            self._wait(
                self._group_stable,
                self.startup_timeout_s,
                f"a stable group of {self.workers} workers",
            )
        self.producer = Publisher(make_producer(kafka))
        now = datetime.now(timezone.utc)
        probes = [
            RatingEvent(
                event_id=f"probe-{uuid.uuid4().hex}",
                user_id=PROBE_USER if p == 0 else f"{PROBE_USER}{p}",
                video_id=self.probe_video,
                action="view",
                watch_seconds=0.0,
                ts=now,
            )
            for p in range(self.partitions)
        ]
        for p, probe in enumerate(probes):
            self.producer.send(
                t.ratings, key=probe.user_id.encode("utf-8"), value=encode(probe), partition=p
            )
        self.flush()
        self.probes = len(probes)
        self._wait(
            lambda: all(p.event_id in self.list_of_event for p in probes),
            self.startup_timeout_s,
            "the workers' first lists (group join)",
        )

    def _worker_log_paths(self) -> list[Path | None]:
        """One log per worker: ``log_path`` itself for one worker, ``stem.i.suffix`` for more.

        Several workers always log (to a temporary directory without ``log_path``): the
        group's readiness is read from their logs.
        """
        if self.workers == 1:
            return [self.log_path]
        base = self.log_path
        if base is None:
            self._log_dir = tempfile.TemporaryDirectory(prefix="refold-eval-logs-")
            base = Path(self._log_dir.name) / "worker.log"
        return [base.with_name(f"{base.stem}.{i}{base.suffix}") for i in range(self.workers)]

    def owned_partitions(self) -> list[set[int]]:
        """The partitions each worker owns now, from its ``assigned``/``revoked`` log lines."""
        out: list[set[int]] = []
        for path in self.log_paths:
            owned: set[int] = set()
            text = path.read_text(errors="replace") if path is not None and path.exists() else ""
            for m in _ASSIGNMENT_LINE.finditer(text):
                parts = {int(x) for x in m.group(1).split(",") if x.strip()}
                owned = owned | parts if m.group(2) == "assigned" else owned - parts
            out.append(owned)
        return out

    def _group_stable(self) -> bool:
        """Every worker owns a partition, no partition twice, every partition once."""
        owned = self.owned_partitions()
        union: set[int] = set().union(*owned)
        return (
            all(owned)
            and sum(map(len, owned)) == len(union)
            and union == set(range(self.partitions))
        )

    def close(self) -> None:
        """Stop the worker (SIGTERM, a graceful exit), the collector, the producer, the broker."""
        if self.producer is not None:
            with contextlib.suppress(Exception):
                self.producer.close(timeout_s=_CLOSE_S)
            self.producer = None
        running = [p for p in self._procs if p.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)  # all at once: they stop in parallel
        for proc in running:
            try:
                proc.wait(timeout=_WORKER_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=_CLOSE_S)
        self._procs = []
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=_CLOSE_S)
            self._thread = None
        for log_file in self._log_files:
            if log_file is not subprocess.DEVNULL:
                log_file.close()
        self._log_files = []
        if self._log_dir is not None:
            self._log_dir.cleanup()
            self._log_dir = None
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    @property
    def worker_exit_code(self) -> int | None:
        """The exit code of the first worker that has exited, or None while all run."""
        for proc in self._procs:
            code = proc.poll()
            if code is not None:
                return code
        return None

    def log_tail(self, lines: int = 40) -> str:
        tails = []
        for i, path in enumerate(self.log_paths):
            if path is None or not path.exists():
                continue
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            tails.append(tail if len(self.log_paths) == 1 else f"-- worker {i} --\n{tail}")
        return "\n".join(tails)

    # ---- the collector -----------------------------------------------------------------------

    def _collect(self) -> None:
        from worker.kafkaio import open_topic_reader, poll_batch

        consumer = None
        try:
            # The worker creates the topic at start-up; the reader waits for its metadata.
            consumer = open_topic_reader(
                KafkaSettings(bootstrap_servers=self.bootstrap_servers),
                self.topics.recommendations,
                stop=self._stop.is_set,
                **{"fetch.wait.max.ms": 10},  # Tansu's fetch latency follows this (never 0)
            )
            if consumer is None:
                return
            self._topic_ready.set()
            while not self._stop.is_set():
                records = poll_batch(consumer, 10_000, _COLLECT_POLL_MS / 1000.0)
                now = time.time()
                for r in records:
                    try:
                        recs = decode_recommendations(r.value() or b"")
                    except DecodeError as exc:
                        log.warning("undecodable list at offset %s: %s", r.offset(), exc)
                        continue
                    with self.cond:
                        self.lists.append(LiveList(recs, now, int(r.timestamp()[1])))
                        for eid in recs.event_ids:
                            self.list_of_event[eid] = len(self.lists) - 1
                        self.cond.notify_all()
        except Exception as exc:  # reported by the waiting thread
            self._collector_error = exc
            with self.cond:
                self.cond.notify_all()
        finally:
            if consumer is not None:
                consumer.close()

    # ---- sending and waiting -----------------------------------------------------------------

    def send(self, event: RatingEvent) -> float:
        """Send one event keyed by its user; returns the wall-clock send time."""
        now = time.time()
        self.producer.send(
            self.topics.ratings, key=event.user_id.encode("utf-8"), value=encode(event)
        )
        return now

    def announce(self, video: VideoEvent) -> None:
        """Register a video on the ``videos`` topic."""
        self.producer.send(
            self.topics.videos, key=video.video_id.encode("utf-8"), value=encode(video)
        )

    def flush(self) -> None:
        """Wait until every sent record is acknowledged."""
        self.producer.confirm()

    def reflected(self) -> int:
        """How many distinct event ids the published lists reflect so far."""
        return len(self.list_of_event)

    def check(self) -> None:
        """Raise :class:`ReplayError` when the worker or the collector has died."""
        if self._collector_error is not None:
            raise ReplayError(f"the list collector failed: {self._collector_error}")
        code = self.worker_exit_code
        if code is not None:
            raise ReplayError(f"the worker exited with code {code}:\n{self.log_tail()}")

    def _wait(self, cond: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not cond():
                self.check()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ReplayError(f"timed out after {timeout_s:.0f}s waiting for {what}")
                self.cond.wait(timeout=min(left, 0.2))

    def wait_reflected(self, at_least: int, *, stall_s: float, what: str) -> None:
        """Wait until ``at_least`` events are reflected; fail after ``stall_s`` without progress."""
        last, since = -1, time.monotonic()
        with self.cond:
            while self.reflected() < at_least:
                self.check()
                now = self.reflected()
                if now != last:
                    last, since = now, time.monotonic()
                elif time.monotonic() - since > stall_s:
                    raise ReplayError(
                        f"no progress for {stall_s:.0f}s waiting for {what} "
                        f"({now} of {at_least} events reflected):\n{self.log_tail()}"
                    )
                self.cond.wait(timeout=0.2)

    def wait_for_events(self, event_ids: Sequence[str], *, timeout_s: float) -> list[LiveList]:
        """The list that reflects each of ``event_ids`` (waiting for all of them)."""
        self._wait(
            lambda: all(e in self.list_of_event for e in event_ids),
            timeout_s,
            f"lists for {len(event_ids)} events",
        )
        with self.cond:
            return [self.lists[self.list_of_event[e]] for e in event_ids]


def video_event(video_id: str, info: VideoInfo | None, first_ts_us: int) -> VideoEvent | None:
    """The announcement of a video new to the model, or None when its metadata is incomplete."""
    if info is None or not info.category or not info.author_id:
        return None
    if not (math.isfinite(info.duration_s) and 0 < info.duration_s <= MAX_WATCH_SECONDS):
        return None
    try:
        return VideoEvent(
            video_id=video_id,
            duration_seconds=info.duration_s,
            category=info.category,
            author_id=info.author_id,
            title=info.title[:_MAX_TITLE_CHARS],
            published_at=info.published_at or _dt(first_ts_us),
        )
    except ValueError:
        return None


def rating_event(
    table: EventTable, i: int, event_id: str, user_id: str | None = None
) -> RatingEvent:
    """Event ``i`` of the table as a validated wire event."""
    a = int(table.action[i])
    return RatingEvent(
        event_id=event_id,
        user_id=user_id or table.user_ids[int(table.user[i])],
        video_id=table.video_ids[int(table.video[i])],
        action=ACTIONS[a],  # type: ignore[arg-type]
        watch_seconds=float(table.watch[i]) if a == VIEW else None,
        ts=_dt(int(table.ts[i])),
    )


# ---- request points --------------------------------------------------------------------------


@dataclass
class Request:
    """A list-request point: user ``user`` after replay event ``idx`` (relative to the split)."""

    user: int
    idx: int
    live: list[str] | None = None  # the live worker's list, when replayed through Kafka
    strategy: str | None = None
    latency_ms: float | None = None
    publish_latency_ms: float | None = None
    # The last replay event of the worker batch that published the live list: the
    # in-process check answers at the same batch ends (see run_in_process).
    batch_end: int | None = None


@dataclass
class LiveResult:
    """What the live replay produced."""

    requests: list[Request]
    event_latency_ms: F64  # per replayed event: send -> a list reflecting it was received
    event_publish_ms: F64  # per replayed event: send -> that list's Kafka timestamp
    sent: int
    skipped: int
    announced: int
    wall_s: float
    worker_startup_s: float
    events_per_s: float


def _event_id(i: int) -> str:
    return f"r{i}"


def _replay_index(event_id: str) -> int | None:
    """The replay index of one of :func:`_event_id`'s ids; None for other ids (the probe)."""
    return int(event_id[1:]) if event_id.startswith("r") else None


def live_batch_ends(
    lists: Iterable[Recommendations], index: Callable[[str], int | None]
) -> dict[object, int]:
    """The last sent event of each live worker batch, keyed by the batch's ``generated_at``.

    The lists of one worker batch share their ``generated_at``; the batch ends at the
    last event any of them reflects. ``index`` gives an event id's position in send
    order, or None for ids that were not sent (the worker's start-up probe).
    """
    ends: dict[object, int] = {}
    for recs in lists:
        idxs = [i for i in map(index, recs.event_ids) if i is not None]
        if idxs:
            ends[recs.generated_at] = max(ends.get(recs.generated_at, -1), *idxs)
    return ends


def replay_live(
    table: EventTable,
    split: int,
    end: int,
    *,
    model_dir: Path,
    model: Model,
    bootstrap_servers: str | None,
    max_in_flight: int,
    rate: float,
    log_path: Path | None,
    durable: bool,
    stall_s: float,
    progress: bool,
    workers: int = 1,
    partitions: int | None = None,
) -> LiveResult:
    """Send events ``[split, end)`` to live workers; collect one request per published list.

    ``workers`` processes share one consumer group (see :class:`LiveWorker`).
    """
    n = end - split
    send_s = np.full(n, np.nan)
    announced: set[str] = set()
    skipped = 0
    t_start = time.monotonic()
    with LiveWorker(
        model_dir=model_dir,
        probe_video=model.items.id_of(0),
        bootstrap_servers=bootstrap_servers,
        log_path=log_path,
        durable=durable,
        workers=workers,
        partitions=partitions,
    ) as live:
        started = time.monotonic()
        worker_startup_s = started - t_start
        sent = 0
        bar = tqdm(total=n, desc="replay (kafka)", unit="ev", disable=not progress)
        for j in range(n):
            i = split + j
            vid = table.video_ids[int(table.video[i])]
            if vid not in model.items and vid not in announced:
                announced.add(vid)
                ev = video_event(vid, table.videos.get(vid), int(table.ts[i]))
                if ev is not None:
                    live.announce(ev)
            try:
                event = rating_event(table, i, _event_id(j))
            except ValueError:
                skipped += 1  # an id the wire rejects (too long, control characters)
                continue
            if sent + live.probes - live.reflected() >= max_in_flight:  # events in flight
                live.wait_reflected(
                    sent + live.probes + 1 - max_in_flight, stall_s=stall_s, what="the worker"
                )
            if rate > 0:
                lag = started + sent / rate - time.monotonic()
                if lag > 0:
                    time.sleep(lag)  # pacing to --rate events per second
            send_s[j] = live.send(event)
            sent += 1
            bar.update(1)
        live.flush()
        live.wait_reflected(sent + live.probes, stall_s=stall_s, what="the last lists")
        bar.close()
        wall = time.monotonic() - started
        lists = list(live.lists)
    lat = np.full(n, np.nan)
    pub = np.full(n, np.nan)
    requests: list[Request] = []
    batch_end = live_batch_ends((lst.recs for lst in lists), _replay_index)
    for lst in lists:
        idxs = [j for j in map(_replay_index, lst.recs.event_ids) if j is not None]
        if not idxs:
            continue  # the probe's list
        for j in idxs:
            lat[j] = (lst.received_s - send_s[j]) * 1000.0
            pub[j] = lst.kafka_ts_ms - send_s[j] * 1000.0
        last = max(idxs)
        user = int(table.user[split + last])
        if table.user_ids[user] != lst.recs.user_id:
            raise ReplayError(f"list for {lst.recs.user_id} reflects an event of another user")
        requests.append(
            Request(
                user=user,
                idx=last,
                live=[it.video_id for it in lst.recs.items],
                strategy=lst.recs.strategy,
                latency_ms=float(lat[last]),
                publish_latency_ms=float(pub[last]),
                batch_end=batch_end[lst.recs.generated_at],
            )
        )
    requests.sort(key=lambda r: r.idx)
    return LiveResult(
        requests=requests,
        event_latency_ms=lat[np.isfinite(lat)],
        event_publish_ms=pub[np.isfinite(pub)],
        sent=sent,
        skipped=skipped,
        announced=len(announced),
        wall_s=wall,
        worker_startup_s=worker_startup_s,
        events_per_s=sent / wall if wall > 0 else 0.0,
    )


def batched_requests(table: EventTable, split: int, end: int, batch: int) -> list[Request]:
    """Request points as a worker polling ``batch`` events at a time would publish them."""
    out: list[Request] = []
    for lo in range(0, end - split, batch):
        hi = min(end - split, lo + batch)
        last: dict[int, int] = {}
        for j in range(lo, hi):
            last[int(table.user[split + j])] = j
        out += [Request(user=u, idx=j) for u, j in last.items()]
    out.sort(key=lambda r: r.idx)
    return out


# ---- in-process variants ---------------------------------------------------------------------


@dataclass
class InProcessOptions:
    """Knobs of the in-process variants."""

    k: int = TOP_K
    retrain_every: int = 0  # events between retrains; 0: never (retrain == static)
    half_life_us: float = 0.0
    positive_fraction: float = 0.5
    weights: Weights = field(default_factory=Weights)
    foldin: bool = True
    #: The in-process fold-in answers every n-th request only (1: all); it is a check.
    check_every: int = 1
    seed: int = 0
    threads: int = 0


def run_in_process(
    table: EventTable,
    split: int,
    end: int,
    model: Model,
    requests: Sequence[Request],
    opts: InProcessOptions,
    *,
    progress: bool,
) -> tuple[dict[str, list[list[int]]], dict[str, Any]]:
    """Answer every request with every in-process variant, replaying the events once.

    Popularity answers at once. The model variants collect pending requests and
    answer them in one batch; a batch is answered before any event that could
    change a pending answer: an event of a pending user, an event on a video
    new to the model (its factors are refit from its interactions), or a retrain.

    When the requests carry the live worker's batches (``batch_end``), the core
    engine's check mirrors them instead: at the end of each live batch it lists
    every user of that batch, as the worker did. Videos without training
    interactions are refit from the interactions seen so far whenever a list
    is made for a user who touched them, and those refits change the item
    gramian every fold-in uses, so only the same batch ends give the same lists.
    """
    k = opts.k
    n = end - split
    values = table.values(opts.weights)
    positive = table.positives(opts.positive_fraction, opts.weights.default_duration_s)
    seen: dict[int, set[int]] = {}  # only users who appear in the replay need one
    history = np.flatnonzero(np.isin(table.user[:split], np.unique(table.user[split:end])))
    for u, v in zip(table.user[history].tolist(), table.video[history].tolist(), strict=True):
        seen.setdefault(u, set()).add(v)
    pop = Popularity(table.n_videos, t0_us=int(table.ts[split]), half_life_us=opts.half_life_us)
    pre = np.flatnonzero(positive[:split])
    pop.add_many(table.video[pre], table.ts[pre])
    pop.refresh()
    refresh_every = max(1, n // _POPULARITY_REFRESHES)
    every = opts.retrain_every
    retrain_at = set(range(every, n, every)) if every > 0 else set()
    factor_models: dict[str, FactorModel] = {STATIC: static_factor_model(model, table)}
    factor_models[RETRAIN_NOFOLDIN] = factor_models[STATIC]
    engines: dict[str, Recommender] = {RETRAIN: Recommender(model, weights=opts.weights)}
    if opts.foldin:
        engines[FOLDIN_INPROCESS] = Recommender(model, weights=opts.weights)
    registered: dict[str, set[str]] = {name: set() for name in engines}
    names = [POPULARITY, *factor_models, *engines]
    answers: dict[str, list[list[int]]] = {name: [[] for _ in requests] for name in names}
    pending: dict[int, int] = {}  # user code -> request index
    # The live worker's batches, for the core engine's check: batch end -> requests.
    mirrored: dict[int, list[int]] = {}
    if FOLDIN_INPROCESS in engines and any(r.batch_end is not None for r in requests):
        for q, r in enumerate(requests):
            mirrored.setdefault(r.idx if r.batch_end is None else r.batch_end, []).append(q)
    timings = {"retrain_s": 0.0, "retrains": 0, "foldin_s": 0.0, "factor_s": 0.0}

    def flush() -> None:
        if not pending:
            return
        users = list(pending)
        seen_sets = [seen.get(u, set()) for u in users]
        t0 = time.monotonic()
        for name, fm in factor_models.items():
            for u_list, r in zip(fm.recommend(users, seen_sets, k), pending.values(), strict=True):
                answers[name][r] = u_list
        timings["factor_s"] += time.monotonic() - t0
        t0 = time.monotonic()
        for name, engine in engines.items():
            if name == FOLDIN_INPROCESS and mirrored:
                continue  # answered at the live batch ends
            picked = [
                (u, r)
                for u, r in pending.items()
                if name != FOLDIN_INPROCESS or r % opts.check_every == 0
            ]
            ids = [table.user_ids[u] for u, _ in picked]
            for ul, (_, r) in zip(engine.recommend(ids), picked, strict=True):
                answers[name][r] = [table.code_of(v) for v in ul.video_ids]
        timings["foldin_s"] += time.monotonic() - t0
        pending.clear()

    req_i = 0
    bar = tqdm(total=n, desc="baselines (in-process)", unit="ev", disable=not progress)
    for j in range(n):
        i = split + j
        u, v = int(table.user[i]), int(table.video[i])
        vid = table.video_ids[v]
        if j in retrain_at:
            flush()
            t0 = time.monotonic()
            retrained = fit_factor_model(
                table, i, values, model, seed=opts.seed, threads=opts.threads
            )
            factor_models[RETRAIN_NOFOLDIN] = retrained.factors
            engines[RETRAIN].swap_model(retrained.model)
            timings["retrain_s"] += time.monotonic() - t0
            timings["retrains"] += 1
        new_to = [name for name, e in engines.items() if _is_new(e, vid)]
        if u in pending or (new_to and pending):
            flush()  # refits of a new video's factors would change pending answers
        seen.setdefault(u, set()).add(v)
        if positive[i]:
            pop.add(v, int(table.ts[i]))
        if j % refresh_every == 0:
            pop.refresh()
        a = int(table.action[i])
        event = RatingEvent.model_construct(  # validated when the table was loaded
            event_id=_event_id(j),
            user_id=table.user_ids[u],
            video_id=vid,
            action=ACTIONS[a],
            watch_seconds=float(table.watch[i]) if a == VIEW else None,
            ts=_dt(int(table.ts[i])),
        )
        for name, engine in engines.items():
            if name in new_to and vid not in registered[name]:
                registered[name].add(vid)
                ev = video_event(vid, table.videos.get(vid), int(table.ts[i]))
                if ev is not None:
                    engine.register_video(ev)
            engine.apply(event)
        if j in mirrored:
            t0 = time.monotonic()
            qs = mirrored[j]
            engine = engines[FOLDIN_INPROCESS]
            for ul, q in zip(
                engine.recommend([table.user_ids[requests[q].user] for q in qs]), qs, strict=True
            ):
                if q % opts.check_every == 0:
                    answers[FOLDIN_INPROCESS][q] = [table.code_of(v) for v in ul.video_ids]
            timings["foldin_s"] += time.monotonic() - t0
        while req_i < len(requests) and requests[req_i].idx == j:
            r = requests[req_i]
            answers[POPULARITY][req_i] = pop.top(seen.get(r.user, set()), k)
            pending[r.user] = req_i
            req_i += 1
        if len(pending) >= _FLUSH_USERS:
            flush()
        bar.update(1)
    flush()
    bar.close()
    return answers, timings


def _is_new(engine: Recommender, video_id: str) -> bool:
    """True when ``video_id`` is unknown to the engine's model (so its factors are refit)."""
    idx = engine.catalog.items.get(video_id)
    return idx is None or idx in engine.catalog.new


# ---- scoring ---------------------------------------------------------------------------------


@dataclass
class Scored:
    """Per-request scores of one variant (NaN where the request is not scored)."""

    scores: dict[str, F64]
    lists: list[list[int]]


def score_variants(
    table: EventTable,
    split: int,
    requests: Sequence[Request],
    lists: dict[str, list[list[int]]],
    relevance: Relevance,
    k: int,
) -> tuple[dict[str, Scored], npt.NDArray[np.bool_]]:
    """Score every variant's list at every request; returns scores and the scored mask."""
    rel_sets = [relevance.relevant(r.user, r.idx, int(table.ts[split + r.idx])) for r in requests]
    mask = np.array([bool(s) for s in rel_sets], dtype=bool)
    out: dict[str, Scored] = {}
    for name, per_request in lists.items():
        cols = {m: np.full(len(requests), np.nan) for m in METRIC_KEYS}
        for q, (lst, rel) in enumerate(zip(per_request, rel_sets, strict=True)):
            if not rel:
                continue
            s = score_list(lst, rel, k)
            for m in METRIC_KEYS:
                cols[m][q] = getattr(s, _SCORE_FIELD[m])
        out[name] = Scored(scores=cols, lists=per_request)
    return out, mask


def summarise(
    scored: dict[str, Scored],
    mask: npt.NDArray[np.bool_],
    catalog_size: int,
    k: int,
    select: npt.NDArray[np.bool_] | None = None,
) -> dict[str, dict[str, Any]]:
    """Mean of each metric over scored requests (optionally a subset), plus coverage."""
    sel = mask if select is None else mask & select
    out: dict[str, dict[str, Any]] = {}
    for name, s in scored.items():
        row: dict[str, Any] = {
            m: float(np.mean(s.scores[m][sel])) if sel.any() else None for m in METRIC_KEYS
        }
        picked = [s.lists[q] for q in np.flatnonzero(sel)]
        row["coverage"] = coverage(picked, catalog_size, k)
        row["lists_scored"] = int(sel.sum())
        out[name] = row
    return out


def time_series(
    table: EventTable,
    split: int,
    requests: Sequence[Request],
    scored: dict[str, Scored],
    mask: npt.NDArray[np.bool_],
    bins: int = TIME_BINS,
) -> dict[str, Any]:
    """Each metric per variant over replay time, in bins of equally many scored lists."""
    q = np.flatnonzero(mask)
    if q.size == 0:
        return {"time": [], "lists": [], "variants": {}}
    ts = table.ts[split + np.array([requests[int(i)].idx for i in q], dtype=np.int64)]
    groups = [g for g in np.array_split(np.arange(q.size), min(bins, q.size)) if g.size]
    out: dict[str, Any] = {
        "time": [iso_time(int(np.median(ts[g]))) for g in groups],
        "lists": [int(g.size) for g in groups],
        "variants": {},
    }
    for name, s in scored.items():
        out["variants"][name] = {
            m: [float(np.mean(s.scores[m][q[g]])) for g in groups] for m in METRIC_KEYS
        }
    return out


# ---- the whole run ---------------------------------------------------------------------------


@dataclass
class ReplayOptions:
    """Everything ``refold replay`` takes (see the CLI help for each)."""

    logs: list[str]
    videos: str
    out: Path
    reactions: str | None = None
    split_at: str | None = None
    split_frac: float | None = None
    model: Path | None = None
    bootstrap_servers: str | None = None
    live: bool = True
    max_events: int = 0
    horizon_events: int = 20  # a user's next 20 new videos: about a session or two
    horizon_seconds: float | None = None
    positive_fraction: float = 0.5
    retrain_every: float = 0.1
    popularity_half_life: float | None = None
    max_in_flight: int = 50
    rate: float = 0.0
    batch: int = 200
    foldin_inprocess: bool = True
    check_every: int = 10
    durable: bool = False
    workers: int = 1  # worker processes in one consumer group
    partitions: int | None = None  # of the replay's topics; None: one per worker
    stall_s: float = 120.0
    duration_unit: str = "auto"
    factors: int | None = None
    iterations: int | None = None
    regularization: float | None = None
    alpha: float | None = None
    threads: int = 0
    seed: int = 0
    progress: bool = True
    keep_model: bool = False
    simulation: Any = None  # SimulateOptions: also run the feedback-loop simulation
    command: str = ""
    columns: Any = None  # worker.data.ingest.ColumnMapping, for layouts bootstrap cannot detect
    train_options: dict[str, Any] = field(default_factory=dict)


def train_split_model(table: EventTable, split: int, work: Path, opts: ReplayOptions) -> Model:
    """Bootstrap a model on the events before the split, as ``refold bootstrap`` would.

    :func:`worker.train.bootstrap` reads the original files and keeps the rows
    strictly before the split time (``until``). When the logs' time column is
    not a timestamp, bootstrap cannot filter it, so the events before the split
    are written to seed-layout Parquet files in ``work`` and trained on instead.
    """
    from worker.data.layout import ColumnMapping
    from worker.train import bootstrap

    kw: dict[str, Any] = dict(opts.train_options)
    for name in ("factors", "iterations", "regularization", "alpha"):
        value = getattr(opts, name)
        if value is not None:
            kw[name] = value
    common: dict[str, Any] = {
        "duration_unit": opts.duration_unit,
        "progress": opts.progress,
        "threads": opts.threads,
        **kw,
    }
    model_dir = work / "model"
    try:
        return bootstrap(
            opts.logs,
            opts.videos,
            model_dir,
            reactions=opts.reactions,
            mapping=opts.columns,
            until=_dt(int(table.ts[split])),
            **common,
        )
    except DataError as exc:
        if "expected a timestamp" not in str(exc):
            raise
        log.info("bootstrap cannot filter by time (%s); training on a copy", exc)
    logs_path, react_path = write_training_files(table, split, work / "train")
    video_only = None
    if opts.columns is not None:
        fields = {k: v for k, v in opts.columns.model_dump().items() if k.startswith("video_")}
        video_only = ColumnMapping(**fields)  # the copy is in the seed layout
    return bootstrap(
        logs_path, opts.videos, model_dir, reactions=react_path, mapping=video_only, **common
    )


def command_line() -> str:
    """The running command, quoted so that it can be pasted into a shell."""
    if not sys.argv:
        return ""
    prog = Path(sys.argv[0]).name
    if prog in ("__main__.py", "-m", "-c", "cli.py"):
        prog = "refold"  # python -m worker ... is the refold command
    return shlex.join([prog, *sys.argv[1:]])


@dataclass
class Prepared:
    """Data, split and model, ready to replay or simulate."""

    table: EventTable
    split: int
    end: int
    model: Model
    model_dir: Path
    trained: bool
    half_life_us: float
    weights: Weights
    timings: dict[str, float]


def prepare(opts: ReplayOptions, work: Path) -> Prepared:
    """Load the events, split them, and train (or load) the bootstrap model in ``work``."""
    from worker.storage import load_model

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    table = load_events(
        opts.logs,
        opts.videos,
        opts.reactions,
        duration_unit=opts.duration_unit,
        mapping=opts.columns,
    )
    timings["load_s"] = time.monotonic() - t0
    split = split_index(table.ts, split_at=opts.split_at, split_frac=opts.split_frac)
    end = len(table) if opts.max_events <= 0 else min(len(table), split + opts.max_events)
    t0 = time.monotonic()
    if opts.model is not None:
        model_dir = opts.model
        model = load_model(model_dir)
        trained = False
    else:
        model = train_split_model(table, split, work, opts)
        model_dir = work / "model"
        trained = True
    timings["bootstrap_s"] = time.monotonic() - t0
    # The model's durations are what the worker scores views with.
    code_of_video = {v: i for i, v in enumerate(table.video_ids)}
    for row, vid in enumerate(model.items.ids):
        c = code_of_video.get(vid)
        d = float(model.videos.duration_s[row])
        if c is not None and math.isfinite(d) and d > 0:
            table.duration_s[c] = d
    span_us = int(table.ts[end - 1] - table.ts[split])
    half_life_us = (
        opts.popularity_half_life * _US
        if opts.popularity_half_life
        else max(3600 * _US, span_us / 10)  # a tenth of the replay, at least an hour
    )
    return Prepared(
        table=table,
        split=split,
        end=end,
        model=model,
        model_dir=model_dir,
        trained=trained,
        half_life_us=float(half_life_us),
        weights=Weights(),
        timings=timings,
    )


def keep_model(prep: Prepared, out: Path) -> str:
    """Copy a model trained in the work directory to ``out/model``; returns its path."""
    import shutil

    if not prep.trained:
        return str(prep.model_dir)
    keep = out / "model"
    if keep.exists():
        shutil.rmtree(keep)
    shutil.copytree(prep.model_dir, keep)
    return str(keep)


def run_replay(opts: ReplayOptions) -> dict[str, Any]:
    """The whole replay: load, split, train, replay live, baselines, score, report."""
    from worker.eval.report import write_replay_report

    t_begin = time.monotonic()
    opts.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=opts.out, prefix=".work-") as tmp:
        prep = prepare(opts, Path(tmp))
        report, samples = _replay(opts, prep)
        if opts.keep_model:
            report["model"]["path"] = keep_model(prep, opts.out)
    report["timings_s"]["total_s"] = time.monotonic() - t_begin
    write_replay_report(report, opts.out, latency_samples_ms=samples)
    return report


def _replay(opts: ReplayOptions, prep: Prepared) -> tuple[dict[str, Any], F64 | None]:
    table, split, end, model, model_dir = (
        prep.table,
        prep.split,
        prep.end,
        prep.model,
        prep.model_dir,
    )
    n = end - split
    weights = prep.weights
    half_life_us = prep.half_life_us
    timings = dict(prep.timings)
    trained = prep.trained
    if 0 < opts.retrain_every < 1:
        retrain_every = math.ceil(n * opts.retrain_every)  # a fraction of the replay
    else:
        retrain_every = int(opts.retrain_every)
    live: LiveResult | None = None
    if opts.live:
        t0 = time.monotonic()
        live = replay_live(
            table,
            split,
            end,
            model_dir=model_dir,
            model=model,
            bootstrap_servers=opts.bootstrap_servers,
            max_in_flight=opts.max_in_flight,
            rate=opts.rate,
            log_path=opts.out / "worker.log",
            durable=opts.durable,
            stall_s=opts.stall_s,
            progress=opts.progress,
            workers=opts.workers,
            partitions=opts.partitions,
        )
        timings["live_replay_s"] = time.monotonic() - t0
        requests = live.requests
    else:
        requests = batched_requests(table, split, end, opts.batch)
    t0 = time.monotonic()
    lists, inproc_timings = run_in_process(
        table,
        split,
        end,
        model,
        requests,
        InProcessOptions(
            k=TOP_K,
            retrain_every=retrain_every,
            half_life_us=half_life_us,
            positive_fraction=opts.positive_fraction,
            weights=weights,
            foldin=opts.foldin_inprocess or not opts.live,
            check_every=max(1, opts.check_every) if opts.live else 1,
            seed=opts.seed,
            threads=opts.threads,
        ),
        progress=opts.progress,
    )
    timings["baselines_s"] = time.monotonic() - t0
    timings.update({k: float(v) for k, v in inproc_timings.items()})
    checked: list[list[int]] | None = None
    if live is not None:
        lists[FOLDIN] = [[table.code_of(v) for v in (r.live or [])] for r in requests]
        checked = lists.pop(FOLDIN_INPROCESS, None)
    else:
        lists[FOLDIN] = lists.pop(FOLDIN_INPROCESS)  # without Kafka, the core is the fold-in
    relevance = Relevance.build(
        table,
        split,
        end,
        positive_fraction=opts.positive_fraction,
        default_duration_s=weights.default_duration_s,
        horizon_events=opts.horizon_events,
        horizon_seconds=opts.horizon_seconds,
    )
    scored, mask = score_variants(table, split, requests, lists, relevance, TOP_K)
    known = np.array([u in model.users for u in table.user_ids], dtype=bool)
    replay_users = table.user[split:end]
    replay_videos = {table.video_ids[int(v)] for v in np.unique(table.video[split:end])}
    catalog = set(model.items.ids) | replay_videos
    is_known = np.array([known[r.user] for r in requests], dtype=bool)
    order = [x for x in VARIANTS if x in scored]
    scored = {name: scored[name] for name in order}
    variants = summarise(scored, mask, len(catalog), TOP_K)
    users_of = np.array([r.user for r in requests], dtype=np.int64)[mask]
    for name, row in variants.items():
        row["description"] = VARIANT_DESCRIPTIONS[name]
        row["lists_total"] = len(requests)
        if mask.any():
            ndcg = scored[name].scores["ndcg_at_10"][mask]
            row["ndcg_at_10_ci95"] = list(cluster_bootstrap(ndcg, users_of, seed=opts.seed))
    report: dict[str, Any] = {
        "kind": "replay",
        "command": opts.command or command_line(),
        "created_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        "data": {
            **table.summary,
            "split_index": split,
            "split_time": iso_time(int(table.ts[split])),
            "train_events": split,
            "replay_events": n,
            "replay_events_available": len(table) - split,
            "replay_first_event": iso_time(int(table.ts[split])),
            "replay_last_event": iso_time(int(table.ts[end - 1])),
            "replay_users": int(np.unique(table.user[split:end]).size),
            "replay_users_known_to_model": int(np.unique(replay_users[known[replay_users]]).size),
            "replay_videos_new_to_model": len(replay_videos - set(model.items.ids)),
            "catalog_size": len(catalog),
        },
        "model": {
            "version": model.version,
            "trained_here": trained,
            "path": None if trained else str(model_dir),
            "users": model.n_users,
            "videos": model.n_items,
            "factors": model.params.factors,
            "regularization": model.params.regularization,
            "alpha": model.params.alpha,
            "iterations": model.params.iterations,
        },
        "settings": {
            "k": TOP_K,
            "horizon_events": opts.horizon_events,
            "horizon_seconds": opts.horizon_seconds,
            "positive_fraction": opts.positive_fraction,
            "retrain_every_events": retrain_every,
            "popularity_half_life_s": half_life_us / _US,
            "live": opts.live,
            "max_in_flight": opts.max_in_flight,
            "rate": opts.rate,
            "durable": opts.durable,
            "workers": opts.workers,
            "partitions": opts.partitions or opts.workers,
            "seed": opts.seed,
            "weights": {
                "view": weights.view,
                "like": weights.like,
                "neutral": weights.neutral,
                "dislike": weights.dislike,
                "watch_cap": weights.watch_cap,
            },
        },
        "variants": variants,
        "segments": {
            "known_users": summarise(scored, mask, len(catalog), TOP_K, is_known),
            "new_users": summarise(scored, mask, len(catalog), TOP_K, ~is_known),
        },
        "lists": {
            "total": len(requests),
            "scored": int(mask.sum()),
            "unscored_no_relevant": int((~mask).sum()),
        },
        "timeseries": time_series(table, split, requests, scored, mask),
        "definitions": {
            **METRIC_DEFINITIONS,
            "relevant": (
                "For a list for user U that reflects U's events up to replay event i: "
                f"among the next {opts.horizon_events} distinct videos U interacts with "
                "after i"
                + (
                    f" (and within {opts.horizon_seconds:g} s of event i)"
                    if opts.horizon_seconds
                    else ""
                )
                + " that U had not interacted with before, those U liked: the last "
                "reaction is a like, or, with no reaction, the best view covered at least "
                f"{opts.positive_fraction:g} of the video. Lists with no relevant video "
                "are not scored. Metrics are means over scored lists."
            ),
            "latency_ms": (
                "Per replayed event: from the replay handing the event to the Kafka "
                "producer to the replay's consumer receiving the first list that reflects "
                "it (end to end, through the broker, under the replay's load of at most "
                f"{opts.max_in_flight} events in flight)."
            ),
            "latency_publish_ms": (
                "Per replayed event: from the send to the Kafka timestamp of the list "
                "record (set by the worker's producer when it publishes the list)."
            ),
            "request_points": (
                "Every variant answers each live list's request point (user U after "
                "replay event i) with what it knew after event i; the in-process variants "
                "see exactly the events the worker had seen."
            ),
        },
    }
    v = report["variants"]
    if FOLDIN in v and RETRAIN in v and v[RETRAIN]["ndcg_at_10"]:
        report["foldin_vs_retrain"] = {
            "ndcg_fraction": v[FOLDIN]["ndcg_at_10"] / v[RETRAIN]["ndcg_at_10"],
            "ndcg_fraction_of_retrain_nofoldin": (
                v[FOLDIN]["ndcg_at_10"] / v[RETRAIN_NOFOLDIN]["ndcg_at_10"]
                if v.get(RETRAIN_NOFOLDIN, {}).get("ndcg_at_10")
                else None
            ),
            "definition": "NDCG@10 of live fold-in (on the bootstrap model) divided by NDCG@10 "
            "of the retrain oracle (periodic full retrain plus the same fold-in between "
            "retrains)",
        }
    if FOLDIN in v and mask.any():
        base = scored[FOLDIN].scores["ndcg_at_10"][mask]
        report["foldin_ndcg_difference"] = {
            name: {
                "difference": float(np.mean(base - scored[name].scores["ndcg_at_10"][mask])),
                "ci95": list(
                    cluster_bootstrap(
                        base - scored[name].scores["ndcg_at_10"][mask], users_of, seed=opts.seed
                    )
                ),
            }
            for name in (POPULARITY, STATIC, RETRAIN_NOFOLDIN, RETRAIN)
            if name in scored
        }
        report["foldin_ndcg_difference"]["definition"] = (
            "mean over scored lists of fold-in's NDCG@10 minus the baseline's at the same "
            "request point, with a 95% interval from a bootstrap that resamples users (a "
            "user's lists are not independent); an interval above 0 means fold-in is better"
        )
    if FOLDIN in v:
        report["foldin_vs_baselines"] = {
            name: (
                v[FOLDIN]["ndcg_at_10"] / v[name]["ndcg_at_10"] if v[name]["ndcg_at_10"] else None
            )
            for name in (POPULARITY, STATIC, RETRAIN_NOFOLDIN, RETRAIN)
            if name in v
        }
    if live is not None:
        lat = live.event_latency_ms
        report["latency_ms"] = {
            **percentiles(lat),
            "mean": float(np.mean(lat)) if lat.size else None,
            "max": float(np.max(lat)) if lat.size else None,
            "events": int(lat.size),
        }
        report["latency_publish_ms"] = {
            **percentiles(live.event_publish_ms),
            "events": int(live.event_publish_ms.size),
        }
        strategies = [r.strategy for r in requests]
        report["live"] = {
            "events_sent": live.sent,
            "events_skipped_invalid": live.skipped,
            "videos_announced": live.announced,
            "lists": len(requests),
            "lists_popular": strategies.count("popular"),
            "wall_s": live.wall_s,
            "events_per_s": live.events_per_s,
            "worker_startup_s": live.worker_startup_s,
            "broker": opts.bootstrap_servers or "embedded Tansu",
            "workers": opts.workers,
        }
        cold = [q for q, r in enumerate(requests) if r.strategy == "popular"]
        if cold and POPULARITY in lists:
            same = [lists[FOLDIN][q] == lists[POPULARITY][q] for q in cold]
            common = [
                len(set(lists[FOLDIN][q]) & set(lists[POPULARITY][q]))
                / max(1, len(lists[FOLDIN][q]), len(lists[POPULARITY][q]))
                for q in cold
            ]
            report["cold_start"] = {
                "lists": len(cold),
                "identical_to_popularity": float(np.mean(same)),
                "overlap_at_10_with_popularity": float(np.mean(common)),
                "definition": "the live workers' cold-start lists (strategy popular) against "
                "the popularity variant's list at the same request point (time-decayed "
                "positive events up to that point, the user's seen videos filtered): the "
                "share of identical lists and the mean share of videos in common",
            }
        if checked is not None:
            every = max(1, opts.check_every)
            pairs = [(lists[FOLDIN][q], checked[q]) for q in range(0, len(requests), every)]
            agree = [len(set(a) & set(b)) / max(1, len(a), len(b)) for a, b in pairs]
            report["checks"] = {
                "foldin_live_vs_inprocess_overlap_at_10": (
                    float(np.mean(agree)) if agree else None
                ),
                "foldin_live_vs_inprocess_identical": (
                    float(np.mean([a == b for a, b in pairs])) if pairs else None
                ),
                "lists_checked": len(pairs),
                "definition": "the worker's core engine run in-process on the same events, at "
                f"every {every}th request point: the mean share of videos the live list and "
                "the in-process list have in common, and the share of identical lists "
                "(same videos, same order)",
            }
    if opts.simulation is not None:
        from worker.eval.simulate import run_simulation

        t0 = time.monotonic()
        report["simulation"] = run_simulation(prep, opts.simulation)
        timings["simulation_s"] = time.monotonic() - t0
    report["timings_s"] = timings
    return report, None if live is None else live.event_latency_ms
