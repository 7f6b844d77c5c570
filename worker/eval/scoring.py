"""Scoring the variants' lists at the request points: per-list metrics, summaries with
user-resampled intervals, and metrics over replay time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.eval.events import _SCORE_FIELD, METRIC_KEYS, TIME_BINS, EventTable, Request, iso_time
from worker.eval.metrics import (
    coverage,
    score_list,
)
from worker.eval.variants import Relevance

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]


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
