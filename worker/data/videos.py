"""Video metadata: the catalogue (ids, durations with their unit detected, category and
author codes) that the logs are matched against."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from worker.data.idcodes import as_plain
from worker.data.layout import (
    MS_DETECT_THRESHOLD,
    VIDEO_REQUIRED,
    ColumnMapping,
    DurationUnit,
    check_types,
    detect_layout,
    open_parquet,
)
from worker.errors import DataError

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]

# ---- video metadata --------------------------------------------------------------------------


@dataclass
class VideoCatalog:
    ids: pa.Array
    duration_s: F32
    category: I32
    author: I32
    categories: list[str]
    authors: list[str]
    summary: dict[str, Any]


def _codes(arr: pa.Array) -> tuple[I32, list[str]]:
    """Dense codes (-1 for null) and the code → name table of a label column."""
    arr = as_plain(arr)
    if not pa.types.is_string(arr.type):
        arr = pc.cast(arr, pa.string())
    enc = arr.dictionary_encode()
    codes = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int32)
    return codes, [str(s) for s in enc.dictionary.to_pylist()]


def read_videos(
    paths: list[Path], mapping: ColumnMapping, duration_unit: DurationUnit
) -> VideoCatalog:
    tables: list[pa.Table] = []
    layouts: list[str] = []
    cols: dict[str, str] = {}
    missing_optional: set[str] = set()
    for path in paths:
        pf = open_parquet(path, "videos")
        layout, cols = detect_layout(path, pf.schema_arrow, mapping, VIDEO_REQUIRED, "videos")
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
        check_types(path, pf.schema_arrow, "videos", checks)
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
            "video_id": as_plain(t.column("video_id")),
            "duration": pc.cast(t.column("video_duration"), pa.float64()).combine_chunks(),
        }
        for role in ("video_category", "video_author"):
            if role in t.column_names:
                col = as_plain(t.column(role))
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
    return VideoCatalog(
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
