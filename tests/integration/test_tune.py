"""``refold tune`` end to end on small synthetic data: it finishes, resumes, and a
``refold bootstrap --params best.json`` scores what its report says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from worker.cli import main
from worker.data.synth import synthesize
from worker.eval.events import load_events, split_index
from worker.eval.tune import TuneOptions, score_model
from worker.storage import load_model
from worker.train import read_params

pytestmark = pytest.mark.integration


def _data_args(d: Path) -> list[str]:
    return [
        "--logs", str(d / "logs.parquet"),
        "--videos", str(d / "video_stat.parquet"),
        "--reactions", str(d / "reactions.parquet"),
    ]  # fmt: skip


def _complete(out: Path) -> list[dict[str, object]]:
    trials = json.loads((out / "trials.json").read_text())
    return [t for t in trials if t["state"] == "COMPLETE"]


def test_tune_finishes_resumes_and_its_best_json_reproduces_the_test_score(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    synthesize(data, users=300, videos=200, events=8000, seed=3, days=10, progress=False)
    out = tmp_path / "tune"
    args = ["tune", *_data_args(data), "--out", str(out), "--threads", "1", "--quiet"]
    assert main([*args, "--trials", "2"]) == 0
    first = _complete(out)
    assert [t["number"] for t in first] == [0, 1]
    assert len(first[0]["windows"]) == 3  # 0.5, 0.6, 0.7, each up to the next split
    assert all(w["until"] <= 0.8 for t in first for w in t["windows"])
    assert main([*args, "--trials", "3"]) == 0  # resumes: one more trial, not three
    trials = _complete(out)
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert trials[:2] == first
    report = json.loads((out / "report.json").read_text())
    assert report["best"]["validation_ndcg_at_10"] == max(t["value"] for t in trials)
    for name in ("best", "defaults", "popularity"):
        lo, hi = report["test"][name]["ndcg_at_10_ci95"]
        assert lo <= report["test"][name]["ndcg_at_10"] <= hi
    assert (out / "tune.png").stat().st_size > 1000
    assert "| best |" in (out / "report.md").read_text()

    # The operator's path: bootstrap with best.json on the events before the test split.
    model_dir = tmp_path / "model"
    assert main([
        "bootstrap", "--logs", str(out / "test-train" / "logs.parquet"),
        "--videos", str(data / "video_stat.parquet"),
        "--reactions", str(out / "test-train" / "reactions.parquet"),
        "--params", str(out / "best.json"), "--threads", "1", "--gpu", "off",
        "--out", str(model_dir), "--quiet",
    ]) == 0  # fmt: skip
    table = load_events(
        [data / "logs.parquet"], data / "video_stat.parquet", data / "reactions.parquet"
    )
    split = split_index(table.ts, split_at=None, split_frac=0.8)
    _, weights = read_params(out / "best.json")
    assert weights is not None
    opts = TuneOptions(logs=[], videos="", out=tmp_path, threads=1)
    got = score_model(table, split, len(table), load_model(model_dir), weights, opts)
    assert got.foldin.size == report["test"]["best"]["lists_scored"]
    assert np.isclose(got.ndcg, report["test"]["best"]["ndcg_at_10"], rtol=1e-9, atol=1e-12)
