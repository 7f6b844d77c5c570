"""The demo's popularity baseline: the same user, rounds and answers as refold's session."""

from __future__ import annotations

from worker.demo import popularity_rounds
from worker.notebook import NOT_WATCHED, precision_colab


def test_popularity_rounds_skip_rated_and_shown():
    popular = [f"v{i}" for i in range(40)]
    held = {"v1": "like", "v5": "dislike", "v12": "like", "v13": "neutral"}
    rounds = popularity_rounds(popular, initial=["v0", "v2"], held=held, rounds=3, k=10)
    shown = [v for r in rounds for v in r]
    assert shown == [v for v in popular if v not in {"v0", "v2"}][:30]  # most popular first
    assert len(set(shown)) == len(shown)  # a shown video never comes back
    assert rounds[0]["v1"] == "like" and rounds[0]["v5"] == "dislike"
    assert rounds[1]["v13"] == "neutral" and rounds[1]["v14"] == NOT_WATCHED
    assert precision_colab(rounds) == 2 / 30


def test_popularity_rounds_stop_when_the_catalog_runs_out():
    rounds = popularity_rounds(["a", "b", "c"], initial=["a"], held={"b": "like"}, rounds=5, k=10)
    assert rounds == [{"b": "like", "c": NOT_WATCHED}]
