"""refold tune's pure parts: the validation windows, the search space, best.json."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
from optuna.trial import FixedTrial

from worker.core.model import AlsParams
from worker.core.scoring import Weights
from worker.errors import ConfigError
from worker.eval.tune import (
    best_json,
    default_params,
    suggest,
    trial_values,
    windows,
)
from worker.train import read_params


def test_windows_end_at_the_next_split_and_never_reach_the_test_split() -> None:
    assert windows((0.5, 0.6, 0.7), 0.8) == [(0.5, 0.6), (0.6, 0.7), (0.7, 0.8)]
    assert windows([0.3], 0.9) == [(0.3, 0.9)]
    for bad in ((0.5, 0.8), (0.6, 0.5), (), (0.0, 0.5), (0.9,)):
        with pytest.raises(ConfigError):
            windows(bad, 0.8)
    with pytest.raises(ConfigError, match="test-split"):
        windows((0.5,), 1.0)


def test_the_defaults_are_a_point_of_the_space() -> None:
    params, weights = suggest(FixedTrial(trial_values(default_params(), Weights())))
    assert params == default_params()
    assert weights == Weights()


def test_a_point_of_the_space_becomes_params_and_weights() -> None:
    point = {
        "factors": 12, "regularization": 0.5, "alpha": 7.0, "iterations": 4,
        "confidence": "one_plus", "w_view": 0.5, "w_like": 3.0, "w_neutral": 0.0,
        "w_dislike": 1.0,
    }  # fmt: skip
    hints = typing.get_type_hints(AlsParams)
    for name in ("decay", "blend_returning", "blend_new"):  # present once those merge
        if name in hints:
            point[name] = typing.get_args(hints[name])[0] if name == "decay" else 0.25
    params, weights = suggest(FixedTrial(point))
    assert (params.factors, params.regularization, params.alpha, params.iterations) == (
        12, 0.5, 7.0, 4,
    )  # fmt: skip
    assert params.confidence == "one_plus"
    assert weights == Weights(view=0.5, like=3.0, neutral=0.0, dislike=1.0)
    with pytest.raises(ValueError):  # outside the space
        suggest(FixedTrial({**point, "confidence": "linear"}))


def test_best_json_round_trips_through_read_params(tmp_path: Path) -> None:
    params = AlsParams(factors=9, regularization=0.25, alpha=1.5, iterations=7,
                       confidence="one_plus")  # fmt: skip
    weights = Weights(view=0.75, like=5.0, neutral=0.125, dislike=3.0)
    path = tmp_path / "best.json"
    path.write_text(json.dumps(best_json(params, weights)))
    assert read_params(path) == (params, weights)


def test_a_trial_left_running_is_failed_on_resume_and_the_defaults_run_first(
    tmp_path: Path,
) -> None:
    from optuna.trial import TrialState

    from worker.eval.tune import open_study

    study = open_study(tmp_path, seed=0)
    first = study.ask()  # the enqueued defaults
    assert suggest(first) == (default_params(), Weights())
    # A run killed mid-trial leaves it RUNNING in the journal; the next run fails it.
    resumed = open_study(tmp_path, seed=0)
    assert [t.state for t in resumed.trials] == [TrialState.FAIL, TrialState.WAITING]
    again = open_study(tmp_path, seed=0)
    assert len(again.trials) == 2  # the waiting defaults are not enqueued twice
    assert suggest(again.ask()) == (default_params(), Weights())  # the defaults, again
    assert (tmp_path / "study.journal").stat().st_size > 0
