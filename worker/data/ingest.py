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

Where each part lives: :mod:`worker.data.layout` (column roles, layouts,
:class:`~worker.data.layout.ColumnMapping`, skip reasons, input files and their
checks), :mod:`worker.data.videos` (the video catalogue), :mod:`worker.data.rows`
(per-batch validation and values), :mod:`worker.data.idcodes` (id encoding), and
this module (streaming the batches and building the matrix).

The work is split over two threads: the reader thread decodes Parquet and does
the stateless part of each batch (video lookup, validity, values); the calling
thread runs the stateful user encoder and keeps the triplets.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from tqdm import tqdm

from worker.core.ids import IdMap
from worker.core.model import VideoMeta
from worker.core.scoring import Weights
from worker.data.idcodes import ItemLookup, UserEncoder
from worker.data.layout import (
    LOG_REASONS,
    LOG_REQUIRED,
    REACTION_DEFAULTS,
    REACTION_REASONS,
    ColumnMapping,
    DurationUnit,
    PathSpec,
    check_types,
    detect_layout,
    open_parquet,
    resolve_paths,
)
from worker.data.rows import LogPrep, ReactionPrep, Rows, add_counts, time_range
from worker.data.videos import VideoCatalog, read_videos
from worker.errors import DataError

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]

#: Batches read ahead of the processing thread.
_PREFETCH = 2
#: Rows per read batch at most, whatever ``batch_size`` asks: bigger batches only add
#: memory (every column and temporary scales with it) and spill the lookup work out
#: of the CPU caches; measured 20M rows: 256k-row batches are as fast as 1M-row ones.
MAX_BATCH_ROWS = 1 << 18


@dataclass(frozen=True)
class Interactions:
    """What ingest produces: the confidence matrix and everything aligned with it."""

    matrix: sp.csr_matrix  # (n_users, n_items) float32 values before alpha, duplicates summed
    users: IdMap  # every user with at least one used row, in order of first appearance
    items: IdMap  # every video of the metadata, in metadata order
    videos: VideoMeta  # aligned with items
    summary: dict[str, Any]
    #: With ``with_times``: per entry of ``matrix.data``, its latest event time (µs).
    times: npt.NDArray[np.int64] | None = None


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

    def __init__(self, capacity: int, *, with_times: bool = False) -> None:
        # Event times (µs) per triplet, for recency decay; empty without ``with_times``.
        self.times = np.empty(capacity if with_times else 0, dtype=np.int64)
        self.rows = np.empty(capacity, dtype=np.int32)
        self.cols = np.empty(capacity, dtype=np.int32)
        self.vals = np.empty(capacity, dtype=np.float32)
        self.n = 0

    def add(self, rows: I32, cols: I32, vals: F32, times: npt.NDArray[np.int64] | None) -> None:
        k = len(rows)
        if len(self.times) and times is not None:
            self.times[self.n : self.n + k] = times
        self.rows[self.n : self.n + k] = rows
        self.cols[self.n : self.n + k] = cols
        self.vals[self.n : self.n + k] = vals
        self.n += k

    def free(self) -> None:
        """Drop the arrays (the CSR built from them is the only copy kept)."""
        empty = np.empty(0, dtype=np.int32)
        self.rows, self.cols, self.vals = empty, empty, empty.astype(np.float32)
        self.times = empty.astype(np.int64)


def _stream(
    files: list[tuple[Path, pq.ParquetFile, list[str]]],
    what: str,
    prep: Callable[[pa.RecordBatch], Rows],
    encoder: UserEncoder,
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
        add_counts(skipped, rows.skipped)
        default_duration += rows.default_duration
        triplets.add(encoder.encode(rows.users, rows.numbers), rows.items, rows.values, rows.times)
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
    paths: list[Path], mapping: ColumnMapping, until: datetime | None, with_times: bool = False
) -> list[tuple[Path, pq.ParquetFile, dict[str, str], str]]:
    out = []
    for path in paths:
        pf = open_parquet(path, "logs")
        schema = pf.schema_arrow
        layout, cols = detect_layout(path, schema, mapping, LOG_REQUIRED, "logs")
        checks = {cols["log_user"]: "id", cols["log_video"]: "id", cols["log_watchtime"]: "number"}
        if until is not None or with_times:
            if cols["log_timestamp"] not in schema.names:
                raise DataError(
                    f"logs file {path}: column {cols['log_timestamp']!r} is needed for until="
                    " and for recency decay"
                )
            checks[cols["log_timestamp"]] = "time"
        check_types(path, schema, "logs", checks)
        out.append((path, pf, cols, layout))
    return out


def _open_reactions(
    paths: list[Path], mapping: ColumnMapping, until: datetime | None, with_times: bool = False
) -> list[tuple[Path, pq.ParquetFile, dict[str, str]]]:
    overrides = {k: v for k, v in mapping.model_dump().items() if v is not None}
    cols = {**REACTION_DEFAULTS, **overrides}
    out = []
    for path in paths:
        pf = open_parquet(path, "reactions")
        schema = pf.schema_arrow
        need = ["reaction_user", "reaction_video", "reaction_action"]
        if until is not None or with_times:
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
        if until is not None or with_times:
            checks[cols["reaction_timestamp"]] = "time"
        check_types(path, schema, "reactions", checks)
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
    with_times: bool = False,
) -> Interactions:
    """Stream the logs (and reactions) into the users × videos confidence matrix.

    ``logs``, ``videos`` and ``reactions`` each take a file, a directory, a glob or a
    list of them. ``until`` keeps only events strictly before that time (naive
    times are UTC), for training on the past of a prequential split.
    ``batch_size`` is the rows per Parquet read batch, capped at
    :data:`MAX_BATCH_ROWS` (larger batches only cost memory). See the module
    docstring for the layouts and the rules for bad input. ``with_times`` also keeps
    each entry's latest event time (``Interactions.times``, for recency decay).
    """
    started = time.perf_counter()
    mapping = mapping or ColumnMapping()
    weights = weights or Weights()
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    inputs = _Inputs.open(logs, videos, reactions, mapping, duration_unit, until, with_times)
    encoder = UserEncoder()
    triplets = _Triplets(inputs.capacity(), with_times=with_times)
    log_summary, reaction_summary = _stream_inputs(
        inputs,
        weights,
        until,
        encoder,
        triplets,
        batch_size=batch_size,
        progress=progress,
        with_times=with_times,
    )
    used = log_summary["rows_used"] + (reaction_summary["rows_used"] if reaction_summary else 0)
    if used == 0:
        raise DataError(
            f"no usable rows in logs {[str(p) for p in inputs.log_paths]}"
            + (
                f" and reactions {[str(p) for p in inputs.reaction_paths]}"
                if inputs.reaction_paths
                else ""
            )
            + f": read {log_summary['rows_read']} log rows, skipped "
            f"{log_summary['rows_skipped'] or 'none'}"
        )
    pa.default_memory_pool().release_unused()  # batches are gone; give their pages back
    matrix, user_ids, times = _build_matrix(triplets, encoder, len(inputs.catalog.ids))
    summary = _summary(inputs, matrix, log_summary, reaction_summary, encoder, until)
    users = IdMap(user_ids)
    items = IdMap(str(s) for s in inputs.catalog.ids.to_pylist())
    summary["seconds"] = round(time.perf_counter() - started, 3)
    _log_summary(summary)
    meta = _video_meta(inputs.catalog, matrix)
    return Interactions(
        matrix=matrix, users=users, items=items, videos=meta, summary=summary, times=times
    )


@dataclass
class _Inputs:
    """Every input file resolved and opened, and the video catalogue read."""

    log_paths: list[Path]
    video_paths: list[Path]
    reaction_paths: list[Path]
    catalog: VideoCatalog
    lookup: ItemLookup
    logs: list[tuple[Path, pq.ParquetFile, dict[str, str], str]]
    reactions: list[tuple[Path, pq.ParquetFile, dict[str, str]]]

    @classmethod
    def open(
        cls,
        logs: PathSpec,
        videos: PathSpec,
        reactions: PathSpec | None,
        mapping: ColumnMapping,
        duration_unit: DurationUnit,
        until: datetime | None,
        with_times: bool = False,
    ) -> _Inputs:
        log_paths = resolve_paths(logs, what="logs")
        video_paths = resolve_paths(videos, what="videos")
        reaction_paths = resolve_paths(reactions, what="reactions") if reactions is not None else []
        catalog = read_videos(video_paths, mapping, duration_unit)
        lookup = ItemLookup(catalog.ids)
        pa.default_memory_pool().release_unused()  # the metadata tables are gone
        return cls(
            log_paths=log_paths,
            video_paths=video_paths,
            reaction_paths=reaction_paths,
            catalog=catalog,
            lookup=lookup,
            logs=_open_logs(log_paths, mapping, until, with_times),
            reactions=_open_reactions(reaction_paths, mapping, until, with_times),
        )

    def log_rows(self) -> int:
        return int(sum(pf.metadata.num_rows for _, pf, _, _ in self.logs))

    def capacity(self) -> int:
        """Rows of every log and reaction file: the most triplets ingest can keep."""
        return self.log_rows() + int(sum(pf.metadata.num_rows for _, pf, _ in self.reactions))


def _stream_inputs(
    inputs: _Inputs,
    weights: Weights,
    until: datetime | None,
    encoder: UserEncoder,
    triplets: _Triplets,
    *,
    batch_size: int,
    progress: bool,
    with_times: bool = False,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Stream the logs, then the reactions, into ``triplets``: the summary of each."""
    log_files = [
        (path, pf, [cols["log_user"], cols["log_video"], cols["log_watchtime"]]
         + ([cols["log_timestamp"]] if until is not None or with_times else []))
        for path, pf, cols, _ in inputs.logs
    ]  # fmt: skip
    with tqdm(
        total=inputs.log_rows(), unit="rows", unit_scale=True, desc="ingest", disable=not progress
    ) as bar:
        log_summary = _stream(
            log_files,
            "logs",
            LogPrep(inputs.lookup, inputs.catalog.duration_s, weights, until, encoder, with_times),
            encoder,
            triplets,
            batch_size=batch_size,
            reasons=LOG_REASONS,
            bar=bar,
        )
    if not inputs.reactions:
        return log_summary, None
    reaction_files = [
        (path, pf, [cols["reaction_user"], cols["reaction_video"], cols["reaction_action"]]
         + ([cols["reaction_timestamp"]] if until is not None or with_times else []))
        for path, pf, cols in inputs.reactions
    ]  # fmt: skip
    reaction_summary = _stream(
        reaction_files,
        "reactions",
        ReactionPrep(inputs.lookup, weights, until, encoder, with_times),
        encoder,
        triplets,
        batch_size=batch_size,
        reasons=REACTION_REASONS,
    )
    return log_summary, reaction_summary


def _video_meta(catalog: VideoCatalog, matrix: sp.csr_matrix) -> VideoMeta:
    """The catalogue's metadata, with popularity: users with a positive value per video."""
    positive = matrix.data > 0
    popularity = np.bincount(matrix.indices[positive], minlength=matrix.shape[1])
    return VideoMeta(
        duration_s=catalog.duration_s,
        category=catalog.category,
        author=catalog.author,
        popularity=popularity.astype(np.float32),
        categories=catalog.categories,
        authors=catalog.authors,
    )


def _summary(
    inputs: _Inputs,
    matrix: sp.csr_matrix,
    log_summary: dict[str, Any],
    reaction_summary: dict[str, Any] | None,
    encoder: UserEncoder,
    until: datetime | None,
) -> dict[str, Any]:
    """What ingest read, used and skipped, for the model manifest and the log."""
    layouts = sorted({layout for _, _, _, layout in inputs.logs})
    catalog = inputs.catalog
    return {
        "layout": layouts[0] if len(layouts) == 1 else layouts,
        "files": {
            "logs": [str(p) for p in inputs.log_paths],
            "videos": [str(p) for p in inputs.video_paths],
            "reactions": [str(p) for p in inputs.reaction_paths],
        },
        **log_summary,
        "reactions": reaction_summary,
        "videos": catalog.summary,
        "duration_unit": catalog.summary["duration_unit"],
        "duration_unit_source": catalog.summary["duration_unit_source"],
        "users": matrix.shape[0],
        "items": matrix.shape[1],
        "nnz": int(matrix.nnz),
        "id_mapping": {"users": encoder.mode, "videos": inputs.lookup.mode},
        "event_time": time_range(
            [
                (p, pf, c["log_timestamp"] if c["log_timestamp"] in pf.schema_arrow.names else None)
                for p, pf, c, _ in inputs.logs
            ]
        ),
        "until": None if until is None else until.isoformat(),
    }


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
    triplets: _Triplets, encoder: UserEncoder, n_items: int
) -> tuple[sp.csr_matrix, list[str], npt.NDArray[np.int64] | None]:
    """CSR from the triplets, which are freed on the way (the CSR is the only copy kept);
    with times kept, also each entry's latest event time, aligned with the CSR's data."""
    n = triplets.n
    times = _latest_times(triplets, n_items) if len(triplets.times) else None
    coo = sp.coo_matrix(
        (triplets.vals[:n], (triplets.rows[:n], triplets.cols[:n])), shape=(encoder.n, n_items)
    )
    triplets.free()
    matrix = coo.tocsr()  # sums duplicates; canonical: by row, then column
    del coo
    if times is not None:
        if len(times) != matrix.nnz:  # pragma: no cover - scipy's canonical form
            raise AssertionError("event times do not align with the matrix entries")
        times = times[matrix.data != 0]
    matrix.eliminate_zeros()  # a like and a dislike of the same size cancel out
    ids = encoder.ids()
    pa.default_memory_pool().release_unused()  # the Arrow copy of the ids is gone
    return matrix, ids, times


def _latest_times(triplets: _Triplets, n_items: int) -> npt.NDArray[np.int64]:
    """The latest event time of each distinct (row, column), in CSR order (row, then column)."""
    n = triplets.n
    key = triplets.rows[:n].astype(np.int64) * n_items + triplets.cols[:n]
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    out: npt.NDArray[np.int64] = np.maximum.reduceat(triplets.times[:n][order], starts)
    return out
