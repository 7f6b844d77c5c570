"""Bootstrap training: Parquet logs → ingest → implicit ALS → final user solve → model directory.

:func:`bootstrap` is what ``refold bootstrap`` runs. The steps:

1. :func:`worker.data.ingest.build_interactions` streams the logs into the users ×
   videos value matrix (values before ``alpha``);
2. :func:`train_factors` fits implicit's ``AlternatingLeastSquares`` (its own
   factory; the GPU solver when asked or when CUDA is present) with BLAS limited to
   one thread, as implicit requires for its own parallelism;
3. :func:`solve_users` recomputes every user's factors **exactly** against the final
   item factors (implicit's Cholesky ``recalculate_user``, the same normal
   equations as :func:`worker.core.als.fold_in`). The CG solver implicit fits with
   is approximate and its last user step saw the previous item factors; after this
   step a worker folding in a user's unchanged stored row gets back that user's
   stored factors, so the bootstrap and the live fold-in agree;
4. :func:`worker.storage.save_model` writes the versioned directory atomically,
   with the ingest summary, the parameters and the timings in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import implicit
import implicit.gpu
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from worker.core.als import Confidence, confidence
from worker.core.decay import decay_matrix
from worker.core.ids import IdMap
from worker.core.model import AlsParams, Model, VideoMeta
from worker.core.scoring import Weights
from worker.core.wire import is_valid_id
from worker.data.ingest import Interactions, build_interactions
from worker.data.layout import ColumnMapping, DurationUnit, PathSpec
from worker.errors import ConfigError
from worker.storage import read_manifest, save_model

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
GpuMode = Literal["auto", "on", "off"]

#: Defaults chosen on the synthetic data (worker.data.synth): train on the first 24
#: of 30 days, rank for the last 6, precision@10 of the videos a user watched next
#: (unseen ones only), 64 factors, 15 iterations. On 20k users x 4k videos x 600k
#: views: popularity 0.0096; ALS 0.0236 (reg 10) / 0.0237 (reg 30) / 0.0249 (reg 100)
#: at alpha 10, and alpha 3/5/10/20 within 0.022-0.025; the oracle (planted tastes)
#: reaches 0.035. Regularization 30 sits on the plateau, away from the collapse seen
#: at 300 with alpha 5 (precision fell to popularity's level). Values are watched
#: fractions (median 0.62, 10th percentile 0.08) plus reactions, so alpha = 10 keeps
#: alpha * value >= 1 for the typical view: implicit weighs an observed item with
#: confidence below 1 *less* than a missing one.
DEFAULT_FACTORS = 64
DEFAULT_ITERATIONS = 15
#: Replay evaluation (prequential NDCG@10, live fold-in, in-process) then moved the
#: defaults: on ml-latest-small alpha 10 / reg 30 gave 0.050 (below time-aware
#: popularity, 0.053), alpha 3 / reg 1 gave 0.057 and alpha 1 / reg 0.1 gave 0.060;
#: on synthetic data (8k users) the same three gave 0.155, 0.152 and 0.146. Alpha 3 /
#: reg 1 is the compromise: it beats popularity on real data and is within 2% of the
#: best on planted tastes.
DEFAULT_REGULARIZATION = 1.0
DEFAULT_ALPHA = 3.0
#: Seed of implicit's initial factors, fixed so that a retrain on the same data and
#: parameters gives the same model.
RANDOM_STATE = 42


def use_gpu(gpu: GpuMode) -> bool:
    """Whether to fit on the GPU: ``on`` requires CUDA, ``auto`` uses it when present."""
    if gpu == "off":
        return False
    if gpu == "on":
        if not implicit.gpu.HAS_CUDA:
            raise ConfigError("gpu='on' but implicit was built without CUDA (or no GPU found)")
        return True
    if gpu == "auto":
        return bool(implicit.gpu.HAS_CUDA)
    raise ConfigError(f"gpu must be auto, on or off, not {gpu!r}")


def _to_numpy(factors: Any) -> F32:
    """implicit's factors as float32 numpy (GPU models hold ``implicit.gpu.Matrix``)."""
    if hasattr(factors, "to_numpy"):
        factors = factors.to_numpy()
    return np.ascontiguousarray(factors, dtype=np.float32)


def implicit_input(
    matrix: sp.csr_matrix, params: AlsParams, times: npt.NDArray[np.int64] | None = None
) -> tuple[sp.csr_matrix, float]:
    """The matrix and alpha to give implicit so that its solve is :func:`fold_in`'s.

    ``times`` (aligned with ``matrix.data``) decays every row first, as the live fold-in
    decays a user's row (:func:`worker.core.decay.decay_matrix`; none without times).

    implicit's confidence is ``alpha * value``; the ``"implicit"`` mode passes the values
    through. Any other mode passes the confidences themselves
    (:func:`worker.core.als.confidence`) with ``alpha = 1``, so both sides compute the
    same numbers (no ``(1 + a v) / a * a`` rounding).
    """
    matrix = decay_matrix(matrix, times, params.decay, params.decay_half_life)
    if params.confidence == "implicit":
        return matrix, params.alpha
    out = matrix.tocsr(copy=True)
    out.data = confidence(out.data, params.alpha, params.confidence).astype(np.float32)
    return out, 1.0


def train_factors(
    matrix: sp.csr_matrix,
    params: AlsParams,
    threads: int = 0,
    gpu: GpuMode = "auto",
    *,
    random_state: int = RANDOM_STATE,
    progress: bool = False,
    times: npt.NDArray[np.int64] | None = None,
) -> tuple[F32, F32, float]:
    """Fit implicit's ALS on a users × items value matrix (``alpha`` is applied by implicit).

    Returns ``(user_factors, item_factors, fit_seconds)``; the user factors are
    implicit's own (see :func:`solve_users` for the exact ones). ``threads`` is
    implicit's ``num_threads`` (0: every core).
    """
    on_gpu = use_gpu(gpu)
    matrix, alpha = implicit_input(matrix, params, times)
    # implicit checks the BLAS threads when the model is built: build it inside the limit.
    with threadpool_limits(1, "blas"):
        model = implicit.als.AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=alpha,
            iterations=params.iterations,
            use_gpu=on_gpu,
            num_threads=threads,
            random_state=random_state,
        )
        started = time.perf_counter()
        model.fit(matrix, show_progress=progress)
        seconds = time.perf_counter() - started
    return _to_numpy(model.user_factors), _to_numpy(model.item_factors), seconds


def solve_users(
    matrix: sp.csr_matrix,
    item_factors: F32,
    params: AlsParams,
    threads: int = 0,
    times: npt.NDArray[np.int64] | None = None,
) -> F32:
    """Exact ALS user factors for every row of ``matrix`` against fixed ``item_factors``.

    implicit's Cholesky ``recalculate_user`` on the CPU: the normal equations of
    :func:`worker.core.als.fold_in` (agreement within float32 rounding), in parallel.
    """
    matrix, alpha = implicit_input(matrix, params, times)
    with threadpool_limits(1, "blas"):
        solver = implicit.cpu.als.AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=alpha,
            num_threads=threads,
        )
        solver.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
        users = solver.recalculate_user(np.arange(matrix.shape[0]), matrix)
    return np.ascontiguousarray(users, dtype=np.float32)


def make_version(matrix: sp.csr_matrix, params: AlsParams, now: datetime | None = None) -> str:
    """``20261129T101500Z-<8 hex>``: the UTC time, and a hash of the data and parameters."""
    now = now or datetime.now(timezone.utc)
    h = hashlib.blake2b(digest_size=4)
    h.update(repr((params, matrix.shape)).encode())
    for array in (matrix.indptr, matrix.indices, matrix.data):
        h.update(np.ascontiguousarray(array).tobytes())
    return f"{now.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{h.hexdigest()}"


def drop_invalid_ids(data: Interactions) -> Interactions:
    """Drop users and videos whose ids could not travel on the wire, and count them.

    Ids end up in Kafka keys, headers and logs; the wire accepts 1-128 printable
    characters. Their rows are counted under ``skipped`` in the data summary.
    """
    bad_users = [i for i, u in enumerate(data.users.ids) if not is_valid_id(u)]
    bad_items = [i for i, v in enumerate(data.items.ids) if not is_valid_id(v)]
    if not bad_users and not bad_items:
        return data
    keep_u = np.setdiff1d(np.arange(len(data.users)), bad_users)
    keep_i = np.setdiff1d(np.arange(len(data.items)), bad_items)
    matrix = data.matrix.tocsr()
    times = data.times
    if times is not None:  # carry each entry's time through the same selection
        where = sp.csr_matrix(
            (np.arange(1, matrix.nnz + 1, dtype=np.int64), matrix.indices, matrix.indptr),
            shape=matrix.shape,
        )[keep_u][:, keep_i].tocsr()
        where.sort_indices()
    dropped = int(matrix[bad_users].nnz) if bad_users else 0
    matrix = matrix[keep_u]
    dropped += int(matrix[:, bad_items].nnz) if bad_items else 0
    matrix = matrix[:, keep_i].tocsr()
    matrix.sort_indices()
    if times is not None:
        times = times[where.data - 1]
    v = data.videos
    videos = VideoMeta(
        duration_s=v.duration_s[keep_i],
        category=v.category[keep_i],
        author=v.author[keep_i],
        popularity=v.popularity[keep_i],
        categories=v.categories,
        authors=v.authors,
    )
    summary = dict(data.summary)
    skipped = dict(summary.get("skipped", {}))
    skipped["invalid_id_values"] = dropped
    summary["skipped"] = skipped
    summary["invalid_ids"] = {"users": len(bad_users), "videos": len(bad_items)}
    log.warning("dropped %d users and %d videos with invalid ids", len(bad_users), len(bad_items))
    return replace(
        data,
        matrix=matrix,
        users=IdMap(data.users.id_of(int(i)) for i in keep_u),
        items=IdMap(data.items.id_of(int(i)) for i in keep_i),
        videos=videos,
        summary=summary,
        times=times,
    )


def bootstrap(
    logs: PathSpec,
    videos: PathSpec,
    out: Path,
    *,
    reactions: PathSpec | None = None,
    factors: int = DEFAULT_FACTORS,
    iterations: int = DEFAULT_ITERATIONS,
    regularization: float = DEFAULT_REGULARIZATION,
    alpha: float = DEFAULT_ALPHA,
    confidence: Confidence = "implicit",
    params: AlsParams | None = None,
    batch_size: int = 1_000_000,
    threads: int = 0,
    gpu: GpuMode = "auto",
    weights: Weights | None = None,
    mapping: ColumnMapping | None = None,
    duration_unit: DurationUnit = "auto",
    version: str | None = None,
    until: datetime | None = None,
    progress: bool = True,
) -> Model:
    """Train the base model from Parquet logs and save it to ``out``; returns the model.

    ``until`` trains on the events strictly before that time only (a prequential
    split). ``params``, when given, replaces ``factors``, ``iterations``,
    ``regularization``, ``alpha`` and ``confidence`` (a ``--params`` file, see
    :func:`read_params`). Raises :class:`~worker.errors.DataError` for unusable input and
    :class:`~worker.errors.ConfigError` for impossible settings.
    """
    if params is None:
        params = AlsParams(
            factors=factors,
            regularization=regularization,
            alpha=alpha,
            iterations=iterations,
            confidence=confidence,
        )
    factors, iterations = params.factors, params.iterations
    regularization, alpha = params.regularization, params.alpha
    if factors < 1 or iterations < 1 or regularization < 0 or alpha <= 0 or threads < 0:
        raise ConfigError(
            "factors and iterations must be >= 1, regularization >= 0, alpha > 0 and "
            "threads >= 0 (0: every core)"
        )
    on_gpu = use_gpu(gpu)  # fail before a long ingest, not after
    started = time.perf_counter()
    data = build_interactions(
        logs,
        videos,
        reactions=reactions,
        mapping=mapping,
        weights=weights,
        duration_unit=duration_unit,
        batch_size=batch_size,
        until=until,
        progress=progress,
        with_times=params.decay != "none",
    )
    data = drop_invalid_ids(data)
    log.info(
        "fitting ALS on %d users x %d videos (%d values), %s",
        data.matrix.shape[0],
        data.matrix.shape[1],
        data.matrix.nnz,
        "GPU" if on_gpu else "CPU",
    )
    _, item_factors, fit_seconds = train_factors(
        data.matrix, params, threads, "on" if on_gpu else "off", progress=progress,
        times=data.times,
    )  # fmt: skip
    solve_started = time.perf_counter()
    user_factors = solve_users(data.matrix, item_factors, params, threads, data.times)
    solve_seconds = time.perf_counter() - solve_started
    model = Model(
        version=version or make_version(data.matrix, params),
        params=params,
        user_factors=user_factors,
        item_factors=item_factors,
        users=data.users,
        items=data.items,
        user_rows=data.matrix,
        videos=data.videos,
        user_row_times=data.times,
    )
    summary: dict[str, Any] = {
        **data.summary,
        "training": {
            "device": "gpu" if on_gpu else "cpu",
            "threads": threads,
            "random_state": RANDOM_STATE,
            "ingest_seconds": data.summary["seconds"],
            "fit_seconds": round(fit_seconds, 3),
            "user_solve_seconds": round(solve_seconds, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
            "weights": _weights_dict(weights or Weights()),
        },
    }
    save_model(model, Path(out), data_summary=summary)
    log.info("model %s saved to %s", model.version, out)
    return replace(model, manifest=read_manifest(Path(out)))


def _weights_dict(w: Weights) -> dict[str, float]:
    return {
        "view": w.view,
        "like": w.like,
        "neutral": w.neutral,
        "dislike": w.dislike,
        "watch_cap": w.watch_cap,
        "default_duration_s": w.default_duration_s,
    }


def read_params(path: str | Path) -> tuple[AlsParams, Weights | None]:
    """Training parameters from a JSON file (``refold bootstrap --params``, ``refold
    replay --params``, the ``best.json`` of ``refold tune``).

    The object holds :class:`~worker.core.model.AlsParams` keys (``factors``,
    ``regularization`` and ``alpha`` required) and optionally ``"weights"``: an object of
    :class:`~worker.core.scoring.Weights` fields. An unknown key is a ``ConfigError``.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read params file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"params file {path}: expected a JSON object")
    data = dict(data)
    raw_weights = data.pop("weights", None)
    try:
        params = AlsParams.from_dict(data, strict=True)
        weights = None if raw_weights is None else weights_from_dict(raw_weights)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"params file {path}: {exc}") from exc
    return params, weights


def weights_from_dict(data: Any) -> Weights:
    """:class:`Weights` from a JSON object of its fields; an unknown field is a ValueError."""
    if not isinstance(data, dict):
        raise ValueError("'weights' must be an object")
    known = {f.name for f in fields(Weights)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"unknown weights key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return Weights(**{k: float(v) for k, v in data.items()})
