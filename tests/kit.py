"""Test kit: brokers, tiny models, worker processes and topic readers.

Integration tests pick their broker with ``REFOLD_TEST_BROKER``:
``tansu`` (default, embedded), ``apache`` (Apache Kafka from Maven jars), or
``HOST:PORT`` of a broker that is already running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from kafka import KafkaConsumer, TopicPartition

from worker.config import KafkaSettings, TopicSettings
from worker.core.als import fold_in, gramian
from worker.core.ids import IdMap
from worker.core.model import AlsParams, Model, VideoMeta
from worker.storage import save_model

ROOT = Path(__file__).resolve().parents[1]


# Workers in tests use a 2 s session timeout; Apache Kafka's default minimum is 6 s.
TEST_BROKER_CONFIG = {"group.min.session.timeout.ms": "1000"}


def _session_env() -> dict[str, str]:
    """Quick group joins on the embedded broker (it joins in ~session/2); Apache Kafka
    keeps the worker's default 6 s session."""
    if broker_choice() != "tansu":
        return {}
    return {"REFOLD_SESSION_TIMEOUT_MS": "2000", "REFOLD_HEARTBEAT_INTERVAL_MS": "500"}


def broker_choice() -> str:
    return os.environ.get("REFOLD_TEST_BROKER", "tansu")


def make_model(
    *,
    n_users: int = 40,
    n_items: int = 120,
    factors: int = 8,
    per_user: int = 6,
    seed: int = 0,
    factor_seed: int | None = None,
    version: str = "test-v1",
) -> Model:
    """A small model whose user factors are the exact fold-in of its rows.

    ``factor_seed`` changes the item factors only (same rows): a "retrained" model.
    """
    rng = np.random.default_rng(seed)
    n_cats = 4
    item_factors = (rng.standard_normal((n_items, factors)) * 0.3).astype(np.float32)
    if factor_seed is not None:
        item_factors = (
            np.random.default_rng(factor_seed).standard_normal((n_items, factors)) * 0.3
        ).astype(np.float32)
    rows, cols, vals = [], [], []
    for u in range(n_users):
        picked = rng.choice(n_items, size=per_user, replace=False)
        rows += [u] * per_user
        cols += picked.tolist()
        vals += rng.uniform(0.2, 1.0, size=per_user).tolist()
    csr = sp.csr_matrix(
        (np.array(vals, np.float32), (rows, cols)), shape=(n_users, n_items), dtype=np.float32
    )
    params = AlsParams(factors=factors, regularization=0.1, alpha=10.0, iterations=1)
    user_rows = [
        (
            csr.indices[csr.indptr[u] : csr.indptr[u + 1]],
            csr.data[csr.indptr[u] : csr.indptr[u + 1]],
        )
        for u in range(n_users)
    ]
    user_factors = fold_in(
        item_factors, gramian(item_factors), user_rows, regularization=0.1, alpha=10.0
    )
    popularity = np.asarray((csr > 0).sum(axis=0)).ravel().astype(np.float32)
    meta = VideoMeta(
        duration_s=np.full(n_items, 600.0, np.float32),
        category=(np.arange(n_items) % n_cats).astype(np.int32),
        author=(np.arange(n_items) % 10).astype(np.int32),
        popularity=popularity,
        categories=[f"cat{c}" for c in range(n_cats)],
        authors=[f"a{a}" for a in range(10)],
    )
    return Model(
        version=version,
        params=params,
        user_factors=user_factors,
        item_factors=item_factors,
        users=IdMap(f"u{u}" for u in range(n_users)),
        items=IdMap(f"v{i}" for i in range(n_items)),
        user_rows=csr,
        videos=meta,
    )


def save_tiny_model(path: Path, **kw: Any) -> Path:
    return save_model(make_model(**kw), path)


@dataclass
class Topics:
    """Unique topic names for one test, so tests can share a broker."""

    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}")

    @property
    def settings(self) -> TopicSettings:
        p = self.prefix
        return TopicSettings(
            ratings=f"{p}.ratings",
            recommendations=f"{p}.recommendations",
            videos=f"{p}.videos",
            dlq=f"{p}.ratings.dlq",
            changelog=f"{p}.changelog",
            control=f"{p}.models",
            item_contributions=f"{p}.item-contributions",
            item_updates=f"{p}.item-updates",
            popularity_pairs=f"{p}.popularity-pairs",
            popularity=f"{p}.popularity",
        )

    def env(self) -> dict[str, str]:
        s = self.settings
        return {f"REFOLD_TOPIC_{k.upper()}": v for k, v in s.model_dump().items()}

    @property
    def group(self) -> str:
        return f"{self.prefix}-group"


class WorkerProcess:
    """``refold worker`` as a real child process."""

    def __init__(
        self,
        *,
        bootstrap: str,
        model: Path,
        topics: Topics,
        extra_env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.env = {
            **os.environ,
            "REFOLD_BOOTSTRAP_SERVERS": bootstrap,
            "REFOLD_MODEL": str(model),
            "REFOLD_GROUP": topics.group,
            "PYTHONUNBUFFERED": "1",
            "OPENBLAS_NUM_THREADS": "1",
            **_session_env(),
            **topics.env(),
            **(extra_env or {}),
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        text = (
            self.log_path.read_text(errors="replace")
            if self.log_path and self.log_path.exists()
            else ""
        )
        self._assigned_before = text.count("assigned;")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "worker"],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def terminate(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=30)

    def wait_joined(self, timeout_s: float = 90.0) -> None:
        """Until this process logged a partition assignment (it is in the group)."""
        assert self.log_path is not None
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            if text.count("assigned;") > self._assigned_before:
                return
            assert self.alive(), self.log_tail()
            assert time.monotonic() < deadline, "worker never joined:\n" + self.log_tail()
            time.sleep(0.05)  # polling a log file; bounded by the deadline

    def log_tail(self, n: int = 60) -> str:
        if self.log_path and self.log_path.exists():
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""


@contextmanager
def running_worker(**kw: Any) -> Iterator[WorkerProcess]:
    w = WorkerProcess(**kw).start()
    try:
        yield w
    finally:
        w.stop()


class TopicReader:
    """Reads a topic from the beginning, group-less, accumulating records."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=20,
        )
        self.records: list[Any] = []
        self._assigned = False

    def _assign(self) -> bool:
        parts = self.consumer.partitions_for_topic(self.topic)
        if not parts:
            return False
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self._assigned = True
        return True

    def poll(self) -> None:
        if not self._assigned and not self._assign():
            time.sleep(0.05)  # topic not created yet
            return
        for recs in self.consumer.poll(timeout_ms=100).values():
            self.records.extend(recs)

    def wait_for(
        self, cond: Callable[[list[Any]], bool], *, timeout_s: float, what: str = "condition"
    ) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            self.poll()
            if cond(self.records):
                return self.records
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")

    def json_values(self) -> list[dict[str, Any]]:
        return [json.loads(r.value) for r in self.records]

    def close(self) -> None:
        self.consumer.close()


def kafka_settings(bootstrap: str) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=bootstrap)
