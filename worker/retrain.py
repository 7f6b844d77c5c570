"""``refold retrain``: train a candidate from the base logs plus the archive, gate it
against the serving model on the archive's newest slice, swap it in if it is not worse.

The steps (pure decisions in :mod:`worker.core.retrain`):

1. **Inputs.** Base ``--logs``/``--reactions``/``--videos`` plus ``ARCHIVE/logs``,
   ``ARCHIVE/reactions`` and ``ARCHIVE/videos``. With ``--since``, archive rows before
   that time are dropped first (streamed to a filtered copy in the work directory).
2. **Gate.** The holdout is the newest tenth of the archive's time span (or
   ``--holdout``). The candidate is :func:`worker.train.bootstrap` on everything
   before it (``until=``), loaded back from disk (checksums verified), and scored with
   the serving model by the replay's in-process prequential NDCG@10
   (:func:`worker.eval.tune.score_model`) on the same request points of the slice.
3. **Swap.** The gated candidate itself is what ships (what was measured is what
   serves; the holdout's events already sit in the workers' live user rows, which a
   swap keeps). Its directory is renamed into ``MODELS`` (atomic, same filesystem),
   verified again, announced on the control topic like ``refold swap``, and all but
   the ``--keep`` newest versions it wrote are deleted (never the announced one, the
   previous one, nor a model it did not write).
4. **Record.** The decision and both scores go to the log, ``gate.json`` (in the
   swapped model's directory and, for every run, ``MODELS/gate.json``) and a Prometheus
   textfile (``MODELS/retrain.prom`` unless ``--metrics-file``).

Work happens in ``MODELS/.retrain-<pid>``; a run killed with -9 leaves only that
hidden directory, which the next run deletes. Model listings skip hidden names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from worker.config import KafkaSettings
from worker.core.retrain import (
    DEFAULT_TOLERANCE,
    GateDecision,
    decide,
    holdout_start_us,
    parse_since,
    same_training,
    select_prune,
)
from worker.core.scoring import Weights
from worker.errors import DataError, ModelError
from worker.storage import read_manifest

log = logging.getLogger(__name__)

WORK_PREFIX = ".retrain-"


@dataclass
class RetrainOptions:
    """Everything ``refold retrain`` takes (see the CLI help for each)."""

    logs: list[str]
    videos: str
    archive: Path
    models: Path
    reactions: str | None = None
    since: str | None = None
    current: Path | None = None
    params: str | None = None
    keep: int = 3
    tolerance: float = DEFAULT_TOLERANCE
    holdout: str | None = None  # a duration; None: the archive's newest tenth
    metrics_file: Path | None = None
    threads: int = 0
    seed: int = 0
    corrupt_candidate: bool = False  # tests only: flip a byte of the candidate
    extra: dict[str, Any] = field(default_factory=dict)


# ---- model directory listing -------------------------------------------------------------------


def list_versions(models: Path) -> list[tuple[str, str]]:
    """``(name, created_at)`` of every valid model directory under ``models`` (hidden
    names and directories whose manifest does not verify are skipped)."""
    out: list[tuple[str, str]] = []
    if not models.is_dir():
        return out
    for p in models.iterdir():
        if p.name.startswith(".") or not p.is_dir():
            continue
        try:
            out.append((p.name, str(read_manifest(p).get("created_at", ""))))
        except ModelError:
            continue
    return out


def newest_valid(models: Path) -> Path | None:
    """The newest model under ``models`` whose every file verifies (what workers serve)."""
    from worker.storage import load_model

    for name, _ in sorted(list_versions(models), key=lambda v: (v[1], v[0]), reverse=True):
        try:
            load_model(models / name)
        except ModelError as exc:
            log.warning("skipping %s: %s", models / name, exc)
            continue
        return models / name
    return None


def clean_stale_work(models: Path) -> None:
    """Delete work directories of runs that died (kill -9): ``.retrain-<pid>`` whose
    process is gone, and storage's own ``.*.tmp-*`` leftovers."""
    for p in models.glob(f"{WORK_PREFIX}*"):
        pid = p.name[len(WORK_PREFIX) :]
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue
        log.info("removing stale work directory %s", p)
        shutil.rmtree(p, ignore_errors=True)
    for p in models.glob(".*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- inputs ------------------------------------------------------------------------------------


def _archive_part(archive: Path, name: str) -> list[str]:
    d = archive / name
    return [str(d)] if d.is_dir() and any(d.rglob("*.parquet")) else []


def _filtered_copy(src: list[str], column: str, since: datetime, out: Path) -> list[str]:
    """Rows of ``src`` at or after ``since``, streamed batch by batch into ``out``."""
    from worker.data.layout import resolve_paths

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(resolve_paths(src, what="archive")):
        pf = pq.ParquetFile(path)
        target = out / f"{i:05d}.parquet"
        writer = None
        try:
            for batch in pf.iter_batches(batch_size=200_000):
                col = batch.column(batch.schema.get_field_index(column))
                keep = pc.greater_equal(col, pc.cast(since, col.type))
                part = batch.filter(pc.fill_null(keep, True))
                if writer is None:
                    writer = pq.ParquetWriter(target, batch.schema)
                writer.write_batch(part)
        finally:
            if writer is not None:
                writer.close()
        if writer is not None:
            written.append(str(target))
    return written


def _time_range_us(paths: list[str], column: str) -> tuple[int, int] | None:
    """Earliest and latest ``column`` (µs) over ``paths``, one column batch at a time."""
    from worker.data.layout import resolve_paths

    lo = hi = None
    for path in resolve_paths(paths, what="archive"):
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=500_000, columns=[column]):
            mm = pc.min_max(batch.column(0)).as_py()
            if mm["min"] is None:
                continue
            a, b = _us(mm["min"]), _us(mm["max"])
            lo = a if lo is None else min(lo, a)
            hi = b if hi is None else max(hi, b)
    return None if lo is None or hi is None else (lo, hi)


def _us(t: datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return int(t.timestamp() * 1_000_000)


# ---- one run -----------------------------------------------------------------------------------


@dataclass
class _Inputs:
    logs: list[str]
    reactions: list[str]
    videos: list[str]
    archive_logs: list[str]


def _inputs(opts: RetrainOptions, work: Path) -> _Inputs:
    a_logs = _archive_part(opts.archive, "logs")
    a_reacts = _archive_part(opts.archive, "reactions")
    if not a_logs:
        raise DataError(f"archive {opts.archive}: no logs/*.parquet")
    if opts.since:
        since = parse_since(opts.since, datetime.now(timezone.utc))
        log.info("archive events from %s on", since.isoformat())
        a_logs = _filtered_copy(a_logs, "event_timestamp", since, work / "since" / "logs")
        if a_reacts:
            a_reacts = _filtered_copy(a_reacts, "ts", since, work / "since" / "reactions")
    return _Inputs(
        logs=[*opts.logs, *a_logs],
        reactions=([opts.reactions] if opts.reactions else []) + a_reacts,
        videos=[opts.videos, *_archive_part(opts.archive, "videos")],
        archive_logs=a_logs,
    )


def run_once(opts: RetrainOptions, kafka: KafkaSettings, control_topic: str) -> dict[str, Any]:
    """One retrain: inputs, gated candidate, decision, swap. Returns the gate document."""
    from worker.core.retrain import parse_duration
    from worker.eval.events import load_events
    from worker.eval.metrics import cluster_bootstrap
    from worker.eval.tune import TuneOptions, score_model
    from worker.storage import load_model
    from worker.train import bootstrap, read_params

    started = time.monotonic()
    models = opts.models
    models.mkdir(parents=True, exist_ok=True)
    clean_stale_work(models)
    current = opts.current or newest_valid(models)
    params, weights = (None, None) if opts.params is None else read_params(opts.params)
    weights = weights or Weights()
    work = models / f"{WORK_PREFIX}{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        inp = _inputs(opts, work)
        span = _time_range_us(inp.archive_logs, "event_timestamp")
        if span is None:
            raise DataError(f"archive {opts.archive}: no event in the window")
        holdout_us = holdout_start_us(
            *span,
            fraction=None,
            duration_s=parse_duration(opts.holdout) if opts.holdout else None,
        )
        holdout_at = datetime.fromtimestamp(holdout_us / 1e6, timezone.utc)
        log.info("holdout: events from %s on; candidate trains on the rest", holdout_at)
        cand_dir = work / "candidate"
        kw: dict[str, Any] = {"weights": weights, "threads": opts.threads, "gpu": "auto"}
        if params is not None:
            kw["params"] = params
        bootstrap(inp.logs, inp.videos, cand_dir, reactions=inp.reactions or None,
                  until=holdout_at, progress=False, **kw)  # fmt: skip
        if opts.corrupt_candidate:
            _flip_byte(cand_dir / "item_factors.npy")
        table = load_events(inp.logs, opts.videos, inp.reactions or None)
        split = int(np.searchsorted(table.ts, holdout_us, side="left"))
        end = len(table)
        tune_opts = TuneOptions(logs=inp.logs, videos=opts.videos, out=work, progress=False,
                                seed=opts.seed, threads=opts.threads)  # fmt: skip
        cand_error = cand_score = cur_score = None
        try:
            cand_model = load_model(cand_dir)
            cand_score = score_model(table, split, end, cand_model, weights, tune_opts)
        except ModelError as exc:
            cand_error = str(exc)
            cand_model = None
        if current is not None:
            cur_score = score_model(table, split, end, load_model(current), weights, tune_opts)
        current_version = load_model(current).version if current else None
        decision = decide(
            cand_score.ndcg if cand_score else None,
            cur_score.ndcg if cur_score else None,
            opts.tolerance,
            candidate_error=cand_error,
            lists_scored=int(cand_score.foldin.size) if cand_score else 0,
            unchanged=cand_model is not None and same_training(cand_model.version, current_version),
        )
        doc: dict[str, Any] = {
            "decision": "swap" if decision.swap else "refuse",
            **asdict(decision),
            "candidate_version": cand_model.version if cand_model else None,
            "current_model": str(current) if current else None,
            "current_version": current_version,
            "holdout_start": holdout_at.isoformat(),
            "holdout_events": end - split,
            "train_events_before_holdout": split,
            "lists_scored": int(cand_score.foldin.size) if cand_score else 0,
            "created_at": datetime.now(timezone.utc).isoformat(),
        }
        if cand_score is not None and cur_score is not None and cand_score.foldin.size:
            diff = cand_score.foldin - cur_score.foldin
            doc["candidate_minus_current_ci95"] = list(
                cluster_bootstrap(diff, cand_score.users, seed=opts.seed)
            )
            doc["candidate_ci95"] = list(cluster_bootstrap(cand_score.foldin, cand_score.users))
            doc["current_ci95"] = list(cluster_bootstrap(cur_score.foldin, cur_score.users))
        log.info("gate: %s: %s", doc["decision"], decision.reason)
        if decision.swap and cand_model is not None:
            target = _swap(cand_dir, models, doc, kafka, control_topic, current, opts.keep)
            doc["model_dir"] = str(target)
        doc["seconds"] = round(time.monotonic() - started, 3)
        _write_json(models / "gate.json", doc)
        _write_metrics(opts.metrics_file or models / "retrain.prom", decision, doc)
        return doc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _swap(
    cand_dir: Path,
    models: Path,
    doc: dict[str, Any],
    kafka: KafkaSettings,
    control_topic: str,
    current: Path | None,
    keep: int,
) -> Path:
    """Rename the candidate into ``models``, verify it there, announce it, prune."""
    from worker.kafkaio import announce_model
    from worker.storage import load_model

    (cand_dir / "gate.json").write_text(json.dumps(doc, indent=2) + "\n")
    target = models / str(doc["candidate_version"])
    if target.exists():
        raise ModelError(f"{target} exists already; not overwriting a served version")
    os.replace(cand_dir, target)
    try:
        load_model(target)  # the bytes that will be served verify, or nothing is announced
    except ModelError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    sent = announce_model(kafka, control_topic, target)
    log.info("announced %s on %s", sent, control_topic)
    protect = {target.name} | ({current.name} if current and current.parent == models else set())
    # Only versions retrain wrote (they hold gate.json) are pruned: a model an operator
    # bootstrapped (compose's /models/current, a worker's REFOLD_MODEL) is never deleted.
    ours = [v for v in list_versions(models) if (models / v[0] / "gate.json").is_file()]
    for name in select_prune(ours, keep, protect):
        log.info("pruning old model %s", models / name)
        shutil.rmtree(models / name, ignore_errors=True)
    return target


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _write_metrics(path: Path, decision: GateDecision, doc: dict[str, Any]) -> None:
    """The run as a Prometheus textfile-collector file (written atomically)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    reg = CollectorRegistry()
    nan = float("nan")
    values = {
        "candidate_ndcg_at_10": ("Candidate NDCG@10 on the holdout", decision.candidate_ndcg),
        "current_ndcg_at_10": ("Serving model NDCG@10 on the holdout", decision.current_ndcg),
        "swapped": ("1 if the last run swapped its candidate in", float(decision.swap)),
        "tolerance": ("Gate tolerance (absolute NDCG@10)", decision.tolerance),
        "duration_seconds": ("Wall time of the last run", float(doc.get("seconds", 0.0))),
        "last_run_timestamp_seconds": ("When the last run ended", time.time()),
    }
    for name, (text, value) in values.items():
        Gauge(f"refold_retrain_{name}", text, registry=reg).set(nan if value is None else value)
    write_to_textfile(str(path), reg)


def run(opts: RetrainOptions, kafka: KafkaSettings, control_topic: str,
        every_s: float | None, stopping: threading.Event) -> int:  # fmt: skip
    """Once (cron), or every ``every_s`` seconds until ``stopping`` is set."""
    while True:
        t0 = time.monotonic()
        doc = run_once(opts, kafka, control_topic)
        keys = ("decision", "reason", "candidate_ndcg", "current_ndcg", "model_dir")
        print(json.dumps({k: doc.get(k) for k in keys}), flush=True)
        if every_s is None:
            return 0
        if stopping.wait(max(0.0, every_s - (time.monotonic() - t0))):
            return 0
