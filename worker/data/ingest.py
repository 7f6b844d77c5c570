"""The Parquet edge: watch logs, video metadata and reactions → a users × videos CSR matrix.

Logs are streamed in record batches (``ParquetFile.iter_batches``), never loaded
whole; video metadata and reactions are small next to them, the metadata is read
whole and the reactions streamed the same way. Two layouts are detected from the
column names, and :class:`ColumnMapping` lets configuration rename any column:

=================  ===================  ===========================
role               seed (Rutube dump)   hackathon (RUTUBE 2024)
=================  ===================  ===========================
log user id        ``viewer_uid``       ``user_id``
log video id       ``rutube_video_id``  ``video_id``
log watch time     ``total_watchtime``  ``watchtime``
log time           ``event_timestamp``  ``event_timestamp``
video id           ``video_id``         ``video_id``
video duration     ``duration``         ``v_duration``
video category     ``category``         ``category_id``
video author       ``author_id``        ``author_id``
=================  ===================  ===========================

Each used log row adds ``Weights.view_values(watch, duration)`` to its (user,
video) cell, so repeated views sum; each reaction adds
``Weights.reaction_values`` (a dislike is negative). The rules for bad input:

* a file that is missing, empty (0 bytes), not Parquet or corrupt, or that
  lacks a needed column or has it with an unusable type → :class:`DataError`
  naming the file (and the column);
* a bad row is skipped and counted by reason in ``summary["rows_skipped"]``:
  ``null_user_id``, ``null_video_id``, ``unknown_video`` (not in the metadata),
  ``missing_watchtime`` (null or NaN), ``negative_watchtime``,
  ``zero_watchtime`` (no signal), ``watchtime_over_24h`` (one view longer than
  a day is a logging bug), ``watchtime_over_10x_duration`` (a loop of a short
  video is already capped at the full watch; ten full watches in one row means
  a unit or logging error), ``after_until`` (when ``until`` is given);
  reactions also have ``unknown_action``;
* a video with a missing, zero or negative duration stays in the catalogue with
  ``NaN`` duration; its views count as ``Weights.default_duration_s`` long, as
  the live worker counts them (``rows_default_duration`` in the summary);
* no usable row at all → :class:`DataError`.

Id mapping is vectorised, never a Python dict per row. Ids of the common form
``<prefix><decimal number>`` (``u123``, ``video_45``, ``10048921``) map through a
direct lookup table indexed by the number (exact: only canonical digits, no
leading zeros, are accepted); any other id falls back to Arrow hashing
(``dictionary_encode`` + ``index_in`` against the ids seen so far). Either way
users are numbered by the batch where they first appear, and the COO triplets
go into preallocated int32/float32 arrays sized from the Parquet footers, so
the CSR is built once (``coo_matrix.tocsr`` sums duplicates).

The work is split over two threads: the reader thread decodes Parquet and does
the stateless part of each batch (video lookup, validity, values); the calling
thread runs the stateful user encoder and keeps the triplets.
"""

from __future__ import annotations

import glob as globmod
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from worker.core.ids import IdMap
from worker.core.model import VideoMeta
from worker.core.scoring import Weights
from worker.errors import DataError

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]

PathSpec = str | Path | Sequence[str | Path]
DurationUnit = Literal["auto", "s", "ms"]

#: A median video duration above this many units cannot be seconds (20,000 s is a
#: 5.5-hour median video) but is a plausible 20 s in milliseconds.
MS_DETECT_THRESHOLD = 20_000.0
#: One view longer than a day is a logging bug, not a signal.
MAX_WATCH_S = 86_400.0
#: A row that watched more than this many times the video's duration is a unit or
#: logging error (a looped short is already capped at one full watch).
MAX_WATCH_DURATIONS = 10.0
#: Numeric ids map through a direct table indexed by the number while the largest
#: number stays below this (2**24 int32 entries = 64 MiB); beyond it ids are hashed.
MAX_DIRECT_ID = 1 << 24
#: Decimal digits that always fit an int64.
_MAX_DIGITS = 18
#: Smallest canonical number with d digits, by d (d = 0 and d > 18 are never canonical).
_LOW = np.array(
    [np.iinfo(np.int64).max, 0]
    + [10 ** (d - 1) for d in range(2, _MAX_DIGITS + 1)]
    + [np.iinfo(np.int64).max],
    dtype=np.int64,
)
#: Batches read ahead of the processing thread.
_PREFETCH = 2
#: Rows per read batch at most, whatever ``batch_size`` asks: bigger batches only add
#: memory (every column and temporary scales with it) and spill the lookup work out
#: of the CPU caches; measured 20M rows: 256k-row batches are as fast as 1M-row ones.
MAX_BATCH_ROWS = 1 << 18


class ColumnMapping(BaseModel):
    """Column names of the inputs; a field left ``None`` comes from the detected layout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    log_user: str | None = Field(
        default=None, description="Log column with the user id (seed: viewer_uid)."
    )
    log_video: str | None = Field(
        default=None, description="Log column with the video id (seed: rutube_video_id)."
    )
    log_watchtime: str | None = Field(
        default=None,
        description="Log column with the watch time in seconds (seed: total_watchtime).",
    )
    log_timestamp: str | None = Field(
        default=None, description="Log column with the event time (both layouts: event_timestamp)."
    )
    video_id: str | None = Field(
        default=None, description="Metadata column with the video id (both layouts: video_id)."
    )
    video_duration: str | None = Field(
        default=None, description="Metadata column with the duration (seed: duration, s or ms)."
    )
    video_category: str | None = Field(
        default=None, description="Metadata column with the category (seed: category)."
    )
    video_author: str | None = Field(
        default=None, description="Metadata column with the author id (both layouts: author_id)."
    )
    reaction_user: str | None = Field(
        default=None, description="Reactions column with the user id (default user_id)."
    )
    reaction_video: str | None = Field(
        default=None, description="Reactions column with the video id (default video_id)."
    )
    reaction_action: str | None = Field(
        default=None, description="Reactions column with like/dislike/neutral (default action)."
    )
    reaction_timestamp: str | None = Field(
        default=None, description="Reactions column with the reaction time (default ts)."
    )


#: The two known layouts; a ColumnMapping overrides any of these names.
LAYOUTS: dict[str, dict[str, str]] = {
    "seed": {
        "log_user": "viewer_uid",
        "log_video": "rutube_video_id",
        "log_watchtime": "total_watchtime",
        "log_timestamp": "event_timestamp",
        "video_id": "video_id",
        "video_duration": "duration",
        "video_category": "category",
        "video_author": "author_id",
    },
    "hackathon": {
        "log_user": "user_id",
        "log_video": "video_id",
        "log_watchtime": "watchtime",
        "log_timestamp": "event_timestamp",
        "video_id": "video_id",
        "video_duration": "v_duration",
        "video_category": "category_id",
        "video_author": "author_id",
    },
}
_REACTION_DEFAULTS = {
    "reaction_user": "user_id",
    "reaction_video": "video_id",
    "reaction_action": "action",
    "reaction_timestamp": "ts",
}
_LOG_REQUIRED = ("log_user", "log_video", "log_watchtime")
_VIDEO_REQUIRED = ("video_id", "video_duration")

#: Skip reasons, in priority order (a row is counted under the first that applies).
LOG_REASONS = (
    "null_user_id",
    "null_video_id",
    "unknown_video",
    "missing_watchtime",
    "negative_watchtime",
    "zero_watchtime",
    "watchtime_over_24h",
    "watchtime_over_10x_duration",
    "after_until",
)
REACTION_REASONS = (
    "null_user_id",
    "null_video_id",
    "unknown_video",
    "unknown_action",
    "after_until",
)


@dataclass(frozen=True)
class Interactions:
    """What ingest produces: the confidence matrix and everything aligned with it."""

    matrix: sp.csr_matrix  # (n_users, n_items) float32 values before alpha, duplicates summed
    users: IdMap  # every user with at least one used row, in order of first appearance
    items: IdMap  # every video of the metadata, in metadata order
    videos: VideoMeta  # aligned with items
    summary: dict[str, Any]


# ---- paths and schemas -----------------------------------------------------------------------


def resolve_paths(spec: PathSpec, *, what: str = "input") -> list[Path]:
    """Expand a file, a directory (its ``*.parquet``, recursively), a glob or a list of them.

    Files are returned sorted within each directory or glob, in the given order
    across a list, without duplicates. Raises :class:`DataError` when a path does not
    exist or a directory/glob matches no file.
    """
    specs: Sequence[str | Path] = [spec] if isinstance(spec, (str, Path)) else spec
    out: list[Path] = []
    for item in specs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*.parquet")
                if f.is_file() and not any(part.startswith((".", "_")) for part in f.parts[-1:])
            )
            if not found:
                raise DataError(f"{what}: directory {p} holds no *.parquet file")
        elif any(ch in str(item) for ch in "*?["):
            found = sorted(Path(f) for f in globmod.glob(str(item), recursive=True))
            found = [f for f in found if f.is_file()]
            if not found:
                raise DataError(f"{what}: pattern {item!s} matches no file")
        elif p.is_file():
            found = [p]
        else:
            raise DataError(f"{what}: {p} does not exist")
        out.extend(f for f in found if f not in out)
    if not out:
        raise DataError(f"{what}: no input file given")
    return out


def _open(path: Path, what: str) -> pq.ParquetFile:
    """Open a Parquet file, turning every failure into a DataError naming it."""
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{what} file {path} is empty (0 bytes), not a Parquet file")
        # pre_buffer=False: with it, pyarrow keeps every pre-buffered column chunk of the
        # file alive until the reader closes (~15 bytes per row), for no speed gain here.
        return pq.ParquetFile(path, pre_buffer=False)
    except DataError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{what} file {path} is not a readable Parquet file: {exc}") from None


def _is_id_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_id_type(t.value_type)
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_integer(t)
        or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))
    )


def _is_number_type(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t))


def _check_types(path: Path, schema: pa.Schema, what: str, checks: dict[str, str]) -> None:
    """Raise DataError when a column has a type its role cannot use."""
    for col, kind in checks.items():
        t = schema.field(col).type
        ok = {
            "id": _is_id_type,
            "number": _is_number_type,
            "label": lambda t: _is_id_type(t) or pa.types.is_boolean(t),
            "time": pa.types.is_timestamp,
        }[kind](t)
        if not ok:
            expected = {
                "id": "a string or integer id",
                "number": "a number",
                "label": "a string or integer",
                "time": "a timestamp",
            }[kind]
            raise DataError(f"{what} file {path}: column {col!r} has type {t}, expected {expected}")


def _layout_columns(
    schema_names: set[str], mapping: ColumnMapping, required: Sequence[str]
) -> tuple[str, dict[str, str]] | None:
    """The first layout whose required columns (after overrides) are all present."""
    overrides = {k: v for k, v in mapping.model_dump().items() if v is not None}
    for name, defaults in LAYOUTS.items():
        cols = {**defaults, **_REACTION_DEFAULTS, **overrides}
        if all(cols[r] in schema_names for r in required):
            return name, cols
    return None


def _detect(
    path: Path, schema: pa.Schema, mapping: ColumnMapping, required: Sequence[str], what: str
) -> tuple[str, dict[str, str]]:
    names = set(schema.names)
    found = _layout_columns(names, mapping, required)
    if found is None:
        overrides = {k: v for k, v in mapping.model_dump().items() if v is not None}
        tried = "; ".join(
            f"{layout}: missing "
            + ", ".join(
                repr(c) for c in ({**cols, **overrides}[r] for r in required) if c not in names
            )
            for layout, cols in LAYOUTS.items()
        )
        raise DataError(
            f"{what} file {path}: columns do not match a known layout ({tried}); "
            f"it has {sorted(names)}. Set a ColumnMapping to name the columns."
        )
    return found


# ---- id mapping ------------------------------------------------------------------------------


def _as_plain(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A contiguous Arrow array; dictionaries decoded, large/view strings cast to string."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not (pa.types.is_string(arr.type) or pa.types.is_integer(arr.type)):
        arr = pc.cast(arr, pa.string())
    return arr


def _numeric_prefix(value: str) -> str:
    """``"video_45"`` → ``"video_"``: the id without its trailing decimal digits."""
    return value.rstrip("0123456789")


def _valid(arr: pa.Array) -> Bool:
    """Non-null mask of ``arr`` (cheap when it has no nulls)."""
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=np.bool_)
    mask: Bool = pc.is_valid(arr).to_numpy(zero_copy_only=False)
    return mask


def _parse_numeric(arr: pa.Array, prefix: str) -> tuple[I64, Bool]:
    """Parse ``<prefix><canonical decimal>`` ids: (numbers, ok) with ok False for other rows.

    Canonical means ASCII digits only, no sign, no leading zero (so the number maps
    back to exactly one string), at most 18 digits. Nulls are not ok. An integer
    column is its own number (with the empty prefix only).
    """
    n = len(arr)
    if pa.types.is_integer(arr.type):
        if prefix != "":
            return np.zeros(n, np.int64), np.zeros(n, np.bool_)
        nums = pc.cast(arr, pa.int64())
        if nums.null_count:
            nums = pc.fill_null(nums, -1)
        out = nums.to_numpy(zero_copy_only=False)
        return np.maximum(out, 0), _valid(arr) & (out >= 0)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.bool_)
    ok = _valid(arr)
    validity, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    width = len(prefix.encode())
    if width:
        starts = pc.starts_with(arr, prefix)
        if starts.null_count:
            starts = pc.fill_null(starts, False)
        ok &= starts.to_numpy(zero_copy_only=False)
        # Overwrite the prefix with '0's in a copy of the bytes: the cast then reads the
        # number straight away (leading zeros are fine for it), about twice as fast as
        # slicing the prefix off every string.
        data = np.frombuffer(data_buf, dtype=np.uint8, count=int(offsets[-1])).copy()
        begin = offsets[:-1][ok]
        for k in range(width):
            data[begin + k] = ord("0")
        digits = pa.StringArray.from_buffers(
            n, offsets_buf, pa.py_buffer(data), validity, arr.null_count, arr.offset
        )
    else:
        digits = arr
    try:  # fast path: every row is a number (the cast raises otherwise)
        parsed = pc.cast(digits, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        rest = pc.utf8_slice_codeunits(arr, len(prefix)) if prefix else arr
        good = pc.and_(
            pc.ascii_is_decimal(rest), pc.less_equal(pc.binary_length(rest), _MAX_DIGITS)
        )
        good = pc.fill_null(good, False)
        parsed = pc.cast(pc.if_else(good, rest, "0"), pa.int64())
        ok &= good.to_numpy(zero_copy_only=False)
    if parsed.null_count:
        parsed = pc.fill_null(parsed, 0)
    nums = parsed.to_numpy(zero_copy_only=False)
    n_digits = np.clip(np.diff(offsets) - width, 0, _MAX_DIGITS + 1)
    # A canonical number of d digits is >= 10**(d-1) (or is "0"): this rejects leading
    # zeros and signs ("+5", "-0", "05"), and d = 0 or d > 18 fail through _LOW.
    ok &= (nums >= _LOW[n_digits]) & (nums >= 0)
    return np.where(ok, nums, 0), ok


@dataclass(frozen=True)
class _Numbers:
    """Ids of the form ``<prefix><canonical decimal>``, as their numbers."""

    prefix: str
    nums: I64


def _as_numbers(arr: pa.Array) -> _Numbers | None:
    """The numeric form of every id in ``arr`` (no nulls), or None when one has another form."""
    if len(arr) == 0:
        return None
    first = arr[0].as_py()
    prefix = "" if isinstance(first, int) else _numeric_prefix(str(first))
    nums, ok = _parse_numeric(arr, prefix)
    return _Numbers(prefix, nums) if ok.all() else None


class _UserEncoder:
    """A growing map from user ids (one Arrow array at a time) to dense int32 codes.

    It starts in numeric mode (a direct table indexed by the id's number; the new
    ids of a batch are numbered in increasing numeric order) and switches, once and
    for good, to hashing mode (``dictionary_encode`` + ``index_in``; the new ids of a
    batch are numbered in order of appearance) when a batch holds an id of another
    form, another prefix, or a number too large for the table.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mode: Literal["numeric", "hash"] = "numeric"
        self._prefix: str | None = None
        self._table = np.full(0, -1, dtype=np.int32)
        self._nums: list[I64] = []  # numbers in code order (numeric mode)
        self._ids: list[pa.Array] = []  # ids in code order (hash mode)
        self._value_set: pa.Array | None = None

    def encode(self, ids: pa.Array, numbers: _Numbers | None) -> I32:
        """Codes for ``ids`` (non-null), adding the new ones; ``numbers`` is their numeric form."""
        if self.mode == "numeric":
            if numbers is not None and self._prefix in (None, numbers.prefix):
                codes = self._encode_numeric(numbers)
                if codes is not None:
                    return codes
            if len(ids) == 0:
                return np.zeros(0, dtype=np.int32)
            self._switch_to_hash()
        return self._encode_hash(ids)

    def _encode_numeric(self, numbers: _Numbers) -> I32 | None:
        nums = numbers.nums
        top = int(nums.max(initial=-1))
        if top >= MAX_DIRECT_ID:
            return None
        self._prefix = numbers.prefix
        if top >= len(self._table):
            size = max(1 << 16, 1 << math.ceil(math.log2(top + 1)))
            grown = np.full(size, -1, dtype=np.int32)
            grown[: len(self._table)] = self._table
            self._table = grown
        codes = self._table[nums]
        new = codes < 0
        if new.any():
            # A marker table is O(table) where a sort of the batch is O(n log n).
            mark = np.zeros(top + 1, dtype=np.bool_)
            mark[nums[new]] = True
            fresh = np.flatnonzero(mark)
            self._table[fresh] = np.arange(self.n, self.n + len(fresh), dtype=np.int32)
            self._nums.append(fresh.astype(np.int64))
            self.n += len(fresh)
            codes[new] = self._table[nums[new]]
        return codes

    def _switch_to_hash(self) -> None:
        self._ids = [pa.array(self.ids(), pa.string())] if self.n else []
        self._table = np.full(0, -1, dtype=np.int32)
        self._nums = []
        self.mode = "hash"
        self._value_set = None

    def _encode_hash(self, ids: pa.Array) -> I32:
        if not pa.types.is_string(ids.type):
            ids = pc.cast(ids, pa.string())
        enc = ids.dictionary_encode()
        uniq = enc.dictionary
        if self._value_set is None:
            self._value_set = (
                pa.concat_arrays(self._ids) if self._ids else pa.array([], pa.string())
            )
        known = pc.index_in(uniq, value_set=self._value_set)
        is_new = pc.is_null(known).to_numpy(zero_copy_only=False)
        map_codes = pc.fill_null(known, -1).to_numpy(zero_copy_only=False).astype(np.int32)
        k = int(is_new.sum())
        if k:
            # dictionary_encode lists values in order of first appearance.
            map_codes[is_new] = np.arange(self.n, self.n + k, dtype=np.int32)
            self._ids.append(uniq.filter(pa.array(is_new)))
            self._value_set = None
            self.n += k
        codes: I32 = map_codes[enc.indices.to_numpy(zero_copy_only=False)]
        return codes

    def ids(self) -> list[str]:
        """All ids in code order."""
        if self.mode == "numeric":
            if not self.n:
                return []
            strs = pc.cast(pa.array(np.concatenate(self._nums)), pa.string())
            if self._prefix:
                strs = pc.binary_join_element_wise(self._prefix, strs, "")
            ids: list[str] = strs.to_pylist()
            return ids
        every: list[str] = pa.chunked_array(self._ids, pa.string()).to_pylist()
        return every


class _ItemLookup:
    """A fixed map from video ids to item codes (-1 when unknown or null)."""

    def __init__(self, ids: pa.Array) -> None:
        self.ids = ids  # unique, non-null strings
        self.mode: Literal["numeric", "hash"] = "hash"
        self._prefix = ""
        self._table = np.full(0, -1, dtype=np.int32)
        if len(ids):
            prefix = _numeric_prefix(str(ids[0].as_py()))
            nums, ok = _parse_numeric(ids, prefix)
            if ok.all() and int(nums.max()) < MAX_DIRECT_ID:
                self.mode, self._prefix = "numeric", prefix
                self._table = np.full(int(nums.max()) + 1, -1, dtype=np.int32)
                self._table[nums] = np.arange(len(ids), dtype=np.int32)

    def lookup(self, arr: pa.Array) -> I32:
        if self.mode == "numeric":
            nums, ok = _parse_numeric(arr, self._prefix)
            ok &= nums < len(self._table)
            return np.where(ok, self._table[np.where(ok, nums, 0)], -1).astype(np.int32)
        if pa.types.is_integer(arr.type):
            arr = pc.cast(arr, pa.string())
        found = pc.index_in(arr, value_set=self.ids)
        codes: I32 = pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int32)
        return codes


# ---- video metadata --------------------------------------------------------------------------


@dataclass
class _Catalog:
    ids: pa.Array
    duration_s: F32
    category: I32
    author: I32
    categories: list[str]
    authors: list[str]
    summary: dict[str, Any]


def _codes(arr: pa.Array) -> tuple[I32, list[str]]:
    """Dense codes (-1 for null) and the code → name table of a label column."""
    arr = _as_plain(arr)
    if not pa.types.is_string(arr.type):
        arr = pc.cast(arr, pa.string())
    enc = arr.dictionary_encode()
    codes = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int32)
    return codes, [str(s) for s in enc.dictionary.to_pylist()]


def _read_videos(
    paths: list[Path], mapping: ColumnMapping, duration_unit: DurationUnit
) -> _Catalog:
    tables: list[pa.Table] = []
    layouts: list[str] = []
    cols: dict[str, str] = {}
    missing_optional: set[str] = set()
    for path in paths:
        pf = _open(path, "videos")
        layout, cols = _detect(path, pf.schema_arrow, mapping, _VIDEO_REQUIRED, "videos")
        layouts.append(layout)
        names = set(pf.schema_arrow.names)
        roles = ["video_id", "video_duration"]
        for role in ("video_category", "video_author"):
            if cols[role] in names:
                roles.append(role)
            else:
                missing_optional.add(cols[role])
        checks = {cols["video_id"]: "id", cols["video_duration"]: "number"}
        checks.update({cols[r]: "label" for r in roles[2:]})
        _check_types(path, pf.schema_arrow, "videos", checks)
        try:
            t = pf.read(columns=[cols[r] for r in roles])
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"videos file {path} is corrupt: {exc}") from None
        t = t.rename_columns(roles)
        tables.append(t)
    # Normalise to one schema: string ids and labels, float64 durations.
    norm: list[pa.Table] = []
    for t in tables:
        data = {
            "video_id": _as_plain(t.column("video_id")),
            "duration": pc.cast(t.column("video_duration"), pa.float64()).combine_chunks(),
        }
        for role in ("video_category", "video_author"):
            if role in t.column_names:
                col = _as_plain(t.column(role))
                data[role] = col if pa.types.is_string(col.type) else pc.cast(col, pa.string())
            else:
                data[role] = pa.nulls(t.num_rows, pa.string())
        if pa.types.is_integer(data["video_id"].type):
            data["video_id"] = pc.cast(data["video_id"], pa.string())
        norm.append(pa.table(data))
    table = pa.concat_tables(norm) if norm else pa.table({})
    rows = table.num_rows
    ids = table.column("video_id").combine_chunks()
    keep = pc.is_valid(ids).to_numpy(zero_copy_only=False)
    null_ids = int((~keep).sum())
    enc = ids.dictionary_encode()
    idx = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False)
    first = np.zeros(rows, dtype=np.bool_)
    if rows:
        _, first_pos = np.unique(np.where(keep, idx, -1), return_index=True)
        first[first_pos] = True
    keep &= first
    duplicates = rows - null_ids - int(keep.sum())
    table = table.filter(pa.array(keep))
    raw = table.column("duration").to_numpy().astype(np.float64)
    positive = raw[np.isfinite(raw) & (raw > 0)]
    median = float(np.median(positive)) if len(positive) else float("nan")
    if duration_unit == "auto":
        unit = "ms" if median > MS_DETECT_THRESHOLD else "s"
        source = (
            f"auto: median positive duration {median:g} "
            f"{'>' if unit == 'ms' else '<='} {MS_DETECT_THRESHOLD:g}"
        )
    elif duration_unit in ("s", "ms"):
        unit, source = duration_unit, "configured"
    else:
        raise DataError(f"duration_unit must be auto, s or ms, not {duration_unit!r}")
    seconds = raw / (1000.0 if unit == "ms" else 1.0)
    bad = ~(np.isfinite(seconds) & (seconds > 0))
    seconds[bad] = np.nan
    category, categories = _codes(table.column("video_category"))
    author, authors = _codes(table.column("video_author"))
    return _Catalog(
        ids=table.column("video_id").combine_chunks(),
        duration_s=seconds.astype(np.float32),
        category=category,
        author=author,
        categories=categories,
        authors=authors,
        summary={
            "layout": layouts[0] if len(set(layouts)) == 1 else layouts,
            "rows": rows,
            "videos": table.num_rows,
            "null_ids": null_ids,
            "duplicate_ids": duplicates,
            "without_duration": int(bad.sum()),
            "missing_optional_columns": sorted(missing_optional),
            "duration_unit": unit,
            "duration_unit_source": source,
        },
    )


# ---- streaming -------------------------------------------------------------------------------


def _prefetch(items: Iterator[Any]) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, ``_PREFETCH`` ahead (Parquet decoding
    releases the GIL, so reading overlaps with mapping on a second core)."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=_PREFETCH)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as exc:  # handed to the consumer, re-raised there
            q.put(("error", exc))

    thread = threading.Thread(target=run, name="refold-ingest-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def _batches(
    files: list[tuple[Path, pq.ParquetFile, list[str]]], batch_size: int, what: str
) -> Iterator[tuple[Path, pa.RecordBatch]]:
    for path, pf, columns in files:
        try:
            rows = min(batch_size, MAX_BATCH_ROWS)
            for batch in pf.iter_batches(batch_size=rows, columns=columns):
                yield path, batch
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{what} file {path} is corrupt: {exc}") from None


class _Triplets:
    """Preallocated COO triplets (int32 rows and columns, float32 values)."""

    def __init__(self, capacity: int) -> None:
        self.rows = np.empty(capacity, dtype=np.int32)
        self.cols = np.empty(capacity, dtype=np.int32)
        self.vals = np.empty(capacity, dtype=np.float32)
        self.n = 0

    def add(self, rows: I32, cols: I32, vals: F32) -> None:
        k = len(rows)
        self.rows[self.n : self.n + k] = rows
        self.cols[self.n : self.n + k] = cols
        self.vals[self.n : self.n + k] = vals
        self.n += k

    def free(self) -> None:
        """Drop the arrays (the CSR built from them is the only copy kept)."""
        empty = np.empty(0, dtype=np.int32)
        self.rows, self.cols, self.vals = empty, empty, empty.astype(np.float32)


def _time_threshold(col_type: pa.DataType, until: datetime) -> int:
    """``until`` in the raw int64 units of a timestamp column (naive columns are UTC)."""
    if until.tzinfo is None:
        until = until.replace(tzinfo=timezone.utc)
    unit = col_type.unit
    scale = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[unit]
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    delta = until - epoch
    return (delta.days * 86_400 + delta.seconds) * scale + delta.microseconds * scale // 1_000_000


def _before(col: pa.Array, until: datetime | None) -> Bool | None:
    """Rows strictly before ``until`` (null times count as before), or None without a filter."""
    if until is None:
        return None
    raw = pc.fill_null(pc.cast(col, pa.int64()), np.iinfo(np.int64).min)
    return np.asarray(raw.to_numpy(zero_copy_only=False) < _time_threshold(col.type, until))


def _time_range(files: list[tuple[Path, pq.ParquetFile, str | None]]) -> dict[str, str] | None:
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


def _count(reasons: Sequence[str], conds: Sequence[Bool | None], n: int) -> dict[str, int]:
    """Rows per reason, each row under the first of its reasons (``conds`` align with them)."""
    code = np.zeros(n, dtype=np.int8)
    for i in range(len(conds) - 1, -1, -1):  # the lowest index wins
        cond = conds[i]
        if cond is not None:
            code[cond] = i + 1
    counts = np.bincount(code, minlength=len(reasons) + 1)
    return {r: int(counts[i + 1]) for i, r in enumerate(reasons) if counts[i + 1]}


def _add(total: dict[str, int], part: dict[str, int]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v


@dataclass
class _Rows:
    """One batch after the stateless work: its used rows, ready for the user encoder."""

    n_read: int
    users: pa.Array  # user ids of the used rows (no nulls)
    numbers: _Numbers | None  # their numeric form, when every one has it
    items: I32
    values: F32
    skipped: dict[str, int]
    default_duration: int = 0


def _user_rows(arr: pa.Array, ok: Bool, try_numbers: bool) -> tuple[pa.Array, _Numbers | None]:
    """The used rows' user ids, and their numeric form when cheap and possible."""
    if not ok.all():
        arr = arr.filter(pa.array(ok))
    numbers = _as_numbers(arr) if try_numbers else None
    return arr, numbers


class _LogPrep:
    """Stateless per-batch work on the logs; runs on the reader thread."""

    def __init__(
        self,
        lookup: _ItemLookup,
        duration_s: F32,
        weights: Weights,
        until: datetime | None,
        encoder: _UserEncoder,
    ) -> None:
        self.lookup = lookup
        self.duration = duration_s.astype(np.float64)
        self.weights = weights
        self.until = until
        self.encoder = encoder

    def __call__(self, batch: pa.RecordBatch) -> _Rows:
        n = batch.num_rows
        user_col = _as_plain(batch.column(0))
        vid_col = _as_plain(batch.column(1))
        items = self.lookup.lookup(vid_col)
        watch = pc.cast(batch.column(2), pa.float64()).to_numpy(zero_copy_only=False)
        dur = np.where(items >= 0, self.duration[np.maximum(items, 0)], np.nan)
        before = _before(batch.column(3), self.until) if self.until is not None else None
        user_ok = _valid(user_col)
        with np.errstate(invalid="ignore"):
            # NaN watch times fail `watch > 0`; NaN durations pass the 10x check.
            too_long = watch > MAX_WATCH_DURATIONS * dur
            ok = user_ok & (items >= 0) & (watch > 0) & (watch <= MAX_WATCH_S) & ~too_long
            if before is not None:
                ok &= before
            skipped: dict[str, int] = {}
            if not ok.all():
                skipped = _count(
                    LOG_REASONS,
                    [
                        ~user_ok,
                        ~_valid(vid_col),
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
        known = np.isfinite(dur)
        default_duration = len(dur) - int(known.sum())
        if default_duration:
            dur = np.where(known, dur, self.weights.default_duration_s)
        users, numbers = _user_rows(user_col, ok, self.encoder.mode == "numeric")
        return _Rows(
            n_read=n,
            users=users,
            numbers=numbers,
            items=items,
            values=self.weights.view_values(watch, dur),
            skipped=skipped,
            default_duration=default_duration,
        )


class _ReactionPrep:
    """Stateless per-batch work on the reactions; runs on the reader thread."""

    ACTIONS = ("like", "neutral", "dislike")

    def __init__(
        self, lookup: _ItemLookup, weights: Weights, until: datetime | None, encoder: _UserEncoder
    ) -> None:
        self.lookup = lookup
        self.until = until
        self.encoder = encoder
        self.action_set = pa.array(self.ACTIONS)
        self.values = np.append(weights.reaction_values(list(self.ACTIONS)), np.float32(0.0))

    def __call__(self, batch: pa.RecordBatch) -> _Rows:
        n = batch.num_rows
        user_col = _as_plain(batch.column(0))
        vid_col = _as_plain(batch.column(1))
        items = self.lookup.lookup(vid_col)
        act_col = _as_plain(batch.column(2))
        if not pa.types.is_string(act_col.type):
            act_col = pc.cast(act_col, pa.string())
        found = pc.index_in(act_col, value_set=self.action_set)
        action = pc.fill_null(found, len(self.ACTIONS)).to_numpy(zero_copy_only=False)
        before = _before(batch.column(3), self.until) if self.until is not None else None
        user_ok = _valid(user_col)
        known_action = action < len(self.ACTIONS)
        ok = user_ok & (items >= 0) & known_action
        if before is not None:
            ok &= before
        skipped: dict[str, int] = {}
        if not ok.all():
            skipped = _count(
                REACTION_REASONS,
                [
                    ~user_ok,
                    ~_valid(vid_col),
                    items < 0,
                    ~known_action,
                    None if before is None else ~before,
                ],
                n,
            )
            items, action = items[ok], action[ok]
        users, numbers = _user_rows(user_col, ok, self.encoder.mode == "numeric")
        return _Rows(
            n_read=n,
            users=users,
            numbers=numbers,
            items=items,
            values=self.values[action],
            skipped=skipped,
        )


def _stream(
    files: list[tuple[Path, pq.ParquetFile, list[str]]],
    what: str,
    prep: Callable[[pa.RecordBatch], _Rows],
    encoder: _UserEncoder,
    triplets: _Triplets,
    *,
    batch_size: int,
    reasons: Sequence[str],
    bar: tqdm[Any] | None = None,
) -> dict[str, Any]:
    """Read, prepare (on the reader thread), encode users and keep the triplets."""
    skipped = dict.fromkeys(reasons, 0)
    rows_read = default_duration = 0
    # Two threads: Parquet decoding and the stateless preparation on the reader thread,
    # the user encoder (stateful) here. (A third stage measured no faster on 2 cores.)
    batches = _batches(files, batch_size, what)
    for rows in _prefetch(prep(batch) for _, batch in batches):
        rows_read += rows.n_read
        _add(skipped, rows.skipped)
        default_duration += rows.default_duration
        triplets.add(encoder.encode(rows.users, rows.numbers), rows.items, rows.values)
        if bar is not None:
            bar.update(rows.n_read)
    out: dict[str, Any] = {
        "rows_read": rows_read,
        "rows_used": rows_read - sum(skipped.values()),
        "rows_skipped": {k: v for k, v in skipped.items() if v},
    }
    if what == "logs":
        out["rows_default_duration"] = default_duration
    return out


def _open_logs(
    paths: list[Path], mapping: ColumnMapping, until: datetime | None
) -> list[tuple[Path, pq.ParquetFile, dict[str, str], str]]:
    out = []
    for path in paths:
        pf = _open(path, "logs")
        schema = pf.schema_arrow
        layout, cols = _detect(path, schema, mapping, _LOG_REQUIRED, "logs")
        checks = {cols["log_user"]: "id", cols["log_video"]: "id", cols["log_watchtime"]: "number"}
        if until is not None:
            if cols["log_timestamp"] not in schema.names:
                raise DataError(
                    f"logs file {path}: column {cols['log_timestamp']!r} is needed for until="
                )
            checks[cols["log_timestamp"]] = "time"
        _check_types(path, schema, "logs", checks)
        out.append((path, pf, cols, layout))
    return out


def _open_reactions(
    paths: list[Path], mapping: ColumnMapping, until: datetime | None
) -> list[tuple[Path, pq.ParquetFile, dict[str, str]]]:
    overrides = {k: v for k, v in mapping.model_dump().items() if v is not None}
    cols = {**_REACTION_DEFAULTS, **overrides}
    out = []
    for path in paths:
        pf = _open(path, "reactions")
        schema = pf.schema_arrow
        need = ["reaction_user", "reaction_video", "reaction_action"]
        if until is not None:
            need.append("reaction_timestamp")
        missing = [cols[r] for r in need if cols[r] not in schema.names]
        if missing:
            raise DataError(
                f"reactions file {path}: missing columns {missing}; it has {schema.names}"
            )
        checks = {
            cols["reaction_user"]: "id",
            cols["reaction_video"]: "id",
            cols["reaction_action"]: "label",
        }
        if until is not None:
            checks[cols["reaction_timestamp"]] = "time"
        _check_types(path, schema, "reactions", checks)
        out.append((path, pf, cols))
    return out


def build_interactions(
    logs: PathSpec,
    videos: PathSpec,
    *,
    reactions: PathSpec | None = None,
    mapping: ColumnMapping | None = None,
    weights: Weights | None = None,
    duration_unit: DurationUnit = "auto",
    batch_size: int = 1_000_000,
    until: datetime | None = None,
    progress: bool = True,
) -> Interactions:
    """Stream the logs (and reactions) into the users × videos confidence matrix.

    ``logs``, ``videos`` and ``reactions`` each take a file, a directory, a glob or a
    list of them. ``until`` keeps only events strictly before that time (naive
    times are UTC), for training on the past of a prequential split.
    ``batch_size`` is the rows per Parquet read batch, capped at
    :data:`MAX_BATCH_ROWS` (larger batches only cost memory). See the module
    docstring for the layouts and the rules for bad input.
    """
    started = time.perf_counter()
    mapping = mapping or ColumnMapping()
    weights = weights or Weights()
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    log_paths = resolve_paths(logs, what="logs")
    video_paths = resolve_paths(videos, what="videos")
    reaction_paths = resolve_paths(reactions, what="reactions") if reactions is not None else []

    catalog = _read_videos(video_paths, mapping, duration_unit)
    lookup = _ItemLookup(catalog.ids)
    pa.default_memory_pool().release_unused()  # the metadata tables are gone
    opened_logs = _open_logs(log_paths, mapping, until)
    opened_reactions = _open_reactions(reaction_paths, mapping, until)
    capacity = sum(pf.metadata.num_rows for _, pf, _, _ in opened_logs) + sum(
        pf.metadata.num_rows for _, pf, _ in opened_reactions
    )
    triplets = _Triplets(capacity)
    encoder = _UserEncoder()
    total_log_rows = sum(pf.metadata.num_rows for _, pf, _, _ in opened_logs)
    log_files = [
        (path, pf, [cols["log_user"], cols["log_video"], cols["log_watchtime"]]
         + ([cols["log_timestamp"]] if until is not None else []))
        for path, pf, cols, _ in opened_logs
    ]  # fmt: skip
    with tqdm(
        total=total_log_rows, unit="rows", unit_scale=True, desc="ingest", disable=not progress
    ) as bar:
        log_summary = _stream(
            log_files,
            "logs",
            _LogPrep(lookup, catalog.duration_s, weights, until, encoder),
            encoder,
            triplets,
            batch_size=batch_size,
            reasons=LOG_REASONS,
            bar=bar,
        )
    reaction_summary = None
    if opened_reactions:
        reaction_files = [
            (path, pf, [cols["reaction_user"], cols["reaction_video"], cols["reaction_action"]]
             + ([cols["reaction_timestamp"]] if until is not None else []))
            for path, pf, cols in opened_reactions
        ]  # fmt: skip
        reaction_summary = _stream(
            reaction_files,
            "reactions",
            _ReactionPrep(lookup, weights, until, encoder),
            encoder,
            triplets,
            batch_size=batch_size,
            reasons=REACTION_REASONS,
        )
    used = log_summary["rows_used"] + (reaction_summary["rows_used"] if reaction_summary else 0)
    if used == 0:
        raise DataError(
            f"no usable rows in logs {[str(p) for p in log_paths]}"
            + (f" and reactions {[str(p) for p in reaction_paths]}" if reaction_paths else "")
            + f": read {log_summary['rows_read']} log rows, skipped "
            f"{log_summary['rows_skipped'] or 'none'}"
        )
    pa.default_memory_pool().release_unused()  # batches are gone; give their pages back
    matrix, user_ids = _build_matrix(triplets, encoder, len(catalog.ids))
    positive = matrix.data > 0
    popularity = np.bincount(matrix.indices[positive], minlength=matrix.shape[1])
    meta = VideoMeta(
        duration_s=catalog.duration_s,
        category=catalog.category,
        author=catalog.author,
        popularity=popularity.astype(np.float32),
        categories=catalog.categories,
        authors=catalog.authors,
    )
    layouts = sorted({layout for _, _, _, layout in opened_logs})
    summary: dict[str, Any] = {
        "layout": layouts[0] if len(layouts) == 1 else layouts,
        "files": {
            "logs": [str(p) for p in log_paths],
            "videos": [str(p) for p in video_paths],
            "reactions": [str(p) for p in reaction_paths],
        },
        **log_summary,
        "reactions": reaction_summary,
        "videos": catalog.summary,
        "duration_unit": catalog.summary["duration_unit"],
        "duration_unit_source": catalog.summary["duration_unit_source"],
        "users": matrix.shape[0],
        "items": matrix.shape[1],
        "nnz": int(matrix.nnz),
        "id_mapping": {"users": encoder.mode, "videos": lookup.mode},
        "event_time": _time_range(
            [
                (p, pf, c["log_timestamp"] if c["log_timestamp"] in pf.schema_arrow.names else None)
                for p, pf, c, _ in opened_logs
            ]
        ),
        "until": None if until is None else until.isoformat(),
    }
    users = IdMap(user_ids)
    items = IdMap(str(s) for s in catalog.ids.to_pylist())
    summary["seconds"] = round(time.perf_counter() - started, 3)
    _log_summary(summary)
    return Interactions(matrix=matrix, users=users, items=items, videos=meta, summary=summary)


def _log_summary(summary: dict[str, Any]) -> None:
    """One info line, plus a warning for each thing an operator should look at."""
    log.info(
        "ingest: %d of %d log rows used, %d users x %d videos, %d values, %s layout, "
        "durations in %s (%s), %.1fs",
        summary["rows_used"],
        summary["rows_read"],
        summary["users"],
        summary["items"],
        summary["nnz"],
        summary["layout"],
        summary["duration_unit"],
        summary["duration_unit_source"],
        summary["seconds"],
    )
    if summary["rows_skipped"]:
        log.warning("ingest: skipped log rows by reason: %s", summary["rows_skipped"])
    if summary["reactions"] and summary["reactions"]["rows_skipped"]:
        log.warning(
            "ingest: skipped reaction rows by reason: %s", summary["reactions"]["rows_skipped"]
        )
    if summary["rows_default_duration"]:
        log.warning(
            "ingest: %d log rows are of videos without a duration; counted as %s",
            summary["rows_default_duration"],
            "Weights.default_duration_s",
        )
    if summary["videos"]["missing_optional_columns"]:
        log.warning(
            "ingest: video metadata lacks %s; new videos get no category/author prior",
            summary["videos"]["missing_optional_columns"],
        )


def _build_matrix(
    triplets: _Triplets, encoder: _UserEncoder, n_items: int
) -> tuple[sp.csr_matrix, list[str]]:
    """CSR from the triplets, which are freed on the way (the CSR is the only copy kept)."""
    n = triplets.n
    coo = sp.coo_matrix(
        (triplets.vals[:n], (triplets.rows[:n], triplets.cols[:n])), shape=(encoder.n, n_items)
    )
    triplets.free()
    matrix = coo.tocsr()  # sums duplicates
    del coo
    matrix.eliminate_zeros()  # a like and a dislike of the same size cancel out
    ids = encoder.ids()
    pa.default_memory_pool().release_unused()  # the Arrow copy of the ids is gone
    return matrix, ids
