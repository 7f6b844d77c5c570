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

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.core.als import I64
from worker.core.wire import (
    TOP_K,
)
from worker.eval.events import (
    _US,
    FOLDIN,
    FOLDIN_INPROCESS,
    POPULARITY,
    RETRAIN,
    RETRAIN_NOFOLDIN,
    STATIC,
    VARIANT_DESCRIPTIONS,
    VARIANTS,
    Request,
    command_line,
    iso_time,
)
from worker.eval.live import LiveResult, batched_requests, replay_live
from worker.eval.metrics import (
    METRIC_DEFINITIONS,
    cluster_bootstrap,
    percentiles,
)
from worker.eval.prepare import Prepared, ReplayOptions, keep_model, prepare
from worker.eval.scoring import Scored, score_variants, summarise, time_series
from worker.eval.variants import InProcessOptions, Relevance, run_in_process

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]


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
    """The run after :func:`prepare`: live replay, in-process variants, scoring, report."""
    timings = dict(prep.timings)
    retrain_every = _retrain_every(opts, prep.end - prep.split)
    live = _run_live(opts, prep, timings)
    requests = (
        live.requests
        if live is not None
        else batched_requests(prep.table, prep.split, prep.end, opts.batch)
    )
    lists, checked = _run_variants(opts, prep, requests, retrain_every, live, timings)
    sc = _score(opts, prep, requests, lists)
    report: dict[str, Any] = {
        "kind": "replay",
        "command": opts.command or command_line(),
        "created_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        "data": _data_section(prep, sc),
        "model": _model_section(prep),
        "settings": _settings_section(opts, prep, retrain_every),
        "variants": sc.variants,
        "segments": {
            "known_users": summarise(sc.scored, sc.mask, sc.catalog_size, TOP_K, sc.is_known),
            "new_users": summarise(sc.scored, sc.mask, sc.catalog_size, TOP_K, ~sc.is_known),
        },
        "lists": {
            "total": len(requests),
            "scored": int(sc.mask.sum()),
            "unscored_no_relevant": int((~sc.mask).sum()),
        },
        "timeseries": time_series(prep.table, prep.split, requests, sc.scored, sc.mask),
        "definitions": _definitions(opts),
    }
    report.update(_foldin_comparisons(sc, opts.seed))
    if live is not None:
        report.update(_live_sections(opts, live, requests, lists, checked))
    if opts.simulation is not None:
        from worker.eval.simulate import run_simulation

        t0 = time.monotonic()
        report["simulation"] = run_simulation(prep, opts.simulation)
        timings["simulation_s"] = time.monotonic() - t0
    report["timings_s"] = timings
    return report, None if live is None else live.event_latency_ms


def _retrain_every(opts: ReplayOptions, n: int) -> int:
    """Replayed events between two retrains of the oracle (a fraction of ``n`` below 1)."""
    if 0 < opts.retrain_every < 1:
        return math.ceil(n * opts.retrain_every)
    return int(opts.retrain_every)


def _run_live(opts: ReplayOptions, prep: Prepared, timings: dict[str, float]) -> LiveResult | None:
    """The events after the split through Kafka to the live workers (None without Kafka)."""
    if not opts.live:
        return None
    t0 = time.monotonic()
    live = replay_live(
        prep.table,
        prep.split,
        prep.end,
        model_dir=prep.model_dir,
        model=prep.model,
        bootstrap_servers=opts.bootstrap_servers,
        max_in_flight=opts.max_in_flight,
        rate=opts.rate,
        log_path=opts.out / "worker.log",
        durable=opts.durable,
        stall_s=opts.stall_s,
        progress=opts.progress,
        workers=opts.workers,
        partitions=opts.partitions,
        popularity_half_life_s=prep.half_life_us / _US,
    )
    timings["live_replay_s"] = time.monotonic() - t0
    return live


def _run_variants(
    opts: ReplayOptions,
    prep: Prepared,
    requests: list[Request],
    retrain_every: int,
    live: LiveResult | None,
    timings: dict[str, float],
) -> tuple[dict[str, list[list[int]]], list[list[int]] | None]:
    """Every variant's list at every request point, and the in-process check's lists."""
    table = prep.table
    t0 = time.monotonic()
    lists, inproc_timings = run_in_process(
        table,
        prep.split,
        prep.end,
        prep.model,
        requests,
        InProcessOptions(
            k=TOP_K,
            retrain_every=retrain_every,
            half_life_us=prep.half_life_us,
            positive_fraction=opts.positive_fraction,
            weights=prep.weights,
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
    return lists, checked


@dataclass
class _Scoring:
    """The variants' lists scored at the request points."""

    scored: dict[str, Scored]
    mask: npt.NDArray[np.bool_]  # request points with a relevant video
    variants: dict[str, dict[str, Any]]
    users_of: I64  # the user of each scored request point
    is_known: npt.NDArray[np.bool_]  # per request point: a user the model was trained on
    known: npt.NDArray[np.bool_]  # per user of the table
    replay_videos: set[str]
    catalog_size: int


def _score(
    opts: ReplayOptions,
    prep: Prepared,
    requests: list[Request],
    lists: dict[str, list[list[int]]],
) -> _Scoring:
    table, split, end, model = prep.table, prep.split, prep.end, prep.model
    relevance = Relevance.build(
        table,
        split,
        end,
        positive_fraction=opts.positive_fraction,
        default_duration_s=prep.weights.default_duration_s,
        horizon_events=opts.horizon_events,
        horizon_seconds=opts.horizon_seconds,
    )
    scored, mask = score_variants(table, split, requests, lists, relevance, TOP_K)
    known = np.array([u in model.users for u in table.user_ids], dtype=bool)
    replay_videos = {table.video_ids[int(v)] for v in np.unique(table.video[split:end])}
    catalog_size = len(set(model.items.ids) | replay_videos)
    is_known = np.array([known[r.user] for r in requests], dtype=bool)
    scored = {name: scored[name] for name in VARIANTS if name in scored}
    variants = summarise(scored, mask, catalog_size, TOP_K)
    users_of = np.array([r.user for r in requests], dtype=np.int64)[mask]
    for name, row in variants.items():
        row["description"] = VARIANT_DESCRIPTIONS[name]
        row["lists_total"] = len(requests)
        if mask.any():
            ndcg = scored[name].scores["ndcg_at_10"][mask]
            row["ndcg_at_10_ci95"] = list(cluster_bootstrap(ndcg, users_of, seed=opts.seed))
    return _Scoring(scored, mask, variants, users_of, is_known, known, replay_videos, catalog_size)


def _data_section(prep: Prepared, sc: _Scoring) -> dict[str, Any]:
    table, split, end, model = prep.table, prep.split, prep.end, prep.model
    replay_users = table.user[split:end]
    return {
        **table.summary,
        "split_index": split,
        "split_time": iso_time(int(table.ts[split])),
        "train_events": split,
        "replay_events": end - split,
        "replay_events_available": len(table) - split,
        "replay_first_event": iso_time(int(table.ts[split])),
        "replay_last_event": iso_time(int(table.ts[end - 1])),
        "replay_users": int(np.unique(replay_users).size),
        "replay_users_known_to_model": int(np.unique(replay_users[sc.known[replay_users]]).size),
        "replay_videos_new_to_model": len(sc.replay_videos - set(model.items.ids)),
        "catalog_size": sc.catalog_size,
    }


def _model_section(prep: Prepared) -> dict[str, Any]:
    model = prep.model
    return {
        "version": model.version,
        "trained_here": prep.trained,
        "path": None if prep.trained else str(prep.model_dir),
        "users": model.n_users,
        "videos": model.n_items,
        "factors": model.params.factors,
        "regularization": model.params.regularization,
        "alpha": model.params.alpha,
        "iterations": model.params.iterations,
    }


def _settings_section(opts: ReplayOptions, prep: Prepared, retrain_every: int) -> dict[str, Any]:
    weights = prep.weights
    return {
        "k": TOP_K,
        "horizon_events": opts.horizon_events,
        "horizon_seconds": opts.horizon_seconds,
        "positive_fraction": opts.positive_fraction,
        "retrain_every_events": retrain_every,
        "popularity_half_life_s": prep.half_life_us / _US,
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
    }


def _definitions(opts: ReplayOptions) -> dict[str, Any]:
    return {
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
    }


def _foldin_comparisons(sc: _Scoring, seed: int) -> dict[str, Any]:
    """Fold-in against each baseline: NDCG@10 ratios and paired differences."""
    out: dict[str, Any] = {}
    v, scored, mask, users_of = sc.variants, sc.scored, sc.mask, sc.users_of
    if FOLDIN in v and RETRAIN in v and v[RETRAIN]["ndcg_at_10"]:
        out["foldin_vs_retrain"] = {
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
        out["foldin_ndcg_difference"] = {
            name: {
                "difference": float(np.mean(base - scored[name].scores["ndcg_at_10"][mask])),
                "ci95": list(
                    cluster_bootstrap(
                        base - scored[name].scores["ndcg_at_10"][mask], users_of, seed=seed
                    )
                ),
            }
            for name in (POPULARITY, STATIC, RETRAIN_NOFOLDIN, RETRAIN)
            if name in scored
        }
        out["foldin_ndcg_difference"]["definition"] = (
            "mean over scored lists of fold-in's NDCG@10 minus the baseline's at the same "
            "request point, with a 95% interval from a bootstrap that resamples users (a "
            "user's lists are not independent); an interval above 0 means fold-in is better"
        )
    if FOLDIN in v:
        out["foldin_vs_baselines"] = {
            name: (
                v[FOLDIN]["ndcg_at_10"] / v[name]["ndcg_at_10"] if v[name]["ndcg_at_10"] else None
            )
            for name in (POPULARITY, STATIC, RETRAIN_NOFOLDIN, RETRAIN)
            if name in v
        }
    return out


def _live_sections(
    opts: ReplayOptions,
    live: LiveResult,
    requests: list[Request],
    lists: dict[str, list[list[int]]],
    checked: list[list[int]] | None,
) -> dict[str, Any]:
    """Latency, the live run, cold-start lists against popularity, the in-process check."""
    out: dict[str, Any] = {}
    lat = live.event_latency_ms
    out["latency_ms"] = {
        **percentiles(lat),
        "mean": float(np.mean(lat)) if lat.size else None,
        "max": float(np.max(lat)) if lat.size else None,
        "events": int(lat.size),
    }
    out["latency_publish_ms"] = {
        **percentiles(live.event_publish_ms),
        "events": int(live.event_publish_ms.size),
    }
    strategies = [r.strategy for r in requests]
    out["live"] = {
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
        out["cold_start"] = {
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
        out["checks"] = {
            "foldin_live_vs_inprocess_overlap_at_10": (float(np.mean(agree)) if agree else None),
            "foldin_live_vs_inprocess_identical": (
                float(np.mean([a == b for a, b in pairs])) if pairs else None
            ),
            "lists_checked": len(pairs),
            "definition": "the worker's core engine run in-process on the same events, at "
            f"every {every}th request point: the mean share of videos the live list and "
            "the in-process list have in common, and the share of identical lists "
            "(same videos, same order)",
        }
    return out
