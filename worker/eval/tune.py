"""``refold tune``: a hyper-parameter search (optuna) scored by the in-process prequential
NDCG@10 of the fold-in engine on validation windows *before* the test split.

* **Windows.** With validation splits ``0.5, 0.6, 0.7`` and test split ``0.8``, a trial
  trains on the events before 0.5 and is scored on the events from 0.5 to 0.6, then
  trains before 0.6 and is scored up to 0.7, and so on; the last window ends at the
  test split. Nothing at or after the test split is seen while searching. A trial's
  score is the mean over windows and ``--seeds`` (the seed of implicit's initial
  factors, where :func:`worker.train.bootstrap` takes one).
* **Each window** is the replay's in-process machinery, unchanged:
  :func:`~worker.eval.prepare.train_split_model` (the ``refold bootstrap`` code path),
  :func:`~worker.eval.variants.run_in_process` at the request points a worker polling
  ``--batch`` events would publish, :class:`~worker.eval.variants.Relevance` and
  :func:`~worker.eval.scoring.score_variants`.
* **Space** (:func:`suggest`): factors, regularization, alpha, iterations, the
  confidence mode and every other ``Literal`` field of :class:`AlsParams` (row decay and
  its half-life where they exist), float fields named ``blend_*`` in [0, 16], and the
  event weights (view, like, neutral, dislike).
* **Resumable.** The study lives in ``DIR/study.journal`` (optuna's journal file); a
  second run with the same DIR continues until ``--trials`` trials are complete. The
  first trial is the defaults (again, when it failed). A trial left running by a killed
  run is marked failed.
* **Output.** ``best.json`` (the ``--params`` format of ``refold bootstrap`` and
  ``refold replay``), ``trials.json`` (every trial: params, per-window scores, mean),
  ``report.json`` / ``report.md`` with the test-window NDCG@10 of the best trial, the
  defaults and popularity (95% user-resampled intervals), and ``tune.png``. The test
  model trains on ``DIR/test-train/`` (the events before the test split), so that
  ``refold bootstrap --logs DIR/test-train/logs.parquet ... --params DIR/best.json``
  rebuilds it.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import logging
import tempfile
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.core.model import AlsParams, Model
from worker.core.scoring import Weights
from worker.core.wire import TOP_K
from worker.errors import ConfigError
from worker.eval.events import (
    FOLDIN_INPROCESS,
    POPULARITY,
    EventTable,
    command_line,
    iso_time,
    load_events,
    split_index,
    write_training_files,
)
from worker.eval.live import batched_requests
from worker.eval.metrics import cluster_bootstrap
from worker.eval.prepare import (
    ReplayOptions,
    adopt_model_durations,
    popularity_half_life_us,
    train_split_model,
)
from worker.eval.scoring import score_variants
from worker.eval.variants import InProcessOptions, Relevance, run_in_process

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]

STUDY_NAME = "refold-tune"
#: Event weights searched, with their ranges (the defaults 1 / 2 / 0.5 / 2 sit inside).
WEIGHT_RANGES = {
    "view": (0.25, 4.0),
    "like": (0.25, 8.0),
    "neutral": (0.0, 2.0),
    "dislike": (0.0, 8.0),
}
#: Half-life ranges of row decay (``AlsParams.decay_half_life``), by mode: distinct videos
#: (the study behind issue 15 found ~25 on MovieLens rows of ~800), or days (a day to
#: three years: MovieLens histories span years, a video service's weeks).
DECAY_HALF_LIFE = {"items": (5.0, 1000.0), "time": (1.0, 1095.0)}


@dataclass
class TuneOptions:
    """Everything ``refold tune`` takes (see the CLI help for each)."""

    logs: list[str]
    videos: str
    out: Path
    reactions: str | None = None
    trials: int = 20
    test_split: float = 0.8
    validation: tuple[float, ...] = (0.5, 0.6, 0.7)
    seeds: tuple[int, ...] = (0,)
    max_events: int = 0  # per window; 0: all its events
    batch: int = 200
    positive_fraction: float = 0.5
    duration_unit: str = "auto"
    columns: Any = None
    threads: int = 0
    seed: int = 0  # of the sampler and of the intervals
    progress: bool = True
    command: str = ""


# ---- pure parts --------------------------------------------------------------------------------


def windows(validation: Sequence[float], test_split: float) -> list[tuple[float, float]]:
    """``(train_until, score_until)`` fractions of each validation window: each split is
    scored on the events up to the next split, the last up to the test split."""
    vals = [float(v) for v in validation]
    if not vals:
        raise ConfigError("give at least one validation split")
    if not 0.0 < test_split < 1.0:
        raise ConfigError(f"--test-split must be in (0, 1), got {test_split}")
    if any(b <= a for a, b in itertools.pairwise(vals)) or vals[0] <= 0.0:
        raise ConfigError(f"validation splits must be increasing and > 0, got {vals}")
    if vals[-1] >= test_split:
        raise ConfigError(
            f"validation splits must be strictly before the test split {test_split}, got {vals}"
        )
    return list(zip(vals, [*vals[1:], test_split], strict=True))


def default_params() -> AlsParams:
    """The parameters ``refold bootstrap`` uses without flags."""
    from worker.train import (
        DEFAULT_ALPHA,
        DEFAULT_FACTORS,
        DEFAULT_ITERATIONS,
        DEFAULT_REGULARIZATION,
    )

    return AlsParams(
        factors=DEFAULT_FACTORS,
        regularization=DEFAULT_REGULARIZATION,
        alpha=DEFAULT_ALPHA,
        iterations=DEFAULT_ITERATIONS,
    )


def _literal_choices(name: str) -> tuple[Any, ...] | None:
    hint = typing.get_type_hints(AlsParams).get(name)
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return None


#: Upper end of the popularity blend's β in the search.
BLEND_MAX = 16.0


def suggest(trial: Any) -> tuple[AlsParams, Weights]:
    """One point of the search space from an optuna trial (``FixedTrial`` works too).

    Fields are found on :class:`AlsParams` itself, so the space grows with it: every
    ``Literal`` field is a choice, ``decay_half_life`` a log range that depends on the
    decay mode, every float ``blend_*`` field in [0, ``BLEND_MAX``].
    """
    values: dict[str, Any] = {
        "factors": trial.suggest_int("factors", 8, 128, log=True),
        "regularization": trial.suggest_float("regularization", 1e-3, 100.0, log=True),
        "alpha": trial.suggest_float("alpha", 0.1, 50.0, log=True),
        "iterations": trial.suggest_int("iterations", 3, 30),
    }
    names = [f.name for f in dataclasses.fields(AlsParams)]
    for name in names:
        choices = _literal_choices(name)
        if choices is not None and name not in values:
            values[name] = trial.suggest_categorical(name, list(choices))
        elif name.startswith("blend_"):
            # β of the popularity blend: the weight of log1p(popularity) beside a z-scored
            # ALS score (worker/core/blend.py), so a few units already reorder lists.
            values[name] = trial.suggest_float(name, 0.0, BLEND_MAX)
    if "decay_half_life" in names and values.get("decay", "none") in DECAY_HALF_LIFE:
        lo, hi = DECAY_HALF_LIFE[values["decay"]]
        key = f"decay_half_life_{values['decay']}"
        values["decay_half_life"] = trial.suggest_float(key, lo, hi, log=True)
    weights = Weights(
        **{k: trial.suggest_float(f"w_{k}", lo, hi) for k, (lo, hi) in WEIGHT_RANGES.items()}
    )
    return AlsParams.from_dict(values, strict=True), weights


def trial_values(params: AlsParams, weights: Weights) -> dict[str, Any]:
    """The optuna parameter names and values of a point (to enqueue the defaults)."""
    out: dict[str, Any] = {}
    for name, value in params.to_dict().items():
        if name == "decay_half_life":
            mode = getattr(params, "decay", "none")
            if mode in DECAY_HALF_LIFE:
                out[f"decay_half_life_{mode}"] = value
        else:
            out[name] = value
    out.update({f"w_{k}": getattr(weights, k) for k in WEIGHT_RANGES})
    return out


def best_json(params: AlsParams, weights: Weights) -> dict[str, Any]:
    """``best.json``: :class:`AlsParams` keys plus ``"weights"``, as
    :func:`worker.train.read_params` reads them."""
    return {**params.to_dict(), "weights": dataclasses.asdict(weights)}


# ---- scoring one window -------------------------------------------------------------------------


@dataclass
class WindowScore:
    """Per scored list of one window: the fold-in's and popularity's NDCG@10, and the user."""

    foldin: F64
    popularity: F64
    users: npt.NDArray[np.int64]
    train_events: int
    scored_events: int

    @property
    def ndcg(self) -> float:
        return float(np.mean(self.foldin)) if self.foldin.size else 0.0


def score_model(
    table: EventTable,
    split: int,
    end: int,
    model: Model,
    weights: Weights,
    opts: TuneOptions,
) -> WindowScore:
    """The in-process prequential NDCG@10 of ``model`` on events ``[split, end)``: the
    core engine's fold-in at the request points of a worker polling ``opts.batch``
    events, and the popularity baseline at the same points."""
    adopt_model_durations(table, model)
    requests = batched_requests(table, split, end, opts.batch)
    lists, _ = run_in_process(
        table,
        split,
        end,
        model,
        requests,
        InProcessOptions(
            k=TOP_K,
            retrain_every=0,
            half_life_us=popularity_half_life_us(table, split, end, None),
            positive_fraction=opts.positive_fraction,
            weights=weights,
            seed=opts.seed,
            threads=opts.threads,
            baselines=False,
        ),
        progress=False,
    )
    relevance = Relevance.build(
        table,
        split,
        end,
        positive_fraction=opts.positive_fraction,
        default_duration_s=weights.default_duration_s,
        horizon_events=20,  # the replay's default horizon (ReplayOptions.horizon_events)
        horizon_seconds=None,
    )
    scored, mask = score_variants(table, split, requests, lists, relevance, TOP_K)
    users = np.array([r.user for r in requests], dtype=np.int64)[mask]
    return WindowScore(
        foldin=scored[FOLDIN_INPROCESS].scores["ndcg_at_10"][mask],
        popularity=scored[POPULARITY].scores["ndcg_at_10"][mask],
        users=users,
        train_events=split,
        scored_events=end - split,
    )


def _bounds(table: EventTable, lo: float, hi: float, max_events: int) -> tuple[int, int]:
    split = split_index(table.ts, split_at=None, split_frac=lo)
    end = len(table) if hi >= 1.0 else split_index(table.ts, split_at=None, split_frac=hi)
    if max_events > 0:
        end = min(end, split + max_events)
    return split, end


def _supports_seed() -> bool:
    from worker.train import bootstrap

    return "random_state" in inspect.signature(bootstrap).parameters


def _replay_options(
    opts: TuneOptions, params: AlsParams, weights: Weights, seed: int | None, work: Path
) -> ReplayOptions:
    train: dict[str, Any] = {"gpu": "off"}  # the same numbers on every machine
    if seed is not None and _supports_seed():
        train["random_state"] = seed
    return ReplayOptions(
        logs=list(opts.logs),
        videos=opts.videos,
        out=work,
        reactions=opts.reactions,
        duration_unit=opts.duration_unit,
        columns=opts.columns,
        threads=opts.threads,
        progress=False,
        params=params,
        weights=weights,
        train_options=train,
    )


def score_window(
    table: EventTable,
    bounds: tuple[int, int],
    params: AlsParams,
    weights: Weights,
    seed: int | None,
    opts: TuneOptions,
) -> WindowScore:
    """Train on the events before ``bounds[0]`` and score up to ``bounds[1]``."""
    split, end = bounds
    with tempfile.TemporaryDirectory(dir=opts.out, prefix=".trial-") as tmp:
        ropts = _replay_options(opts, params, weights, seed, Path(tmp))
        model = train_split_model(table, split, Path(tmp), ropts)
    return score_model(table, split, end, model, weights, opts)


# ---- the study ----------------------------------------------------------------------------------


@dataclass
class _Search:
    table: EventTable
    opts: TuneOptions
    bounds: list[tuple[int, int]] = field(default_factory=list)

    def objective(self, trial: Any) -> float:
        params, weights = suggest(trial)
        per: list[dict[str, Any]] = []
        for (lo, hi), b in zip(
            windows(self.opts.validation, self.opts.test_split), self.bounds, strict=True
        ):
            for seed in self.opts.seeds:
                s = score_window(self.table, b, params, weights, seed, self.opts)
                per.append(
                    {
                        "split": lo,
                        "until": hi,
                        "seed": seed,
                        "ndcg_at_10": s.ndcg,
                        "popularity_ndcg_at_10": float(np.mean(s.popularity))
                        if s.popularity.size
                        else 0.0,
                        "lists_scored": int(s.foldin.size),
                    }
                )
        trial.set_user_attr("windows", per)
        trial.set_user_attr("best_json", best_json(params, weights))
        return float(np.mean([w["ndcg_at_10"] for w in per]))


def open_study(out: Path, seed: int) -> Any:
    """The study in ``out/study.journal``, created (defaults enqueued) or resumed."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        load_if_exists=True,
    )
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.warning("trial %d was left running by an earlier run: marked failed", t.number)
        study.tell(t.number, state=TrialState.FAIL)
    if not any(t.user_attrs.get("defaults") and t.state != TrialState.FAIL for t in study.trials):
        study.enqueue_trial(
            trial_values(default_params(), Weights()), user_attrs={"defaults": True}
        )
    return study


def run_tune(opts: TuneOptions) -> dict[str, Any]:
    """The search, then the test-window scores, ``best.json`` and the report."""
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from worker.eval.tune_report import write_tune_report

    if opts.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {opts.trials}")
    if len(opts.seeds) > 1 and not _supports_seed():
        raise ConfigError("bootstrap takes no random_state here: give one --seeds value")
    windows(opts.validation, opts.test_split)  # bad splits fail before any work
    opts.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    table = load_events(
        opts.logs,
        opts.videos,
        opts.reactions,
        duration_unit=opts.duration_unit,
        mapping=opts.columns,
    )
    search = _Search(table, opts)
    search.bounds = [
        _bounds(table, lo, hi, opts.max_events)
        for lo, hi in windows(opts.validation, opts.test_split)
    ]
    study = open_study(opts.out, opts.seed)
    from optuna.trial import TrialState

    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    todo = max(0, opts.trials - done)
    bar = tqdm(
        total=opts.trials, initial=done, desc="tune", unit="trial", disable=not opts.progress
    )
    with threadpool_limits(1, "blas"):  # implicit parallelises itself; BLAS threads fight it
        for _ in range(todo):
            study.optimize(search.objective, n_trials=1)
            bar.update(1)
            bar.set_postfix(best=f"{study.best_value:.4f}")
        bar.close()
        report = _test_report(opts, table, study)
    report["timings_s"] = {"total_s": time.monotonic() - t0}
    write_tune_report(report, opts.out)
    return report


def _test_report(opts: TuneOptions, table: EventTable, study: Any) -> dict[str, Any]:
    """The test window: the best trial and the defaults, trained on ``DIR/test-train``."""
    from optuna.trial import TrialState

    from worker.train import bootstrap, read_params

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial
    (opts.out / "best.json").write_text(json.dumps(best.user_attrs["best_json"], indent=2) + "\n")
    best_params, best_weights = read_params(opts.out / "best.json")  # what users will load
    split, end = _bounds(table, opts.test_split, 1.0, opts.max_events)
    logs, reactions = write_training_files(table, split, opts.out / "test-train")
    scores: dict[str, WindowScore] = {}
    for name, (params, weights) in {
        "best": (best_params, best_weights or Weights()),
        "defaults": (default_params(), Weights()),
    }.items():
        with tempfile.TemporaryDirectory(dir=opts.out, prefix=".test-") as tmp:
            model = bootstrap(
                logs,
                opts.videos,
                Path(tmp) / "model",
                reactions=reactions,
                params=params,
                weights=weights,
                threads=opts.threads,
                gpu="off",
                duration_unit=typing.cast(Any, opts.duration_unit),
                progress=False,
            )
        scores[name] = score_model(table, split, end, model, weights, opts)
    test = _test_section(scores, opts.seed)
    trials = [
        {
            "number": t.number,
            "value": t.value,
            "params": t.params,
            "windows": t.user_attrs.get("windows", []),
            "state": t.state.name,
        }
        for t in study.get_trials(deepcopy=False)
    ]
    (opts.out / "trials.json").write_text(json.dumps(trials, indent=2) + "\n")
    return {
        "kind": "tune",
        "command": opts.command or command_line(),
        "data": {
            **table.summary,
            "test_split_time": iso_time(int(table.ts[split])),
            "test_train_events": split,
            "test_events": end - split,
        },
        "settings": {
            "trials": len(complete),
            "validation": list(opts.validation),
            "test_split": opts.test_split,
            "seeds": list(opts.seeds),
            "batch": opts.batch,
            "max_events": opts.max_events,
            "positive_fraction": opts.positive_fraction,
            "seeds_set_random_state": _supports_seed(),
        },
        "best": {
            "trial": best.number,
            "validation_ndcg_at_10": best.value,
            "params": best.user_attrs["best_json"],
        },
        "defaults_validation_ndcg_at_10": next(
            (t.value for t in complete if t.user_attrs.get("defaults")), None
        ),
        "test": test,
        "reproduce": (
            f"refold bootstrap --logs {logs} --videos {opts.videos}"
            + (f" --reactions {reactions}" if reactions else "")
            + f" --params {opts.out / 'best.json'} --gpu off --out MODEL"
        ),
        "trials_values": [(t.number, t.value) for t in complete],
    }


def _test_section(scores: dict[str, WindowScore], seed: int) -> dict[str, Any]:
    best, defaults = scores["best"], scores["defaults"]
    out: dict[str, Any] = {}
    for name, values in (
        ("best", best.foldin),
        ("defaults", defaults.foldin),
        ("popularity", defaults.popularity),
    ):
        users = defaults.users if name == "popularity" else scores[name].users
        out[name] = {
            "ndcg_at_10": float(np.mean(values)) if values.size else None,
            "ndcg_at_10_ci95": list(cluster_bootstrap(values, users, seed=seed))
            if values.size
            else None,
            "lists_scored": int(values.size),
        }
    same = best.foldin.size == defaults.foldin.size and np.array_equal(best.users, defaults.users)
    if same and best.foldin.size:
        for other, ref in (("defaults", defaults.foldin), ("popularity", defaults.popularity)):
            diff = best.foldin - ref
            out[f"best_minus_{other}"] = {
                "ndcg_at_10": float(np.mean(diff)),
                "ci95": list(cluster_bootstrap(diff, best.users, seed=seed)),
            }
    return out
