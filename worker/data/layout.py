"""Input layouts: column roles and their names per layout, ColumnMapping, the skip
reasons, input path resolution, and the checks that a Parquet file has usable columns."""

from __future__ import annotations

import glob as globmod
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

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
REACTION_DEFAULTS = {
    "reaction_user": "user_id",
    "reaction_video": "video_id",
    "reaction_action": "action",
    "reaction_timestamp": "ts",
}
LOG_REQUIRED = ("log_user", "log_video", "log_watchtime")
VIDEO_REQUIRED = ("video_id", "video_duration")

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


def open_parquet(path: Path, what: str) -> pq.ParquetFile:
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


def check_types(path: Path, schema: pa.Schema, what: str, checks: dict[str, str]) -> None:
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
        cols = {**defaults, **REACTION_DEFAULTS, **overrides}
        if all(cols[r] in schema_names for r in required):
            return name, cols
    return None


def detect_layout(
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
