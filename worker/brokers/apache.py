"""A real single-node Apache Kafka broker (KRaft, combined broker+controller).

The broker runs from the Maven Central jars of ``org.apache.kafka:kafka_2.13``
(resolved by ``scripts/kafka/fetch``) on the local JVM; no Docker, no ZooKeeper,
no network beyond 127.0.0.1. It exists so that integration and fault tests can
run against the real thing as well as against the embedded default broker.

Everything the broker owns lives in ``data_dir``::

    data_dir/
      server.properties   broker config, rewritten on every start
      log4j2.properties   logging config, rewritten on every start
      kafka-logs/         log.dirs: topic data and the KRaft metadata log
      broker.out          the JVM's stdout/stderr (warnings and errors only)
      server.log          Kafka's INFO log (rolled at 10 MiB)
      broker.pid          pid of the running JVM; removed when it is stopped

Storage is formatted once (when ``kafka-logs/meta.properties`` is missing), so a
restart on the same ``data_dir`` keeps every topic and committed offset.

The quorum is configured statically (``controller.quorum.voters``), so the node
may come back on other ports than the ones it was formatted with.

Library use::

    with ApacheKafkaBroker(data_dir=tmp_path / "kafka") as broker:
        produce_to(broker.bootstrap_servers)
        broker.restart()   # same ports, same data

Command line (``scripts/kafka/broker`` wraps it)::

    python -m worker.brokers.apache start --port 9092 --data-dir /tmp/k   # detaches
    python -m worker.brokers.apache stop --data-dir /tmp/k
    python -m worker.brokers.apache run --port 9092 --data-dir /tmp/k     # foreground
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import datetime as dt
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType

from worker.errors import BrokerError
from worker.kafkaio import cluster_brokers

__all__ = [
    "DEFAULT_READY_TIMEOUT_S",
    "DEFAULT_STOP_TIMEOUT_S",
    "KAFKA_VERSION",
    "ApacheKafkaBroker",
    "default_libs_dir",
    "main",
    "stop_broker",
]

log = logging.getLogger(__name__)

#: Kafka release whose jars are used; keep in sync with scripts/kafka/pom.xml.
KAFKA_VERSION = "4.1.1"
#: Environment variable naming the directory that holds the Kafka jars.
LIBS_ENV = "REFOLD_KAFKA_LIBS"
#: The only address anything binds to.
LOOPBACK = "127.0.0.1"
#: node.id of the single combined broker+controller.
NODE_ID = 1

#: Default deadline for a start, formatting included (cold JVM + KRaft election).
DEFAULT_READY_TIMEOUT_S = 120.0
#: Default deadline for SIGTERM before SIGKILL. A combined node's controlled
#: shutdown normally takes a few seconds; log flushing on a slow disk can take more.
DEFAULT_STOP_TIMEOUT_S = 60.0
#: How long to wait for a SIGKILLed process to disappear before giving up.
_KILL_WAIT_S = 15.0
#: Interval between readiness / exit polls (short, so starts are not padded).
_POLL_INTERVAL_S = 0.1
#: Per-attempt cap for one metadata round trip (librdkafka admin client) while
#: waiting for readiness; a failed attempt is retried until the overall deadline.
_PROBE_ATTEMPT_S = 5.0
#: Deadline for ``kafka.tools.StorageTool format`` (one short JVM run, ~2 s).
_FORMAT_TIMEOUT_S = 120.0
#: Deadline for scripts/kafka/fetch: a cold Maven download of ~45 MB of jars.
_FETCH_TIMEOUT_S = 1800.0
#: Lines of each log file quoted in error messages.
_LOG_TAIL_LINES = 40
#: JVM heap cap: plenty for a test broker, small enough to share a 2-core box.
_HEAP = "512m"
#: Log cleaner dedupe buffer (Kafka's default is 128 MiB of heap); 32 MiB still
#: lets compaction work while keeping the broker inside the heap cap above.
_CLEANER_DEDUPE_BUFFER_BYTES = 32 * 1024 * 1024
#: KRaft broker session (Kafka default 9000 ms) and heartbeat (default 2000 ms):
#: bounds how long a start after kill() waits for the dead session to expire.
_BROKER_SESSION_TIMEOUT_MS = 4000
_BROKER_HEARTBEAT_INTERVAL_MS = 1000

_REPO_ROOT = Path(__file__).resolve().parents[2]
_FETCH_SCRIPT = _REPO_ROOT / "scripts" / "kafka" / "fetch"
_LIBS_MARKER = ".complete"

_CONFIG_FILE = "server.properties"
_LOG4J_FILE = "log4j2.properties"
_LOG_DIRS = "kafka-logs"
_STDOUT_LOG = "broker.out"
_SERVER_LOG = "server.log"
_PID_FILE = "broker.pid"
_MAIN_CLASS = "kafka.Kafka"
#: Written to broker.out before each launch; error messages quote from the last one.
_START_BANNER = "=== refold: starting"

# Brokers started by this process and not released; stopped at interpreter exit
# so that a test run that forgets stop() does not leave a JVM behind.
_LIVE: set[ApacheKafkaBroker] = set()


def default_libs_dir() -> Path:
    """Return where the Kafka jars live: ``$REFOLD_KAFKA_LIBS`` or the user cache."""
    env = os.environ.get(LIBS_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "refold" / f"kafka-{KAFKA_VERSION}" / "libs"


def _libs_present(libs: Path) -> bool:
    """Whether ``libs`` holds a complete set of jars (fetch marker or a Kafka jar)."""
    if (libs / _LIBS_MARKER).is_file():
        return True
    return any(libs.glob("kafka_2.13-*.jar"))


def _ensure_libs(libs: Path) -> Path:
    """Return ``libs``, running scripts/kafka/fetch first if the jars are missing."""
    if _libs_present(libs):
        return libs
    if not _FETCH_SCRIPT.is_file():
        raise BrokerError(
            f"Kafka jars not found in {libs} and {_FETCH_SCRIPT} is missing; "
            f"set {LIBS_ENV} to a directory holding the kafka_2.13 {KAFKA_VERSION} jars"
        )
    log.info("fetching Kafka %s jars into %s", KAFKA_VERSION, libs)
    env = {**os.environ, LIBS_ENV: str(libs)}
    try:
        # stderr is inherited so that a slow cold download shows Maven's messages.
        done = subprocess.run(
            ["bash", str(_FETCH_SCRIPT)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            timeout=_FETCH_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(f"{_FETCH_SCRIPT} did not finish within {_FETCH_TIMEOUT_S:.0f}s") from exc
    if done.returncode != 0:
        raise BrokerError(f"{_FETCH_SCRIPT} failed with exit status {done.returncode}")
    if not _libs_present(libs):
        raise BrokerError(f"{_FETCH_SCRIPT} succeeded but {libs} holds no Kafka jars")
    return libs


def _find_java() -> str:
    """Return the ``java`` executable: ``$JAVA_HOME/bin/java`` or the one on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise BrokerError("java not found (need Java 17+ on PATH or JAVA_HOME)")
    return found


def _free_ports(count: int, exclude: Sequence[int] = ()) -> list[int]:
    """Return ``count`` distinct currently-free TCP ports on the loopback address.

    All sockets are held open until every port is picked, so the ports differ
    from each other; another process may still grab one before the broker binds.
    """
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
            if port not in exclude:
                ports.append(port)
    finally:
        for sock in socks:
            sock.close()
    return ports


def _check_port_free(port: int) -> None:
    """Raise BrokerError if something already listens on ``127.0.0.1:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR, as the JVM sets it, so TIME_WAIT leftovers of a previous
        # run on the same port (restart) do not count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError as exc:
            raise BrokerError(f"port {LOOPBACK}:{port} is already in use: {exc}") from exc


def _new_cluster_id() -> str:
    """Return a Kafka cluster id: 16 random bytes, URL-safe base64 without padding.

    Same format as ``kafka-storage random-uuid``; ids starting with ``-`` are
    avoided, as Kafka does, so the id is never mistaken for a CLI option.
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cid.startswith("-"):
            return cid


def _escape_property(value: str) -> str:
    """Escape a value for a Java ``.properties`` file (backslashes only matter here)."""
    return value.replace("\\", "\\\\")


def _proc_state(pid: int) -> str | None:
    """Return the process state letter from /proc (``"Z"`` = zombie), None if gone.

    Falls back to a signal-0 probe where /proc is unavailable.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"
    # Format: "pid (comm) S ..."; comm may contain spaces or parentheses.
    return stat[stat.rfind(")") + 2 :].split(" ", 1)[0]


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    state = _proc_state(pid)
    return state is not None and state != "Z"


def _is_broker_process(pid: int, config_path: Path) -> bool:
    """Whether ``pid`` is a live ``kafka.Kafka`` JVM started with ``config_path``.

    Guards against signalling an unrelated process that reused a stale pid.
    Where /proc is unavailable, liveness alone is trusted.
    """
    if not _pid_alive(pid):
        return False
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    args = raw.decode(errors="replace").split("\0")
    return _MAIN_CLASS in args and str(config_path) in args


def _read_pid(pid_file: Path) -> int | None:
    """Return the pid stored in ``pid_file``, None if it is missing or garbage."""
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _tail(path: Path, lines: int = _LOG_TAIL_LINES, since: str | None = None) -> str:
    """Return the last ``lines`` lines of ``path`` ("" if it does not exist).

    With ``since``, only text from its last occurrence on is considered.
    """
    try:
        content = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    if since is not None:
        content = content[max(content.rfind(since), 0) :]
    return "\n".join(content.splitlines()[-lines:])


def _wait_gone(pid: int, proc: subprocess.Popen[bytes] | None, deadline: float) -> bool:
    """Wait until ``pid`` has exited or ``deadline`` (monotonic) passes.

    Reaps it when it is our child (``proc``). Returns whether it is gone.
    """
    while True:
        if proc is not None:
            if proc.poll() is not None:
                return True
        elif not _pid_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL_S)


def _signal(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to ``pid``, ignoring a process that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _terminate(
    pid: int, proc: subprocess.Popen[bytes] | None, timeout_s: float, *, force: bool = False
) -> None:
    """SIGTERM ``pid`` and wait up to ``timeout_s``, then SIGKILL it.

    With ``force`` it is SIGKILLed straight away. Raises BrokerError if it
    survives SIGKILL.
    """
    if not force:
        _signal(pid, signal.SIGTERM)
        if _wait_gone(pid, proc, time.monotonic() + timeout_s):
            return
        log.warning("broker pid %d ignored SIGTERM for %.0fs; sending SIGKILL", pid, timeout_s)
    _signal(pid, signal.SIGKILL)
    if not _wait_gone(pid, proc, time.monotonic() + _KILL_WAIT_S):
        raise BrokerError(f"broker pid {pid} is still alive after SIGKILL")


def stop_broker(data_dir: Path, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
    """Stop the broker whose pid file is in ``data_dir``; return its pid, None if none ran.

    SIGTERM, wait up to ``timeout_s``, then SIGKILL. The pid is only signalled
    if it still is the ``kafka.Kafka`` JVM of that directory; a stale pid file
    is simply removed.
    """
    data_dir = Path(data_dir).resolve()
    pid_file = data_dir / _PID_FILE
    pid = _read_pid(pid_file)
    if pid is None or not _is_broker_process(pid, data_dir / _CONFIG_FILE):
        pid_file.unlink(missing_ok=True)
        return None
    _terminate(pid, None, timeout_s)
    pid_file.unlink(missing_ok=True)
    return pid


class ApacheKafkaBroker:
    """A single-node Apache Kafka 4 broker (KRaft broker+controller) on 127.0.0.1.

    Ports are fixed at construction (free ones are picked when not given), so
    :meth:`restart` comes back on the same address with the same data.
    The broker is a child JVM in its own session; it is stopped by pid.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        port: int | None = None,
        controller_port: int | None = None,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
        libs_dir: Path | None = None,
        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
        extra_config: Mapping[str, str] | None = None,
    ) -> None:
        """Describe a broker; nothing is started until :meth:`start`.

        Args:
            data_dir: directory for config, data, logs and the pid file (created).
            port: PLAINTEXT client port; a free loopback port when None.
            controller_port: KRaft controller port; a free loopback port when None.
            ready_timeout_s: deadline for :meth:`start` (formatting included).
            libs_dir: directory with the Kafka jars; default :func:`default_libs_dir`.
                Fetched with scripts/kafka/fetch when missing.
            stop_timeout_s: how long :meth:`stop` waits after SIGTERM before SIGKILL.
            extra_config: broker properties added to / overriding the defaults.
        """
        self._data_dir = Path(data_dir).resolve()
        taken = [p for p in (port, controller_port) if p is not None]
        picked = iter(_free_ports(2 - len(taken), exclude=taken))
        self._port = port if port is not None else next(picked)
        self._controller_port = controller_port if controller_port is not None else next(picked)
        if self._port == self._controller_port:
            raise BrokerError(f"port and controller_port must differ (both {self._port})")
        self._ready_timeout_s = ready_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._libs_dir = Path(libs_dir).resolve() if libs_dir is not None else None
        self._extra_config = dict(extra_config or {})
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties ------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """The broker's directory (absolute)."""
        return self._data_dir

    @property
    def port(self) -> int:
        """The PLAINTEXT client port."""
        return self._port

    @property
    def controller_port(self) -> int:
        """The KRaft controller port."""
        return self._controller_port

    @property
    def bootstrap_servers(self) -> str:
        """``"127.0.0.1:PORT"`` for Kafka clients."""
        return f"{LOOPBACK}:{self._port}"

    @property
    def pid(self) -> int | None:
        """Pid of the running JVM, None when it is not running."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    @property
    def config_path(self) -> Path:
        """The generated ``server.properties``."""
        return self._data_dir / _CONFIG_FILE

    @property
    def pid_file(self) -> Path:
        """The file holding the JVM's pid while it runs."""
        return self._data_dir / _PID_FILE

    @property
    def log_path(self) -> Path:
        """The JVM's stdout/stderr (warnings, errors, crashes)."""
        return self._data_dir / _STDOUT_LOG

    @property
    def server_log_path(self) -> Path:
        """Kafka's INFO-level log."""
        return self._data_dir / _SERVER_LOG

    def is_running(self) -> bool:
        """Whether the JVM started by this object is alive."""
        return self.pid is not None

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> ApacheKafkaBroker:
        """Start the broker and return it."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the broker."""
        self.stop()

    def start(self) -> None:
        """Start the broker and block until it serves metadata on :attr:`bootstrap_servers`.

        Fetches the jars if needed, writes the config, formats storage on first
        use, launches the JVM and polls until a librdkafka admin client sees
        the broker. Raises BrokerError (with the log tail) if the JVM exits
        early or the deadline passes; the JVM is killed in that case.
        """
        deadline = time.monotonic() + self._ready_timeout_s
        if self.is_running():
            raise BrokerError(f"broker on {self.bootstrap_servers} is already running")
        other = _read_pid(self.pid_file)
        if other is not None and _is_broker_process(other, self.config_path):
            raise BrokerError(f"a broker from {self._data_dir} is already running (pid {other})")
        libs = _ensure_libs(self._libs_dir or default_libs_dir())
        java = _find_java()
        _check_port_free(self._port)
        _check_port_free(self._controller_port)

        self._data_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.config_path, self._server_properties())
        _write_atomic(self._data_dir / _LOG4J_FILE, _LOG4J2_PROPERTIES)
        self._format_storage(java, libs, deadline)

        proc = self._launch(java, libs)
        try:
            self._wait_ready(proc, deadline)
        except BaseException:
            _terminate(proc.pid, proc, 0.0, force=True)
            self.pid_file.unlink(missing_ok=True)
            self._proc = None
            _LIVE.discard(self)
            raise
        log.info("Kafka %s ready on %s (pid %d)", KAFKA_VERSION, self.bootstrap_servers, proc.pid)

    def stop(self) -> None:
        """Stop the broker: SIGTERM, wait up to ``stop_timeout_s``, then SIGKILL.

        A no-op when it is not running. Also stops a broker of the same
        ``data_dir`` known only from its pid file (e.g. started by the CLI).
        """
        self._end(force=False)

    def kill(self) -> None:
        """SIGKILL the broker (no clean shutdown), for fault-injection tests.

        :meth:`start` / :meth:`restart` afterwards recovers from the same data.
        """
        self._end(force=True)

    def restart(self) -> None:
        """Stop the broker, then start it again on the same ports and data."""
        self.stop()
        self.start()

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Block until the JVM exits (at most ``timeout_s``); return its exit status.

        Returns None if it is still running at the timeout or was never started
        by this object.
        """
        proc = self._proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def release(self) -> None:
        """Stop managing the JVM: it keeps running (pid file stays) past this process.

        Used by ``start`` on the command line; :func:`stop_broker` stops it later.
        """
        _LIVE.discard(self)
        self._proc = None

    # -- internals -------------------------------------------------------------

    def _end(self, *, force: bool) -> None:
        """Terminate (or, with ``force``, kill) the JVM and drop the pid file."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _terminate(proc.pid, proc, self._stop_timeout_s, force=force)
        else:
            pid = _read_pid(self.pid_file)
            if pid is not None and _is_broker_process(pid, self.config_path):
                _terminate(pid, None, self._stop_timeout_s, force=force)
        self.pid_file.unlink(missing_ok=True)
        self._proc = None
        _LIVE.discard(self)

    def _server_properties(self) -> str:
        """Render ``server.properties`` for this node."""
        props: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": str(NODE_ID),
            "controller.quorum.voters": f"{NODE_ID}@{LOOPBACK}:{self._controller_port}",
            "listeners": (
                f"PLAINTEXT://{LOOPBACK}:{self._port},CONTROLLER://{LOOPBACK}:{self._controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{self._port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": _escape_property(str(self._data_dir / _LOG_DIRS)),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "log.cleaner.enable": "true",
            "log.cleaner.dedupe.buffer.size": str(_CLEANER_DEDUPE_BUFFER_BYTES),
            # After a SIGKILL the controller refuses the node's new registration until
            # the old broker session expires (default 9 s); a shorter session makes
            # kill()+start() recover faster. Heartbeats must be more frequent than it.
            "broker.session.timeout.ms": str(_BROKER_SESSION_TIMEOUT_MS),
            "broker.heartbeat.interval.ms": str(_BROKER_HEARTBEAT_INTERVAL_MS),
        }
        props.update(self._extra_config)
        header = (
            f"# Generated by worker.brokers.apache (Kafka {KAFKA_VERSION}); rewritten on start\n"
        )
        return header + "".join(f"{key}={value}\n" for key, value in props.items())

    def _format_storage(self, java: str, libs: Path, deadline: float) -> None:
        """Format ``log.dirs`` with a fresh cluster id, unless already formatted."""
        if (self._data_dir / _LOG_DIRS / "meta.properties").is_file():
            return
        cmd = [
            java,
            "-cp",
            str(libs / "*"),
            f"-Dlog4j2.configurationFile={self._data_dir / _LOG4J_FILE}",
            f"-Dkafka.logs.dir={self._data_dir}",
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            _new_cluster_id(),
            "--config",
            str(self.config_path),
            "--ignore-formatted",
        ]
        timeout = max(min(_FORMAT_TIMEOUT_S, deadline - time.monotonic()), 1.0)
        try:
            done = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"formatting {self._data_dir / _LOG_DIRS} timed out") from exc
        if done.returncode != 0:
            raise BrokerError(
                f"kafka StorageTool format failed (exit {done.returncode}):\n"
                f"{done.stdout}{done.stderr}"
            )

    def _launch(self, java: str, libs: Path) -> subprocess.Popen[bytes]:
        """Start the JVM in its own session, logging to ``broker.out``; write the pid file."""
        cmd = [
            java,
            f"-Xmx{_HEAP}",
            # Kafka's own defaults (kafka-run-class.sh), minus the 1 GiB fixed heap.
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self._data_dir / _LOG4J_FILE}",
            # log4j2's own shutdown hook would otherwise stop logging before
            # Kafka's hook finishes, cutting the shutdown sequence from server.log.
            "-Dlog4j2.shutdownHookEnabled=false",
            f"-Dkafka.logs.dir={self._data_dir}",
            "-cp",
            str(libs / "*"),
            _MAIN_CLASS,
            str(self.config_path),
        ]
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        with open(self.log_path, "ab") as out:
            out.write(f"{_START_BANNER} Kafka {KAFKA_VERSION} at {stamp} ===\n".encode())
            out.flush()
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self._data_dir,
                    start_new_session=True,
                )
            except OSError as exc:
                raise BrokerError(f"cannot run {java}: {exc}") from exc
        self._proc = proc
        _LIVE.add(self)
        _write_atomic(self.pid_file, f"{proc.pid}\n")
        return proc

    def _failure(self, what: str) -> BrokerError:
        """Build a BrokerError quoting the tails of both log files."""
        parts = [what]
        for path in (self.log_path, self.server_log_path):
            tail = _tail(path, since=_START_BANNER if path == self.log_path else None)
            if tail:
                parts.append(f"--- last lines of {path} ---\n{tail}")
        return BrokerError("\n".join(parts))

    def _check_alive(self, proc: subprocess.Popen[bytes]) -> None:
        """Raise BrokerError if the JVM has already exited."""
        code = proc.poll()
        if code is not None:
            raise self._failure(f"Kafka broker exited early with status {code}")

    def _wait_ready(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        """Poll until the broker lists itself in a metadata response, or fail.

        First waits for the port to accept TCP connections (cheap, no client
        threads), then asks a librdkafka admin client for cluster metadata.
        """
        limit = f"{self._ready_timeout_s:g}s"
        timeout_msg = f"Kafka broker on {self.bootstrap_servers} not ready within {limit}"
        while True:
            self._check_alive(proc)
            if time.monotonic() >= deadline:
                raise self._failure(timeout_msg)
            try:
                with socket.create_connection((LOOPBACK, self._port), timeout=_POLL_INTERVAL_S):
                    break
            except OSError:
                time.sleep(_POLL_INTERVAL_S)

        for _ in self._probe_attempts(proc, deadline, timeout_msg):
            attempt_ms = int(1000 * max(min(_PROBE_ATTEMPT_S, deadline - time.monotonic()), 0.1))
            try:
                brokers = cluster_brokers(self.bootstrap_servers, timeout_s=attempt_ms / 1000.0)
            except BrokerError as exc:
                log.debug("readiness probe: %s", exc)
                continue
            if NODE_ID in brokers:
                return

    def _probe_attempts(
        self, proc: subprocess.Popen[bytes], deadline: float, timeout_msg: str
    ) -> Iterator[int]:
        """Yield attempt numbers, pausing between them; raise on exit or deadline."""
        attempt = 0
        while True:
            self._check_alive(proc)
            if time.monotonic() >= deadline:
                raise self._failure(timeout_msg)
            yield attempt
            attempt += 1
            time.sleep(_POLL_INTERVAL_S)


# Kafka logs INFO and above to server.log (rolled); only WARN and above reach the
# console, i.e. broker.out, so a crash's cause is easy to find there.
_LOG4J2_PROPERTIES = """\
# Generated by worker.brokers.apache; rewritten on start.
status = warn
name = refold-kafka

appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 10MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3

appender.console.type = Console
appender.console.name = console
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
appender.console.filter.threshold.type = ThresholdFilter
appender.console.filter.threshold.level = warn

rootLogger.level = info
rootLogger.appenderRef.file.ref = file
rootLogger.appenderRef.console.ref = console

logger.request.name = kafka.request.logger
logger.request.level = warn
"""


@atexit.register
def _stop_live_brokers() -> None:
    """Stop brokers this process started and did not release or stop."""
    for broker in list(_LIVE):
        try:
            broker.stop()
        except BrokerError as exc:  # pragma: no cover - best effort at exit
            log.warning("could not stop Kafka broker in %s: %s", broker.data_dir, exc)


# -- command line -----------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    """Return the argparse parser for ``python -m worker.brokers.apache``."""
    parser = argparse.ArgumentParser(
        prog="python -m worker.brokers.apache",
        description=f"Run a single-node Apache Kafka {KAFKA_VERSION} broker (KRaft) on 127.0.0.1.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_start_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--port", type=int, default=None, help="client port (default: a free one)")
        p.add_argument("--controller-port", type=int, default=None, help="KRaft controller port")
        p.add_argument("--data-dir", type=Path, required=True, help="broker directory")
        p.add_argument(
            "--libs-dir",
            type=Path,
            default=None,
            help=f"Kafka jars (default: ${LIBS_ENV} or cache)",
        )
        p.add_argument(
            "--ready-timeout",
            type=float,
            default=DEFAULT_READY_TIMEOUT_S,
            help="seconds to wait for readiness",
        )

    add_start_args(
        sub.add_parser("start", help="start, wait until ready, print 'ready HOST:PORT', detach")
    )
    add_start_args(sub.add_parser("run", help="run in the foreground until SIGINT/SIGTERM"))
    stop = sub.add_parser("stop", help="stop the broker whose pid file is in --data-dir")
    stop.add_argument("--data-dir", type=Path, required=True, help="broker directory")
    stop.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_STOP_TIMEOUT_S,
        help="seconds after SIGTERM before SIGKILL",
    )
    return parser


def _broker_from_args(args: argparse.Namespace) -> ApacheKafkaBroker:
    """Build a broker from parsed ``start`` / ``run`` arguments."""
    return ApacheKafkaBroker(
        data_dir=args.data_dir,
        port=args.port,
        controller_port=args.controller_port,
        ready_timeout_s=args.ready_timeout,
        libs_dir=args.libs_dir,
    )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """Signal handler turning SIGTERM into KeyboardInterrupt for ``run``."""
    raise KeyboardInterrupt


def _run_foreground(broker: ApacheKafkaBroker) -> int:
    """Start ``broker``, wait for SIGINT/SIGTERM or its exit, stop it. Return exit status."""
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and then
    # Python installs no KeyboardInterrupt handler of its own.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        broker.start()
        print(f"ready {broker.bootstrap_servers}", flush=True)
        print(f"pid {broker.pid}", flush=True)
        code = broker.wait()
        print(f"Kafka broker exited with status {code}; see {broker.log_path}", file=sys.stderr)
        broker.stop()
        return 1
    except KeyboardInterrupt:
        broker.stop()
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m worker.brokers.apache``; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "stop":
            stopped = stop_broker(args.data_dir, args.timeout)
            print(f"stopped pid {stopped}" if stopped is not None else "not running", flush=True)
            return 0
        broker = _broker_from_args(args)
        if args.command == "run":
            return _run_foreground(broker)
        broker.start()
        pid = broker.pid
        broker.release()
        print(f"ready {broker.bootstrap_servers}", flush=True)
        print(f"pid {pid}", flush=True)
        return 0
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
