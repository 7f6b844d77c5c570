"""Per-batch row handling: each log or reaction batch validated (skip reasons counted),
its videos looked up and its values computed, in the reader thread; the user ids
are left for the stateful encoder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from worker.core.scoring import Weights
from worker.data.idcodes import ItemLookup, Numbers, UserEncoder, as_numbers, as_plain, valid_mask
from worker.data.layout import (
    LOG_REASONS,
    MAX_WATCH_DURATIONS,
    MAX_WATCH_S,
    REACTION_REASONS,
)

F32 = npt.NDArray[np.float32]
Bool = npt.NDArray[np.bool_]
I32 = npt.NDArray[np.int32]


def time_threshold(col_type: pa.DataType, until: datetime) -> int:
    """``until`` in the raw int64 units of a timestamp column (naive columns are UTC)."""
    if until.tzinfo is None:
        until = until.replace(tzinfo=timezone.utc)
    unit = col_type.unit
    scale = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[unit]
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    delta = until - epoch
    return (delta.days * 86_400 + delta.seconds) * scale + delta.microseconds * scale // 1_000_000


def before_mask(col: pa.Array, until: datetime | None) -> Bool | None:
    """Rows strictly before ``until`` (null times count as before), or None without a filter."""
    if until is None:
        return None
    raw = pc.fill_null(pc.cast(col, pa.int64()), np.iinfo(np.int64).min)
    return np.asarray(raw.to_numpy(zero_copy_only=False) < time_threshold(col.type, until))


def time_range(files: list[tuple[Path, pq.ParquetFile, str | None]]) -> dict[str, str] | None:
    """Min/max event time from the Parquet column statistics (no data read)."""
    lo: Any = None
    hi: Any = None
    for _, pf, col in files:
        if col is None:
            continue
        idx = pf.schema_arrow.get_field_index(col)
        md = pf.metadata
        for g in range(md.num_row_groups):
            stats = md.row_group(g).column(idx).statistics
            if stats is None or not stats.has_min_max:
                return None
            lo = stats.min if lo is None else min(lo, stats.min)
            hi = stats.max if hi is None else max(hi, stats.max)
    if lo is None or not isinstance(lo, datetime):
        return None
    return {"min": lo.isoformat(), "max": hi.isoformat()}


def times_us(col: pa.Array) -> npt.NDArray[np.int64]:
    """A timestamp column as int64 µs since the epoch (null: decay's UNKNOWN)."""
    from worker.core.decay import UNKNOWN

    raw = pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False)
    raw = np.asarray(raw, dtype=np.float64) if raw.dtype == object else raw
    nulls = np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False), dtype=bool)
    vals = np.where(nulls, 0, raw).astype(np.int64)
    unit = col.type.unit
    if unit == "s":
        vals = vals * 1_000_000
    elif unit == "ms":
        vals = vals * 1_000
    elif unit == "ns":
        vals = vals // 1_000
    return np.where(nulls, UNKNOWN, vals).astype(np.int64)


def count_reasons(reasons: Sequence[str], conds: Sequence[Bool | None], n: int) -> dict[str, int]:
    """Rows per reason, each row under the first of its reasons (``conds`` align with them)."""
    code = np.zeros(n, dtype=np.int8)
    for i in range(len(conds) - 1, -1, -1):  # the lowest index wins
        cond = conds[i]
        if cond is not None:
            code[cond] = i + 1
    counts = np.bincount(code, minlength=len(reasons) + 1)
    return {r: int(counts[i + 1]) for i, r in enumerate(reasons) if counts[i + 1]}


def add_counts(total: dict[str, int], part: dict[str, int]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v


@dataclass
class Rows:
    """One batch after the stateless work: its used rows, ready for the user encoder."""

    n_read: int
    users: pa.Array  # user ids of the used rows (no nulls)
    numbers: Numbers | None  # their numeric form, when every one has it
    items: I32
    values: F32
    skipped: dict[str, int]
    default_duration: int = 0
    times: npt.NDArray[np.int64] | None = None  # µs, with ``with_times`` only


def user_rows(arr: pa.Array, ok: Bool, try_numbers: bool) -> tuple[pa.Array, Numbers | None]:
    """The used rows' user ids, and their numeric form when cheap and possible."""
    if not ok.all():
        arr = arr.filter(pa.array(ok))
    numbers = as_numbers(arr) if try_numbers else None
    return arr, numbers


class LogPrep:
    """Stateless per-batch work on the logs; runs on the reader thread."""

    def __init__(
        self,
        lookup: ItemLookup,
        duration_s: F32,
        weights: Weights,
        until: datetime | None,
        encoder: UserEncoder,
        with_times: bool = False,
    ) -> None:
        self.with_times = with_times
        self.lookup = lookup
        self.duration = duration_s.astype(np.float64)
        self.weights = weights
        self.until = until
        self.encoder = encoder

    def __call__(self, batch: pa.RecordBatch) -> Rows:
        n = batch.num_rows
        user_col = as_plain(batch.column(0))
        vid_col = as_plain(batch.column(1))
        items = self.lookup.lookup(vid_col)
        watch = pc.cast(batch.column(2), pa.float64()).to_numpy(zero_copy_only=False)
        dur = np.where(items >= 0, self.duration[np.maximum(items, 0)], np.nan)
        before = before_mask(batch.column(3), self.until) if self.until is not None else None
        times = times_us(batch.column(3)) if self.with_times else None
        user_ok = valid_mask(user_col)
        with np.errstate(invalid="ignore"):
            # NaN watch times fail `watch > 0`; NaN durations pass the 10x check.
            too_long = watch > MAX_WATCH_DURATIONS * dur
            ok = user_ok & (items >= 0) & (watch > 0) & (watch <= MAX_WATCH_S) & ~too_long
            if before is not None:
                ok &= before
            skipped: dict[str, int] = {}
            if not ok.all():
                skipped = count_reasons(
                    LOG_REASONS,
                    [
                        ~user_ok,
                        ~valid_mask(vid_col),
                        items < 0,
                        np.isnan(watch),
                        watch < 0,
                        watch == 0,
                        watch > MAX_WATCH_S,
                        too_long,
                        None if before is None else ~before,
                    ],
                    n,
                )
                items, watch, dur = items[ok], watch[ok], dur[ok]
                times = times[ok] if times is not None else None
        known = np.isfinite(dur)
        default_duration = len(dur) - int(known.sum())
        if default_duration:
            dur = np.where(known, dur, self.weights.default_duration_s)
        users, numbers = user_rows(user_col, ok, self.encoder.mode == "numeric")
        return Rows(
            n_read=n,
            users=users,
            numbers=numbers,
            items=items,
            values=self.weights.view_values(watch, dur),
            skipped=skipped,
            default_duration=default_duration,
            times=times,
        )


class ReactionPrep:
    """Stateless per-batch work on the reactions; runs on the reader thread."""

    ACTIONS = ("like", "neutral", "dislike")

    def __init__(
        self,
        lookup: ItemLookup,
        weights: Weights,
        until: datetime | None,
        encoder: UserEncoder,
        with_times: bool = False,
    ) -> None:
        self.with_times = with_times
        self.lookup = lookup
        self.until = until
        self.encoder = encoder
        self.action_set = pa.array(self.ACTIONS)
        self.values = np.append(weights.reaction_values(list(self.ACTIONS)), np.float32(0.0))

    def __call__(self, batch: pa.RecordBatch) -> Rows:
        n = batch.num_rows
        user_col = as_plain(batch.column(0))
        vid_col = as_plain(batch.column(1))
        items = self.lookup.lookup(vid_col)
        act_col = as_plain(batch.column(2))
        if not pa.types.is_string(act_col.type):
            act_col = pc.cast(act_col, pa.string())
        found = pc.index_in(act_col, value_set=self.action_set)
        action = pc.fill_null(found, len(self.ACTIONS)).to_numpy(zero_copy_only=False)
        before = before_mask(batch.column(3), self.until) if self.until is not None else None
        times = times_us(batch.column(3)) if self.with_times else None
        user_ok = valid_mask(user_col)
        known_action = action < len(self.ACTIONS)
        ok = user_ok & (items >= 0) & known_action
        if before is not None:
            ok &= before
        skipped: dict[str, int] = {}
        if not ok.all():
            skipped = count_reasons(
                REACTION_REASONS,
                [
                    ~user_ok,
                    ~valid_mask(vid_col),
                    items < 0,
                    ~known_action,
                    None if before is None else ~before,
                ],
                n,
            )
            items, action = items[ok], action[ok]
            times = times[ok] if times is not None else None
        users, numbers = user_rows(user_col, ok, self.encoder.mode == "numeric")
        return Rows(
            n_read=n,
            users=users,
            numbers=numbers,
            items=items,
            values=self.values[action],
            skipped=skipped,
            times=times,
        )
