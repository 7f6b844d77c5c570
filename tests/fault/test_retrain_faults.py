"""``refold retrain`` under faults: kill -9 mid-training leaves no partial model in
MODELS_DIR (the serving model stays the newest valid one, and the next run cleans up
and swaps); a candidate with a corrupt file is never swapped nor announced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.archive_kit import make_dataset
from tests.integration.test_retrain import _env, announced, retrain, visible
from tests.kit import ROOT, Topics
from worker.retrain import newest_valid
from worker.storage import load_model

pytestmark = pytest.mark.fault


def test_kill9_mid_training_leaves_no_partial_model(
    broker: str, topics: Topics, tmp_path: Path
) -> None:
    ds = make_dataset(tmp_path)
    slow = tmp_path / "slow.json"  # seconds of fitting on one thread: time to kill it
    slow.write_text('{"factors": 128, "regularization": 1, "alpha": 3, "iterations": 300}')
    log_path = tmp_path / "retrain.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "retrain", *ds.retrain_args(), "--params", str(slow),
             "--threads", "1", "--bootstrap-servers", broker,
             "--topic-control", topics.settings.control],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env(),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "fitting ALS" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)  # polling a log file; bounded by the deadline
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "saved to" not in log_path.read_text()  # it died mid-training
    assert visible(ds.models) == {"v0-base"}  # no partial version directory
    assert newest_valid(ds.models) == ds.current
    load_model(ds.current)
    assert list(ds.models.glob(".retrain-*"))  # only its hidden work directory is left
    res = retrain(ds, broker, topics)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["decision"] == "swap"
    assert not list(ds.models.glob(".retrain-*")) and not list(ds.models.glob(".*.tmp-*"))
    newest = newest_valid(ds.models)
    assert newest is not None and newest != ds.current
    assert [d["model_dir"] for d in announced(broker, topics, ds.current)] == [str(newest)]


def test_corrupt_candidate_is_never_swapped(broker: str, topics: Topics, tmp_path: Path) -> None:
    ds = make_dataset(tmp_path)
    res = retrain(ds, broker, topics, "--test-corrupt-candidate")
    assert res.returncode == 0, res.stderr
    assert "candidate failed verification" in res.stderr and "sha256 mismatch" in res.stderr
    gate = json.loads((ds.models / "gate.json").read_text())
    assert gate["decision"] == "refuse" and gate["candidate_ndcg"] is None
    assert visible(ds.models) == {"v0-base"} and newest_valid(ds.models) == ds.current
    assert announced(broker, topics, ds.current) == []
