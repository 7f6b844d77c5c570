"""The live harness: a broker, real ``refold worker`` processes and a list collector;
:func:`replay_live` sends the replayed events through Kafka and records every list."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from worker.config import KafkaSettings, TopicSettings
from worker.core.model import Model
from worker.core.wire import (
    RatingEvent,
    Recommendations,
    VideoEvent,
    decode_recommendations,
    encode,
)
from worker.errors import ConfigError, DecodeError
from worker.eval.events import (
    _ASSIGNMENT_LINE,
    _CLOSE_S,
    _COLLECT_POLL_MS,
    _WORKER_STOP_S,
    PROBE_USER,
    EventTable,
    ReplayError,
    Request,
    _dt,
    _event_id,
    _replay_index,
    rating_event,
    video_event,
)

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]


# ---- the live worker -------------------------------------------------------------------------


# The replay checks each worker's lists against an in-process engine fed that worker's
# own batches; shared popularity counts arrive a loop turn or more after the batch that
# caused them, so cold-start lists would differ by timing. Each worker counts its own.
_WORKER_ENV = {"REFOLD_SHARED_POPULARITY": "false"}


@dataclass
class LiveList:
    """A list read from the recommendations topic, with when it arrived."""

    recs: Recommendations
    received_s: float  # wall clock (time.time()) when the replay's consumer got it
    kafka_ts_ms: int  # the record's Kafka timestamp (the worker's producer create time)


class LiveWorker:
    """A broker, fresh topics, ``refold worker`` subprocesses, a producer and a list collector.

    Use as a context manager. The broker is the embedded Tansu one unless
    ``bootstrap_servers`` names a running one; topics get a unique prefix, so a
    shared broker is fine. The workers run with the ordinary CLI, so this is the
    same code path as production (``durable=False`` skips the changelog for speed).

    ``workers`` processes join one consumer group on topics of ``partitions``
    partitions (default: one per worker). The harness sends nothing until the
    group is stable, every worker owning at least one partition (read from the
    workers' ``partitions [...] assigned/revoked`` log lines: the embedded broker
    answers DescribeGroups with no members), and then one probe user per
    partition, sent to that partition, so that every partition's owner has
    published a list. Lists are keyed by user and a user's partition belongs to
    one worker at a time, so the collector reads every partition of the
    recommendations topic and needs no notion of which worker wrote a list.

    Several workers share new videos' factors through their owners
    (``shared_items``): a list is then ranked with the latest update that worker had
    installed, so the in-process mirror of the lists (``--check-every``) agrees only
    up to that timing. One worker solves them in its own batch and is mirrored exactly.
    """

    def __init__(
        self,
        *,
        model_dir: Path,
        probe_video: str,
        bootstrap_servers: str | None = None,
        log_path: Path | None = None,
        durable: bool = False,
        startup_timeout_s: float = 180.0,
        extra_env: dict[str, str] | None = None,
        workers: int = 1,
        partitions: int | None = None,
        probe_ts: datetime | None = None,
    ) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        self.partitions = workers if partitions is None else partitions
        if self.partitions < workers:
            raise ConfigError(
                f"{workers} workers need at least as many partitions, got {self.partitions}"
            )
        self.workers = workers
        self.model_dir = model_dir
        self.probe_video = probe_video
        # The probe's event time. A replay passes its first event's: the probe then does not
        # move the workers' clock (live popularity decays to the latest event time) ahead
        # of the replayed events, as a wall-clock probe years after them would.
        self.probe_ts = probe_ts
        self.given_servers = bootstrap_servers
        self.log_path = log_path
        self.durable = durable
        self.startup_timeout_s = startup_timeout_s
        self.extra_env = extra_env or {}
        prefix = f"refold-eval-{uuid.uuid4().hex[:8]}"
        self.topics = TopicSettings(
            ratings=f"{prefix}.ratings",
            recommendations=f"{prefix}.recommendations",
            videos=f"{prefix}.videos",
            dlq=f"{prefix}.ratings.dlq",
            changelog=f"{prefix}.changelog",
            control=f"{prefix}.models",
            item_contributions=f"{prefix}.item-contributions",
            item_updates=f"{prefix}.item-updates",
            popularity_pairs=f"{prefix}.popularity-pairs",
            popularity=f"{prefix}.popularity",
        )
        self.group = f"{prefix}-worker"
        self.lists: list[LiveList] = []
        self.list_of_event: dict[str, int] = {}  # event id -> index in self.lists
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._topic_ready = threading.Event()
        self._broker: Any = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._thread: threading.Thread | None = None
        self._collector_error: BaseException | None = None
        self._log_files: list[Any] = []
        self._log_dir: tempfile.TemporaryDirectory[str] | None = None
        self.log_paths: list[Path | None] = []
        #: Probe events sent at start-up (one per partition); lists reflect them too.
        self.probes = 0
        self.producer: Any = None
        self.bootstrap_servers = ""

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> LiveWorker:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        from worker.kafkaio import Publisher, ensure_topics, make_producer

        if self.given_servers:
            self.bootstrap_servers = self.given_servers
        else:
            from worker.brokers.tansu import TansuBroker

            self._broker = TansuBroker().start()
            self.bootstrap_servers = self._broker.bootstrap_servers
        kafka = KafkaSettings(bootstrap_servers=self.bootstrap_servers)
        t = self.topics
        # Created here with every worker's partition count, before any worker starts
        # (each worker would otherwise create them with its default of one partition).
        single = {t.dlq, t.videos, t.control, t.item_updates, t.popularity}  # broadcast or DLQ
        names = set(t.model_dump().values())
        ensure_topics(
            kafka,
            {name: 1 if name in single else self.partitions for name in names},
            compacted=names - {t.ratings, t.recommendations, t.dlq},
        )
        pkg_root = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            "REFOLD_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "REFOLD_MODEL": str(self.model_dir),
            "REFOLD_GROUP": self.group,
            "REFOLD_DURABLE": "true" if self.durable else "false",
            "PYTHONUNBUFFERED": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(
                [pkg_root, *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            **{f"REFOLD_TOPIC_{k.upper()}": v for k, v in t.model_dump().items()},
            # One worker solves its new videos itself, in its batch (the same exact solve
            # as an owner's, worker.core.items), so its lists can be mirrored in-process
            # list for list; several share them through the owners, asynchronously.
            "REFOLD_SHARED_ITEMS": "true" if self.workers > 1 else "false",
            **_WORKER_ENV,
            **self.extra_env,
        }
        self.log_paths = self._worker_log_paths()
        for i, path in enumerate(self.log_paths):
            log_file = (
                open(path, "ab")  # noqa: SIM115 - closed in close()
                if path is not None
                else subprocess.DEVNULL
            )
            self._log_files.append(log_file)
            self._procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "worker", "worker"],
                    env={**env, "REFOLD_CLIENT_ID": f"{self.group}-{i}"},
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            )
        self._thread = threading.Thread(target=self._collect, name="replay-collector", daemon=True)
        self._thread.start()
        self._wait(self._topic_ready.is_set, self.startup_timeout_s, "the worker's topics")
        if self.workers > 1:
            self._wait(
                self._group_stable,
                self.startup_timeout_s,
                f"a stable group of {self.workers} workers",
            )
        self.producer = Publisher(make_producer(kafka))
        now = self.probe_ts or datetime.now(timezone.utc)
        probes = [
            RatingEvent(
                event_id=f"probe-{uuid.uuid4().hex}",
                user_id=PROBE_USER if p == 0 else f"{PROBE_USER}{p}",
                video_id=self.probe_video,
                action="view",
                watch_seconds=0.0,
                ts=now,
            )
            for p in range(self.partitions)
        ]
        for p, probe in enumerate(probes):
            self.producer.send(
                t.ratings, key=probe.user_id.encode("utf-8"), value=encode(probe), partition=p
            )
        self.flush()
        self.probes = len(probes)
        self._wait(
            lambda: all(p.event_id in self.list_of_event for p in probes),
            self.startup_timeout_s,
            "the workers' first lists (group join)",
        )

    def _worker_log_paths(self) -> list[Path | None]:
        """One log per worker: ``log_path`` itself for one worker, ``stem.i.suffix`` for more.

        Several workers always log (to a temporary directory without ``log_path``): the
        group's readiness is read from their logs.
        """
        if self.workers == 1:
            return [self.log_path]
        base = self.log_path
        if base is None:
            self._log_dir = tempfile.TemporaryDirectory(prefix="refold-eval-logs-")
            base = Path(self._log_dir.name) / "worker.log"
        return [base.with_name(f"{base.stem}.{i}{base.suffix}") for i in range(self.workers)]

    def owned_partitions(self) -> list[set[int]]:
        """The partitions each worker owns now, from its ``assigned``/``revoked`` log lines."""
        out: list[set[int]] = []
        for path in self.log_paths:
            owned: set[int] = set()
            text = path.read_text(errors="replace") if path is not None and path.exists() else ""
            for m in _ASSIGNMENT_LINE.finditer(text):
                parts = {int(x) for x in m.group(1).split(",") if x.strip()}
                owned = owned | parts if m.group(2) == "assigned" else owned - parts
            out.append(owned)
        return out

    def _group_stable(self) -> bool:
        """Every worker owns a partition, no partition twice, every partition once."""
        owned = self.owned_partitions()
        union: set[int] = set().union(*owned)
        return (
            all(owned)
            and sum(map(len, owned)) == len(union)
            and union == set(range(self.partitions))
        )

    def close(self) -> None:
        """Stop the worker (SIGTERM, a graceful exit), the collector, the producer, the broker."""
        if self.producer is not None:
            with contextlib.suppress(Exception):
                self.producer.close(timeout_s=_CLOSE_S)
            self.producer = None
        running = [p for p in self._procs if p.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)  # all at once: they stop in parallel
        for proc in running:
            try:
                proc.wait(timeout=_WORKER_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=_CLOSE_S)
        self._procs = []
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=_CLOSE_S)
            self._thread = None
        for log_file in self._log_files:
            if log_file is not subprocess.DEVNULL:
                log_file.close()
        self._log_files = []
        if self._log_dir is not None:
            self._log_dir.cleanup()
            self._log_dir = None
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    @property
    def worker_exit_code(self) -> int | None:
        """The exit code of the first worker that has exited, or None while all run."""
        for proc in self._procs:
            code = proc.poll()
            if code is not None:
                return code
        return None

    def log_tail(self, lines: int = 40) -> str:
        tails = []
        for i, path in enumerate(self.log_paths):
            if path is None or not path.exists():
                continue
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            tails.append(tail if len(self.log_paths) == 1 else f"-- worker {i} --\n{tail}")
        return "\n".join(tails)

    # ---- the collector -----------------------------------------------------------------------

    def _collect(self) -> None:
        from worker.kafkaio import open_topic_reader, poll_batch

        consumer = None
        try:
            # The worker creates the topic at start-up; the reader waits for its metadata.
            consumer = open_topic_reader(
                KafkaSettings(bootstrap_servers=self.bootstrap_servers),
                self.topics.recommendations,
                stop=self._stop.is_set,
                **{"fetch.wait.max.ms": 10},  # Tansu's fetch latency follows this (never 0)
            )
            if consumer is None:
                return
            self._topic_ready.set()
            while not self._stop.is_set():
                records = poll_batch(consumer, 10_000, _COLLECT_POLL_MS / 1000.0)
                now = time.time()
                for r in records:
                    try:
                        recs = decode_recommendations(r.value() or b"")
                    except DecodeError as exc:
                        log.warning("undecodable list at offset %s: %s", r.offset(), exc)
                        continue
                    with self.cond:
                        self.lists.append(LiveList(recs, now, int(r.timestamp()[1])))
                        for eid in recs.event_ids:
                            self.list_of_event[eid] = len(self.lists) - 1
                        self.cond.notify_all()
        except Exception as exc:  # reported by the waiting thread
            self._collector_error = exc
            with self.cond:
                self.cond.notify_all()
        finally:
            if consumer is not None:
                consumer.close()

    # ---- sending and waiting -----------------------------------------------------------------

    def send(self, event: RatingEvent) -> float:
        """Send one event keyed by its user; returns the wall-clock send time."""
        now = time.time()
        self.producer.send(
            self.topics.ratings, key=event.user_id.encode("utf-8"), value=encode(event)
        )
        return now

    def announce(self, video: VideoEvent) -> None:
        """Register a video on the ``videos`` topic."""
        self.producer.send(
            self.topics.videos, key=video.video_id.encode("utf-8"), value=encode(video)
        )

    def flush(self) -> None:
        """Wait until every sent record is acknowledged."""
        self.producer.confirm()

    def reflected(self) -> int:
        """How many distinct event ids the published lists reflect so far."""
        return len(self.list_of_event)

    def check(self) -> None:
        """Raise :class:`ReplayError` when the worker or the collector has died."""
        if self._collector_error is not None:
            raise ReplayError(f"the list collector failed: {self._collector_error}")
        code = self.worker_exit_code
        if code is not None:
            raise ReplayError(f"the worker exited with code {code}:\n{self.log_tail()}")

    def _wait(self, cond: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not cond():
                self.check()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ReplayError(f"timed out after {timeout_s:.0f}s waiting for {what}")
                self.cond.wait(timeout=min(left, 0.2))

    def wait_reflected(self, at_least: int, *, stall_s: float, what: str) -> None:
        """Wait until ``at_least`` events are reflected; fail after ``stall_s`` without progress."""
        last, since = -1, time.monotonic()
        with self.cond:
            while self.reflected() < at_least:
                self.check()
                now = self.reflected()
                if now != last:
                    last, since = now, time.monotonic()
                elif time.monotonic() - since > stall_s:
                    raise ReplayError(
                        f"no progress for {stall_s:.0f}s waiting for {what} "
                        f"({now} of {at_least} events reflected):\n{self.log_tail()}"
                    )
                self.cond.wait(timeout=0.2)

    def wait_for_events(self, event_ids: Sequence[str], *, timeout_s: float) -> list[LiveList]:
        """The list that reflects each of ``event_ids`` (waiting for all of them)."""
        self._wait(
            lambda: all(e in self.list_of_event for e in event_ids),
            timeout_s,
            f"lists for {len(event_ids)} events",
        )
        with self.cond:
            return [self.lists[self.list_of_event[e]] for e in event_ids]


@dataclass
class LiveResult:
    """What the live replay produced."""

    requests: list[Request]
    event_latency_ms: F64  # per replayed event: send -> a list reflecting it was received
    event_publish_ms: F64  # per replayed event: send -> that list's Kafka timestamp
    sent: int
    skipped: int
    announced: int
    wall_s: float
    worker_startup_s: float
    events_per_s: float


def live_batch_ends(
    lists: Iterable[Recommendations], index: Callable[[str], int | None]
) -> dict[object, int]:
    """The last sent event of each live worker batch, keyed by the batch's ``generated_at``.

    The lists of one worker batch share their ``generated_at``; the batch ends at the
    last event any of them reflects. ``index`` gives an event id's position in send
    order, or None for ids that were not sent (the worker's start-up probe).
    """
    ends: dict[object, int] = {}
    for recs in lists:
        idxs = [i for i in map(index, recs.event_ids) if i is not None]
        if idxs:
            ends[recs.generated_at] = max(ends.get(recs.generated_at, -1), *idxs)
    return ends


def replay_live(
    table: EventTable,
    split: int,
    end: int,
    *,
    model_dir: Path,
    model: Model,
    bootstrap_servers: str | None,
    max_in_flight: int,
    rate: float,
    log_path: Path | None,
    durable: bool,
    stall_s: float,
    progress: bool,
    workers: int = 1,
    partitions: int | None = None,
    popularity_half_life_s: float | None = None,
) -> LiveResult:
    """Send events ``[split, end)`` to live workers; collect one request per published list.

    ``workers`` processes share one consumer group (see :class:`LiveWorker`).
    """
    n = end - split
    send_s = np.full(n, np.nan)
    announced: set[str] = set()
    skipped = 0
    t_start = time.monotonic()
    with LiveWorker(
        model_dir=model_dir,
        probe_video=model.items.id_of(0),
        bootstrap_servers=bootstrap_servers,
        log_path=log_path,
        durable=durable,
        workers=workers,
        partitions=partitions,
        probe_ts=_dt(int(table.ts[split])),
        extra_env=(
            {"REFOLD_POPULARITY_HALF_LIFE_S": repr(popularity_half_life_s)}
            if popularity_half_life_s
            else None
        ),
    ) as live:
        started = time.monotonic()
        worker_startup_s = started - t_start
        sent = 0
        bar = tqdm(total=n, desc="replay (kafka)", unit="ev", disable=not progress)
        for j in range(n):
            i = split + j
            vid = table.video_ids[int(table.video[i])]
            if vid not in model.items and vid not in announced:
                announced.add(vid)
                ev = video_event(vid, table.videos.get(vid), int(table.ts[i]))
                if ev is not None:
                    live.announce(ev)
            try:
                event = rating_event(table, i, _event_id(j))
            except ValueError:
                skipped += 1  # an id the wire rejects (too long, control characters)
                continue
            if sent + live.probes - live.reflected() >= max_in_flight:  # events in flight
                live.wait_reflected(
                    sent + live.probes + 1 - max_in_flight, stall_s=stall_s, what="the worker"
                )
            if rate > 0:
                lag = started + sent / rate - time.monotonic()
                if lag > 0:
                    time.sleep(lag)  # pacing to --rate events per second
            send_s[j] = live.send(event)
            sent += 1
            bar.update(1)
        live.flush()
        live.wait_reflected(sent + live.probes, stall_s=stall_s, what="the last lists")
        bar.close()
        wall = time.monotonic() - started
        lists = list(live.lists)
    requests, lat, pub = _requests_of(table, split, lists, send_s)
    requests.sort(key=lambda r: r.idx)
    return LiveResult(
        requests=requests,
        event_latency_ms=lat[np.isfinite(lat)],
        event_publish_ms=pub[np.isfinite(pub)],
        sent=sent,
        skipped=skipped,
        announced=len(announced),
        wall_s=wall,
        worker_startup_s=worker_startup_s,
        events_per_s=sent / wall if wall > 0 else 0.0,
    )


def _requests_of(
    table: EventTable, split: int, lists: list[LiveList], send_s: F64
) -> tuple[list[Request], F64, F64]:
    """One request point per published list (the probe's excluded), and per replayed event
    the latency to its first list received and to that list's publication (NaN: none)."""
    n = len(send_s)
    lat = np.full(n, np.nan)
    pub = np.full(n, np.nan)
    requests: list[Request] = []
    batch_end = live_batch_ends((lst.recs for lst in lists), _replay_index)
    for lst in lists:
        idxs = [j for j in map(_replay_index, lst.recs.event_ids) if j is not None]
        if not idxs:
            continue  # the probe's list
        for j in idxs:
            lat[j] = (lst.received_s - send_s[j]) * 1000.0
            pub[j] = lst.kafka_ts_ms - send_s[j] * 1000.0
        last = max(idxs)
        user = int(table.user[split + last])
        if table.user_ids[user] != lst.recs.user_id:
            raise ReplayError(f"list for {lst.recs.user_id} reflects an event of another user")
        requests.append(
            Request(
                user=user,
                idx=last,
                live=[it.video_id for it in lst.recs.items],
                strategy=lst.recs.strategy,
                latency_ms=float(lat[last]),
                publish_latency_ms=float(pub[last]),
                batch_end=batch_end[lst.recs.generated_at],
            )
        )
    return requests, lat, pub


def batched_requests(table: EventTable, split: int, end: int, batch: int) -> list[Request]:
    """Request points as a worker polling ``batch`` events at a time would publish them."""
    out: list[Request] = []
    for lo in range(0, end - split, batch):
        hi = min(end - split, lo + batch)
        last: dict[int, int] = {}
        for j in range(lo, hi):
            last[int(table.user[split + j])] = j
        out += [Request(user=u, idx=j) for u, j in last.items()]
    out.sort(key=lambda r: r.idx)
    return out
