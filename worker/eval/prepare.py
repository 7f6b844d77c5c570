"""What a replay needs before it runs: its options, the event table, the split, and the
bootstrap model trained on the events before the split."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.core.model import AlsParams, Model
from worker.core.scoring import Weights
from worker.errors import DataError
from worker.eval.events import _US, EventTable, _dt, load_events, split_index, write_training_files

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]


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
    columns: Any = None  # worker.data.layout.ColumnMapping, for layouts bootstrap cannot detect
    train_options: dict[str, Any] = field(default_factory=dict)
    params: AlsParams | None = None  # a --params file; the fields above override it
    weights: Weights | None = None  # event weights for training and serving (None: defaults)


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
    flags = {
        name: getattr(opts, name)
        for name in ("factors", "iterations", "regularization", "alpha")
        if getattr(opts, name) is not None
    }
    if opts.params is not None:
        kw["params"] = replace(opts.params, **flags)
    else:
        kw.update(flags)
    if opts.weights is not None:
        kw["weights"] = opts.weights
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
    adopt_model_durations(table, model)
    half_life_us = popularity_half_life_us(table, split, end, opts.popularity_half_life)
    return Prepared(
        table=table,
        split=split,
        end=end,
        model=model,
        model_dir=model_dir,
        trained=trained,
        half_life_us=float(half_life_us),
        weights=opts.weights or Weights(),
        timings=timings,
    )


def adopt_model_durations(table: EventTable, model: Model) -> None:
    """The model's durations into the table: they are what the worker scores views with."""
    code_of_video = {v: i for i, v in enumerate(table.video_ids)}
    for row, vid in enumerate(model.items.ids):
        c = code_of_video.get(vid)
        d = float(model.videos.duration_s[row])
        if c is not None and math.isfinite(d) and d > 0:
            table.duration_s[c] = d


def popularity_half_life_us(
    table: EventTable, split: int, end: int, half_life_s: float | None
) -> float:
    """The popularity baseline's half-life: ``half_life_s``, or a tenth of the replayed
    span, at least an hour."""
    if half_life_s:
        return float(half_life_s * _US)
    return float(max(3600 * _US, int(table.ts[end - 1] - table.ts[split]) / 10))


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
