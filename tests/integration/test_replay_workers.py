"""``refold replay --workers N``: N worker processes in one group, the same metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.cli import main
from worker.data.synth import synthesize

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = ["--factors", "16", "--iterations", "5", "--quiet"]


def _replay(data: Path, out: Path, broker: str, workers: int) -> dict:
    code = main(
        [
            "replay", "--logs", str(data / "logs.parquet"),
            "--videos", str(data / "video_stat.parquet"),
            "--reactions", str(data / "reactions.parquet"),
            "--split-frac", "0.85", "--report", str(out), "--bootstrap-servers", broker,
            "--max-events", "2000", "--retrain-every", "0.5", "--workers", str(workers), *TRAIN,
        ]
    )  # fmt: skip
    assert code == 0
    return json.loads((out / "report.json").read_text())


def test_three_workers_score_what_one_does(broker: str, tmp_path: Path) -> None:
    data = tmp_path / "synth"
    synthesize(data, users=400, videos=300, events=12_000, seed=7, days=10, progress=False)
    one = _replay(data, tmp_path / "one", broker, 1)
    three = _replay(data, tmp_path / "three", broker, 3)

    assert one["live"]["workers"] == 1 and three["live"]["workers"] == 3
    assert three["settings"]["partitions"] >= 3
    assert three["live"]["events_sent"] == one["live"]["events_sent"] > 1000
    # Each worker's lists are its core engine's on the same events (every worker checked).
    for report in (one, three):
        assert report["checks"]["lists_checked"] > 10
        assert report["checks"]["foldin_live_vs_inprocess_identical"] == pytest.approx(1.0)
    # The same metrics, and NDCG@10 intervals that overlap: partitioning users over
    # workers changes batching, not the maths.
    lo1, hi1 = one["variants"]["foldin"]["ndcg_at_10_ci95"]
    lo3, hi3 = three["variants"]["foldin"]["ndcg_at_10_ci95"]
    assert lo1 <= hi3 and lo3 <= hi1, (one["variants"]["foldin"], three["variants"]["foldin"])
    assert set(three["variants"]) == set(one["variants"])
