"""``refold retrain`` end to end: real Parquet, a real broker, a real ``refold worker``.

A candidate trained on drifting tastes beats the stale serving model, is written,
announced, and the running worker's lists carry its version. A deliberately worse
candidate (a collapsed model: huge regularization, 2 factors) is refused with the
reason in the log, and nothing is announced.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.archive_kit import Dataset, make_dataset
from tests.kit import ROOT, TopicReader, Topics, _session_env, kafka_settings, running_worker
from worker.producer import RatingProducer
from worker.storage import load_model

pytestmark = pytest.mark.integration


def retrain(
    ds: Dataset, broker: str, topics: Topics, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "retrain", *ds.retrain_args(),
         "--bootstrap-servers", broker, "--topic-control", topics.settings.control, *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", **_session_env()}


def announced(broker: str, topics: Topics, sentinel: Path) -> list[dict[str, str]]:
    """Every announcement on the control topic, up to a sentinel ``refold swap`` sent now
    (one partition keeps order, so what precedes it is all that was announced before)."""
    subprocess.run(
        [sys.executable, "-m", "worker", "swap", "--model", str(sentinel),
         "--bootstrap-servers", broker, "--topic-control", topics.settings.control],
        cwd=ROOT, check=True, capture_output=True, timeout=60, env=_env(),
    )  # fmt: skip
    want = str(sentinel.resolve())
    reader = TopicReader(broker, topics.settings.control)
    try:
        reader.wait_for(
            lambda recs: any(json.loads(r.value)["model_dir"] == want for r in recs),
            timeout_s=60, what="the sentinel announcement",
        )  # fmt: skip
        docs = reader.json_values()
    finally:
        reader.close()
    return docs[: [d["model_dir"] for d in docs].index(want)]


def visible(models: Path) -> set[str]:
    return {p.name for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")}


def test_retrain_swaps_a_better_candidate_into_a_running_worker(
    broker: str, topics: Topics, tmp_path: Path
) -> None:
    ds = make_dataset(tmp_path)
    user = load_model(ds.current).users.id_of(0)
    with (
        running_worker(bootstrap=broker, model=ds.current, topics=topics,
                       log_path=tmp_path / "worker.log") as worker,
        RatingProducer(kafka=kafka_settings(broker), topics=topics.settings) as producer,
    ):  # fmt: skip
        worker.wait_joined()
        res = retrain(ds, broker, topics)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["decision"] == "swap", res.stderr
        gate = json.loads((ds.models / "gate.json").read_text())
        print("gate:", {k: gate[k] for k in ("candidate_ndcg", "current_ndcg", "lists_scored")})
        assert gate["lists_scored"] > 100
        assert gate["candidate_ndcg"] >= gate["current_ndcg"] - gate["tolerance"]
        model_dir = Path(out["model_dir"])
        new = load_model(model_dir)  # loads and verifies
        assert model_dir.parent == ds.models and json.loads((model_dir / "gate.json").read_text())
        assert visible(ds.models) == {"v0-base", model_dir.name}
        assert (ds.models / "retrain.prom").read_text().count("refold_retrain_swapped 1.0") == 1
        # The running worker hot-swaps: its lists carry the new version.
        reader = TopicReader(broker, topics.settings.recommendations)
        deadline = time.monotonic() + 90
        try:
            while True:
                producer.like(user, new.items.id_of(0))
                producer.flush()
                reader.poll()
                versions = {json.loads(r.value)["model_version"] for r in reader.records}
                if new.version in versions:
                    break
                assert worker.alive(), worker.log_tail()
                assert time.monotonic() < deadline, f"lists carry {versions}\n{worker.log_tail()}"
        finally:
            reader.close()
    assert [d["version"] for d in announced(broker, topics, ds.current)] == [new.version]


def test_retrain_refuses_a_worse_candidate(broker: str, topics: Topics, tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    worse = tmp_path / "collapsed.json"  # 2 factors shrunk to ~0: near-arbitrary lists
    worse.write_text('{"factors": 2, "regularization": 100000, "alpha": 0.01, "iterations": 1}')
    res = retrain(ds, broker, topics, "--params", str(worse))
    assert res.returncode == 0, res.stderr
    assert "gate: refuse: candidate NDCG@10" in res.stderr and "worse by" in res.stderr
    gate = json.loads((ds.models / "gate.json").read_text())
    print("gate:", {k: gate[k] for k in ("candidate_ndcg", "current_ndcg", "lists_scored")})
    assert gate["decision"] == "refuse"
    assert gate["candidate_ndcg"] < gate["current_ndcg"] - gate["tolerance"]
    assert visible(ds.models) == {"v0-base"}
    assert not list(ds.models.glob(".retrain-*"))
    assert announced(broker, topics, ds.current) == []
