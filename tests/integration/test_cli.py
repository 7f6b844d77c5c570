"""The operator's path, end to end through the ``refold`` command line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kit import ROOT
from worker.brokers.tansu import free_port
from worker.storage import load_model

pytestmark = pytest.mark.integration


def refold(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    refold(
        "synth",
        "--out",
        str(d / "data"),
        "--users",
        "400",
        "--videos",
        "300",
        "--events",
        "30000",
        "--seed",
        "2",
        "--quiet",
    )
    refold(
        "bootstrap",
        "--logs",
        str(d / "data" / "logs.parquet"),
        "--videos",
        str(d / "data" / "video_stat.parquet"),
        "--out",
        str(d / "model"),
        "--factors",
        "16",
        "--iterations",
        "5",
        "--quiet",
    )
    return d / "model"


def test_broker_worker_send_tail_term(cli_model: Path, tmp_path: Path):
    port = free_port()
    broker = subprocess.Popen(
        [sys.executable, "-m", "worker", "broker", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert broker.stdout is not None
        assert broker.stdout.readline().strip() == f"ready 127.0.0.1:{port}"
        bs = f"127.0.0.1:{port}"
        metrics = free_port()
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker",
                "worker",
                "--bootstrap-servers",
                bs,
                "--model",
                str(cli_model),
                "--metrics-port",
                str(metrics),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "w.log", "w"),  # noqa: SIM115 - closed with the process
        )
        try:
            model = load_model(cli_model)
            user = model.users.id_of(0)
            cols, _ = model.row_of(0)
            watched = {model.items.id_of(int(c)) for c in cols}
            liked = next(v for v in model.items.ids if v not in watched)
            sent = refold(
                "send",
                "--bootstrap-servers",
                bs,
                "--user",
                user,
                "--video",
                liked,
                "--action",
                "like",
            )
            assert json.loads(sent.stdout)["video_id"] == liked
            refold(
                "send",
                "--bootstrap-servers",
                bs,
                "--user",
                "bad\u0001user",
                "--video",
                "v",
                "--action",
                "like",
                check=False,
            )
            tail = refold(
                "tail",
                "--bootstrap-servers",
                bs,
                "--user",
                user,
                "--max-messages",
                "1",
                "--timeout",
                "60",
            )
            doc = json.loads(tail.stdout.strip().splitlines()[0])
            items = [i["video_id"] for i in doc["items"]]
            assert len(items) == 10 and liked not in items and not watched & set(items)
            # A malformed message reaches the DLQ with a reason header.
            from worker.config import KafkaSettings
            from worker.producer import RatingProducer

            with RatingProducer(kafka=KafkaSettings(bootstrap_servers=bs)) as p:
                p.send_raw(b'{"action": "like"}', key=user.encode())
            dlq = refold(
                "tail",
                "--bootstrap-servers",
                bs,
                "--topic",
                "ratings.dlq",
                "--max-messages",
                "1",
                "--timeout",
                "60",
            )
            assert "refold.error.type" in dlq.stdout and "validation" in dlq.stdout
            deadline = time.monotonic() + 30
            while (
                refold("worker", "--check", "--metrics-port", str(metrics), check=False).returncode
                != 0
            ):
                assert time.monotonic() < deadline, "health probe never passed"
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=60) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
        assert (
            refold("worker", "--check", "--metrics-port", str(metrics), check=False).returncode == 1
        )
    finally:
        broker.send_signal(signal.SIGINT)
        assert broker.wait(timeout=30) == 0


def test_bad_model_fails_clearly(tmp_path: Path):
    res = refold(
        "worker",
        "--bootstrap-servers",
        "127.0.0.1:1",
        "--model",
        str(tmp_path / "missing"),
        check=False,
    )
    assert res.returncode == 1 and "does not exist" in res.stderr
