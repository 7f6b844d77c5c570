"""``refold archive`` as a real child process, a rating stream with app retries and
invalid messages, and readers of what the archive holds."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq

from tests.kit import ROOT, Topics, broker_choice, kafka_settings
from worker.core.wire import RatingEvent, VideoEvent, encode
from worker.kafkaio import Publisher, ensure_topics, make_producer

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def _session_env() -> dict[str, str]:
    """A 2 s session on both test brokers (the Apache fixture allows 1 s): after a kill -9
    the dead member leaves the group within 2 s, so a restart joins quickly."""
    if broker_choice() in ("tansu", "apache"):
        return {"REFOLD_SESSION_TIMEOUT_MS": "2000", "REFOLD_HEARTBEAT_INTERVAL_MS": "500"}
    return {}


class ArchiveProcess:
    """``refold archive`` as a child process logging to ``log_path`` (appended)."""

    def __init__(
        self, *, bootstrap: str, topics: Topics, out: Path, log_path: Path, **env: str
    ) -> None:
        self.env = {
            **os.environ,
            "REFOLD_BOOTSTRAP_SERVERS": bootstrap,
            "REFOLD_ARCHIVE_OUT": str(out),
            "REFOLD_ARCHIVE_GROUP": f"{topics.prefix}-archive",
            "PYTHONUNBUFFERED": "1",
            **_session_env(),
            **topics.env(),
            **env,
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._joined_before = self._rolled_before = 0

    def start(self) -> ArchiveProcess:
        self._joined_before = self._count("partitions assigned;")
        self._rolled_before = self._count("worker.archive: roll ")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker", "archive"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        return self

    def _count(self, text: str) -> int:
        return (
            self.log_path.read_text(errors="replace").count(text) if self.log_path.exists() else 0
        )

    def joined(self) -> bool:
        return self._count("partitions assigned;") > self._joined_before

    def wait_joined(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.joined():
            assert self.alive(), self.log_tail()
            assert time.monotonic() < deadline, "archive never joined:\n" + self.log_tail()
            time.sleep(0.02)  # polling a log file; bounded by the deadline

    def wait_rolled(self, timeout_s: float = 60.0, *, unless: Callable[[], bool]) -> None:
        """Until this process has written a roll, or joined once ``unless()`` is true (no
        more rows will come)."""
        deadline = time.monotonic() + timeout_s
        while self._count("worker.archive: roll ") <= self._rolled_before and not (
            unless() and self.joined()
        ):
            assert self.alive(), self.log_tail()
            assert time.monotonic() < deadline, "archive wrote no roll:\n" + self.log_tail()
            time.sleep(0.02)  # polling a log file; bounded by the deadline

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log_tail(self, n: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


@dataclass
class Message:
    topic: str
    key: bytes | None
    value: bytes | None


@dataclass
class Stream:
    messages: list[Message]
    valid_ids: set[str]  # every valid rating event id (retries counted once)
    videos: set[str]
    invalid: int


def make_stream(
    topics: Topics, n: int, *, users: int = 30, seed: int = 7, retry: float = 0.1,
    invalid: float = 0.02, videos: int = 5,
) -> Stream:  # fmt: skip
    """``n`` valid rating events, a ``retry`` share of them sent again (same event id,
    same bytes, as an app retrying a send), an ``invalid`` share of bad messages between
    them (not JSON, failing validation, a key that is not the user), and ``videos``
    announced videos."""
    rng = random.Random(seed)
    t = topics.settings
    out: list[Message] = []
    ids: set[str] = set()
    bad = 0
    for i in range(n):
        user = f"u{rng.randrange(users)}"
        action = rng.choice(["view", "view", "view", "like", "neutral", "dislike"])
        ev = RatingEvent(
            event_id=f"ev{seed}-{i}",
            user_id=user,
            video_id=f"v{rng.randrange(videos)}",
            action=action,  # type: ignore[arg-type]
            watch_seconds=rng.uniform(5, 600) if action == "view" else None,
            ts=T0 + timedelta(seconds=i),
        )
        ids.add(ev.event_id)
        msg = Message(t.ratings, user.encode(), encode(ev))
        out.append(msg)
        if rng.random() < retry:
            out.append(msg)
        if rng.random() < invalid:
            bad += 1
            kind = rng.randrange(3)
            if kind == 0:
                out.append(Message(t.ratings, user.encode(), b"\x00not json"))
            elif kind == 1:
                out.append(Message(t.ratings, user.encode(), b'{"event_id": "x"}'))
            else:
                other = RatingEvent(**{**ev.model_dump(), "event_id": f"bad{seed}-{i}"})
                out.append(Message(t.ratings, b"someone-else", encode(other)))
    vids = set()
    for v in range(videos):
        vid = f"v{v}"
        vids.add(vid)
        ve = VideoEvent(video_id=vid, duration_seconds=600.0, category=f"c{v % 2}",
                        author_id=f"a{v}", title=f"video {v}", published_at=T0)  # fmt: skip
        out.insert(rng.randrange(len(out) + 1), Message(t.videos, vid.encode(), encode(ve)))
    return Stream(messages=out, valid_ids=ids, videos=vids, invalid=bad)


def create_topics(bootstrap: str, topics: Topics, partitions: int = 3) -> None:
    t = topics.settings
    ensure_topics(
        kafka_settings(bootstrap), {t.ratings: partitions, t.videos: 1}, compacted={t.videos}
    )


def send(bootstrap: str, messages: list[Message]) -> None:
    """Send and wait for every acknowledgement (keys land on partitions by murmur2)."""
    pub = Publisher(make_producer(kafka_settings(bootstrap)))
    try:
        for m in messages:
            pub.send(m.topic, key=m.key, value=m.value)
        pub.confirm()
    finally:
        pub.close()


def visible_files(out: Path, kind: str) -> list[Path]:
    """What a reader globbing ``*.parquet`` sees (bootstrap's resolve_paths)."""
    d = out / kind
    return (
        sorted(p for p in d.glob("*.parquet") if not p.name.startswith(".")) if d.is_dir() else []
    )


def archived_ids(out: Path) -> list[str]:
    """Every archived rating event id, duplicates included; every visible file must open."""
    ids: list[str] = []
    for kind in ("logs", "reactions"):
        for p in visible_files(out, kind):
            ids += pq.read_table(p, columns=["event_id"]).column(0).to_pylist()
    return ids


def archived_videos(out: Path) -> list[str]:
    vids: list[str] = []
    for p in visible_files(out, "videos"):
        vids += pq.read_table(p, columns=["video_id"]).column(0).to_pylist()
    return vids


def wait_archived(out: Path, want: set[str], archive: ArchiveProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not want <= set(archived_ids(out)):
        assert archive.alive(), archive.log_tail()
        missing = len(want - set(archived_ids(out)))
        assert time.monotonic() < deadline, f"{missing} events never archived\n{archive.log_tail()}"
        time.sleep(0.05)  # polling files; bounded by the deadline
