"""The replay's event table: logs, reactions and video metadata loaded into one
time-ordered table, the time split, the Parquet files the bootstrap trains on, and the
wire events and request points built from it."""

from __future__ import annotations

import glob
import logging
import math
import re
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from worker.core.als import F32, I32, I64
from worker.core.scoring import Weights
from worker.core.wire import (
    MAX_WATCH_SECONDS,
    RatingEvent,
    VideoEvent,
)
from worker.data.layout import MS_DETECT_THRESHOLD
from worker.errors import ConfigError, DataError, RefoldError

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

    def positive_changes(
        self, positive_fraction: float, default_duration_s: float, lo: int = 0, hi: int = -1
    ) -> PositiveChanges:
        """Where (user, video) pairs become positive or stop being positive, over the events
        ``[lo, hi)`` (``hi`` -1: to the end), by :class:`worker.core.scoring.PairState`'s
        definition; :func:`positive_changes_reference` is the slow, obvious version."""
        hi = len(self) if hi < 0 else hi
        n = hi - lo
        key = self.user[lo:hi].astype(np.int64) * np.int64(max(1, self.n_videos))
        key += self.video[lo:hi]
        order = np.argsort(key, kind="stable")  # by pair, each pair's events in time order
        k = key[order]
        first = np.ones(n, dtype=bool)
        first[1:] = k[1:] != k[:-1]
        pair_start = np.flatnonzero(first)[np.cumsum(first) - 1]
        act = self.action[lo:hi][order]
        frac = np.nan_to_num(self.fractions(default_duration_s)[lo:hi][order], nan=0.0)
        pos = np.arange(n)
        last_reaction = np.maximum.accumulate(np.where(act != VIEW, pos, -1)) if n else pos
        has_reaction = last_reaction >= pair_start
        hits = np.cumsum((act == VIEW) & (frac >= positive_fraction))
        before = hits[pair_start] - ((act == VIEW) & (frac >= positive_fraction))[pair_start]
        positive = np.where(
            has_reaction, act[np.maximum(last_reaction, 0)] == LIKE, hits - before > 0
        )
        was = np.zeros(n, dtype=bool)
        was[1:] = positive[:-1]
        was &= ~first
        at = np.flatnonzero(positive != was)  # changes alternate +, -, + within a pair
        sign = np.where(positive[at], 1, -1).astype(np.int8)
        since = at.copy()
        since[sign < 0] = at[np.flatnonzero(sign < 0) - 1]  # the + change it undoes
        idx, since_idx = order[at] + lo, order[since] + lo
        by_time = np.argsort(idx, kind="stable")
        return PositiveChanges(
            idx=idx[by_time].astype(np.int64),
            sign=sign[by_time],
            since_ts=self.ts[since_idx[by_time]],
        )


@dataclass
class PositiveChanges:
    """Events where a (user, video) pair became positive (``sign`` +1) or stopped being
    positive (-1), in time order; ``since_ts`` is the time of the +1 change that a -1
    undoes (its own time for a +1), so a decayed count can take back exactly what it
    added."""

    idx: I64
    sign: npt.NDArray[np.int8]
    since_ts: I64


def positive_changes_reference(
    table: EventTable, weights: Weights, lo: int = 0, hi: int = -1
) -> list[tuple[int, int, int]]:
    """``(index, sign, since_ts)`` of every change, one event at a time through
    :meth:`Weights.pair_after` (the rule the engine applies)."""
    hi = len(table) if hi < 0 else hi
    states: dict[tuple[int, int], Any] = {}
    since: dict[tuple[int, int], int] = {}
    out: list[tuple[int, int, int]] = []
    for i in range(lo, hi):
        pair = (int(table.user[i]), int(table.video[i]))
        old = states.get(pair)
        a = ACTIONS[int(table.action[i])]
        duration = float(table.duration_s[pair[1]])
        watch = float(table.watch[i]) if a == "view" else None
        new = states[pair] = weights.pair_after(
            old, a, watch, duration if math.isfinite(duration) else None
        )
        if new.positive != (old is not None and old.positive):
            if new.positive:
                since[pair] = int(table.ts[i])
            out.append((i, 1 if new.positive else -1, since[pair]))
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
    reactions: str | Path | Sequence[str | Path] | None = None,
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
        files = expand_paths([reactions] if isinstance(reactions, (str, Path)) else list(reactions))
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


def _event_id(i: int) -> str:
    return f"r{i}"


def _replay_index(event_id: str) -> int | None:
    """The replay index of one of :func:`_event_id`'s ids; None for other ids (the probe)."""
    return int(event_id[1:]) if event_id.startswith("r") else None


def command_line() -> str:
    """The running command, quoted so that it can be pasted into a shell."""
    if not sys.argv:
        return ""
    prog = Path(sys.argv[0]).name
    if prog in ("__main__.py", "-m", "-c", "cli.py"):
        prog = "refold"  # python -m worker ... is the refold command
    return shlex.join([prog, *sys.argv[1:]])
