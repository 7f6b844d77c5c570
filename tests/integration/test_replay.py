"""``refold replay`` and ``refold simulate`` end to end on small synthetic data.

The replay runs through the session broker (embedded Tansu unless
REFOLD_TEST_BROKER says otherwise) against a real worker process.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worker.cli import main
from worker.core.model import AlsParams
from worker.data.synth import synthesize

pytestmark = pytest.mark.integration

METRICS = ("ndcg_at_10", "precision_at_10", "recall_at_10", "map_at_10", "hit_rate_at_10")
# Small and fast: about 1 s of training and a few seconds of replay on two cores.
TRAIN = ["--factors", "16", "--iterations", "5", "--quiet"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, users=400, videos=300, events=12_000, seed=5, days=10, progress=False)
    return out


def _data_args(d: Path) -> list[str]:
    return [
        "--logs", str(d / "logs.parquet"),
        "--videos", str(d / "video_stat.parquet"),
        "--reactions", str(d / "reactions.parquet"),
    ]  # fmt: skip


def test_replay_through_kafka_writes_report_and_plots(
    broker: str, synthetic: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    code = main(
        [
            "replay", *_data_args(synthetic), "--split-frac", "0.85", "--report", str(out),
            "--bootstrap-servers", broker, "--max-events", "2500", "--retrain-every", "0.5",
            "--simulate-users", "15", "--sim-rounds", "4", *TRAIN,
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    variants = report["variants"]
    for name in ("popularity", "static", "retrain", "retrain_nofoldin", "foldin"):
        for key in (*METRICS, "coverage"):
            assert isinstance(variants[name][key], float), (name, key)
            assert 0.0 <= variants[name][key] <= 1.0
    for q in ("p50", "p95", "p99"):
        assert report["latency_ms"][q] > 0
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["live"]["events_sent"] == report["data"]["replay_events"] > 1000
    assert report["lists"]["scored"] > 100
    assert report["foldin_vs_retrain"]["ndcg_fraction"] > 0
    # The live worker's lists are exactly what the core computes in-process.
    assert report["checks"]["lists_checked"] > 10
    assert report["checks"]["foldin_live_vs_inprocess_overlap_at_10"] == pytest.approx(1.0)
    assert report["checks"]["foldin_live_vs_inprocess_identical"] == pytest.approx(1.0)
    # Planted tastes: any model beats popularity by far, and folding in never hurts.
    assert variants["foldin"]["ndcg_at_10"] > 2 * variants["popularity"]["ndcg_at_10"]
    assert variants["foldin"]["ndcg_at_10"] >= 0.97 * variants["static"]["ndcg_at_10"]
    sim = report["simulation"]
    for name in ("refold", "refold_inprocess", "popularity"):
        assert len(sim["variants"][name]["precision_per_round"]) == 4
    assert sim["checks"]["live_vs_inprocess_identical_rounds"] == pytest.approx(1.0)
    assert sim["checks"]["live_vs_core_lists_checked"] >= 15 * 4
    assert sim["checks"]["live_vs_core_identical"] == 1.0
    for png in ("metrics_over_time.png", "variants.png", "latency.png", "precision_per_round.png"):
        assert (out / png).stat().st_size > 1000, png
        assert png in report["plots"]
    md = (out / "report.md").read_text()
    assert "NDCG@10" in md and "## Definitions" in md and "of the retrain's" in md


def _planted(out: Path, *, seed: int = 0) -> int:
    """Three taste clusters; the users after the split are all new.

    A user of cluster c watches (to the end) only cluster c's videos. Popularity,
    time-aware or not, mixes the clusters, so about a third of its list suits a
    given user; fold-in finds the user's cluster from their first views. Returns
    the number of events before the split.
    """
    rng = np.random.default_rng(seed)
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    clusters, per_cluster = 3, 20
    videos = [f"v{c}_{i}" for c in range(clusters) for i in range(per_cluster)]
    rows: list[tuple[datetime, str, str, float]] = []

    def watch(user: str, cluster: int, n: int) -> None:
        own = [v for v in videos if v.startswith(f"v{cluster}_")]
        for v in rng.choice(own, size=n, replace=False):
            rows.append((t0 + timedelta(minutes=len(rows) + 1), user, str(v), 600.0))

    for u in range(90):
        watch(f"old{u}", u % clusters, 12)
    before = len(rows)
    for u in range(30):
        watch(f"new{u}", u % clusters, 14)
    ts, users, vids, watched = zip(*rows, strict=True)
    pq.write_table(
        pa.table(
            {
                "event_timestamp": pa.array(ts, pa.timestamp("us", tz="UTC")),
                "viewer_uid": list(users),
                "rutube_video_id": list(vids),
                "total_watchtime": list(watched),
            }
        ),
        out / "logs.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "video_id": videos,
                "duration": [600] * len(videos),
                "category": [v[1] for v in videos],
                "author_id": [f"a{v[1]}" for v in videos],
            }
        ),
        out / "video_stat.parquet",
    )
    return before


def test_live_lists_equal_the_core_even_while_untrained_videos_are_refit(
    broker: str, synthetic: Path, tmp_path: Path
) -> None:
    """Videos with no interactions before the split start from their content prior and
    are refit, batch after batch, from the interactions seen so far; those refits move
    the item gramian every fold-in uses. The in-process check answers at the live
    worker's batch ends, so every checked list must still be identical."""
    data = tmp_path / "data"
    data.mkdir()
    logs = pq.read_table(synthetic / "logs.parquet")
    ts = logs.column("event_timestamp").to_numpy()
    split = np.sort(ts)[int(len(ts) * 0.8)]
    videos = logs.column("rutube_video_id").to_pylist()
    counts: dict[str, int] = {}
    for v in videos:
        counts[v] = counts.get(v, 0) + 1
    untrained = set(sorted(counts, key=lambda v: -counts[v])[:30])  # popular: touched often
    keep = np.array([v not in untrained for v in videos]) | (ts >= split)
    pq.write_table(logs.filter(pa.array(keep)), data / "logs.parquet")
    reactions = pq.read_table(synthetic / "reactions.parquet")
    r_keep = np.array([v not in untrained for v in reactions.column("video_id").to_pylist()])
    r_keep |= reactions.column("ts").to_numpy() >= split
    pq.write_table(reactions.filter(pa.array(r_keep)), data / "reactions.parquet")
    (data / "video_stat.parquet").write_bytes((synthetic / "video_stat.parquet").read_bytes())
    out = tmp_path / "report"
    split_at = np.datetime_as_string(split, unit="us") + "Z"
    code = main(
        [
            "replay", *_data_args(data), "--split-at", split_at, "--report", str(out),
            "--bootstrap-servers", broker, "--max-events", "2500", "--retrain-every", "0",
            "--check-every", "1", "--simulate-users", "20", "--sim-rounds", "4",
            "--sim-min-likes", "1", *TRAIN,
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    order = np.argsort(ts, kind="stable")
    replayed = [videos[i] for i in order if ts[i] >= split][:2500]
    assert sum(v in untrained for v in replayed) > 200, "the untrained videos are replayed"
    assert report["checks"]["lists_checked"] > 500
    assert report["checks"]["foldin_live_vs_inprocess_identical"] == 1.0
    # The simulation's live lists too, mirrored at the worker's batch ends.
    sim = report["simulation"]
    assert sim["users"] >= 10
    assert sim["checks"]["live_vs_core_lists_checked"] >= 4 * sim["users"]
    assert sim["checks"]["live_vs_core_identical"] == 1.0


def test_planted_new_users_foldin_beats_static_and_popularity(tmp_path: Path) -> None:
    """In-process (no broker): fold-in must find the new users' cluster; the baselines cannot."""
    data = tmp_path / "data"
    data.mkdir()
    before = _planted(data)
    out = tmp_path / "report"
    split = (datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=before + 1)).isoformat()
    code = main(
        [
            "replay", "--logs", str(data / "logs.parquet"), "--videos",
            str(data / "video_stat.parquet"), "--split-at", split, "--report", str(out),
            "--no-kafka", "--batch", "5", "--retrain-every", "0", *TRAIN,
        ]
    )  # fmt: skip
    assert code == 0
    v = json.loads((out / "report.json").read_text())["variants"]
    assert v["foldin"]["ndcg_at_10"] > 1.5 * v["static"]["ndcg_at_10"]
    assert v["foldin"]["ndcg_at_10"] > 1.5 * v["popularity"]["ndcg_at_10"]


def test_simulate_in_process_reports_precision_per_round(synthetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    code = main(
        [
            "simulate", *_data_args(synthetic), "--split-frac", "0.8", "--report", str(out),
            "--no-kafka", "--users", "20", "--rounds", "5", "--keep-model", *TRAIN,
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    sim = report["simulation"]
    assert sim["answers"] == "truth" and sim["users"] > 0
    for name in ("refold", "popularity"):
        per_round = sim["variants"][name]["precision_per_round"]
        assert len(per_round) == 5 and all(0.0 <= p <= 1.0 for p in per_round)
    assert (out / "precision_per_round.png").stat().st_size > 1000
    # The seed's random answers are available, and the report says they measure nothing.
    out2 = tmp_path / "sim-random"
    assert main(
        [
            "simulate", *_data_args(synthetic), "--split-frac", "0.8", "--report", str(out2),
            "--no-kafka", "--users", "5", "--rounds", "2", "--answers", "random",
            "--model", str(_model_dir(out)), *TRAIN,
        ]
    ) == 0  # fmt: skip
    random_report = json.loads((out2 / "report.json").read_text())
    assert "measure nothing" in random_report["simulation"]["note"]


def _model_dir(report_dir: Path) -> Path:
    return Path(json.loads((report_dir / "report.json").read_text())["model"]["path"])


def test_replay_trains_and_serves_with_a_params_file(synthetic: Path, tmp_path: Path) -> None:
    """``--params`` reaches the split model (params) and the replay's event values (weights)."""
    params = tmp_path / "best.json"
    params.write_text(
        json.dumps(
            {"factors": 7, "regularization": 0.3, "alpha": 2.0, "iterations": 3,
             "confidence": "one_plus", "weights": {"like": 4.0, "view": 0.5}}
        )
    )  # fmt: skip
    out = tmp_path / "report"
    code = main(
        [
            "replay", *_data_args(synthetic), "--split-frac", "0.8", "--report", str(out),
            "--no-kafka", "--retrain-every", "0", "--max-events", "300", "--params", str(params),
            "--iterations", "2", "--keep-model", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((_model_dir(out) / "manifest.json").read_text())
    assert manifest["params"] == {
        **AlsParams(factors=7, regularization=0.3, alpha=2.0).to_dict(),
        "iterations": 2, "confidence": "one_plus",
    }  # fmt: skip
    assert manifest["data_summary"]["training"]["weights"]["like"] == 4.0
    assert report["settings"]["weights"]["like"] == 4.0
    assert report["settings"]["weights"]["view"] == 0.5


def test_replay_with_row_decay_from_a_params_file(synthetic: Path, tmp_path: Path) -> None:
    """``--params`` with recency decay: the split model trains on decayed rows (its row
    times stored), and the in-process fold-in lists still equal the oracle's check."""
    params = tmp_path / "decay.json"
    params.write_text(
        json.dumps(
            {"factors": 8, "regularization": 1.0, "alpha": 3.0, "iterations": 3,
             "decay": "items", "decay_half_life": 10}
        )
    )  # fmt: skip
    out = tmp_path / "report"
    code = main(
        [
            "replay", *_data_args(synthetic), "--split-frac", "0.8", "--report", str(out),
            "--no-kafka", "--retrain-every", "0.5", "--max-events", "400",
            "--params", str(params), "--keep-model", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    model_dir = _model_dir(out)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["params"]["decay"] == "items"
    assert manifest["params"]["decay_half_life"] == 10.0
    assert "user_row_times.npy" in manifest["files"]
    report = json.loads((out / "report.json").read_text())
    assert report["variants"]["foldin"]["lists_scored"] > 0
    assert report["variants"]["retrain"]["lists_scored"] > 0  # retrained on decayed rows
