"""``refold archive`` end to end: a real broker, a real ``refold archive`` process, real
Parquet that bootstrap's reader and ``refold retrain``'s inputs take as they are."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.archive_process import (
    T0,
    ArchiveProcess,
    archived_ids,
    archived_videos,
    create_topics,
    make_stream,
    send,
    wait_archived,
)
from tests.kit import ROOT, Topics
from worker.data.ingest import build_interactions

pytestmark = pytest.mark.integration


def test_archive_holds_each_valid_event_once_in_the_bootstrap_layout(
    broker: str, topics: Topics, tmp_path: Path
) -> None:
    out = tmp_path / "archive"
    stream = make_stream(topics, 600)
    assert len(stream.messages) > len(stream.valid_ids) + stream.invalid  # retries are in it
    create_topics(broker, topics)
    archive = ArchiveProcess(bootstrap=broker, topics=topics, out=out,
                             log_path=tmp_path / "archive.log",
                             REFOLD_ARCHIVE_ROLL_ROWS="100",
                             REFOLD_ARCHIVE_ROLL_SECONDS="0.3").start()  # fmt: skip
    try:
        archive.wait_joined()
        send(broker, stream.messages)
        wait_archived(out, stream.valid_ids, archive, timeout_s=60)
        assert archive.terminate() == 0
    finally:
        archive.stop()
    ids = Counter(archived_ids(out))
    assert set(ids) == stream.valid_ids and max(ids.values()) == 1
    assert sorted(archived_videos(out)) == sorted(stream.videos)
    assert not list(out.rglob("*.tmp"))
    log = archive.log_path.read_text()
    assert log.count("not archived:") == stream.invalid
    # Rolled by rows: no rating file holds more than --roll-rows rows.
    res = subprocess.run([sys.executable, "-m", "worker", "archive", "summary", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    doc = json.loads(res.stdout)
    assert doc["rows"]["logs"] + doc["rows"]["reactions"] == len(stream.valid_ids)
    assert doc["rows"]["videos"] == len(stream.videos)
    assert doc["incomplete_files"] == doc["temporary_files"] == 0
    rt = doc["topics"][topics.settings.ratings]
    assert rt["rolls"] >= len(stream.valid_ids) // 100
    assert sorted(rt["offsets"]) == ["0", "1", "2"]
    # Every ratings offset 0..last of each partition is in exactly one roll.
    assert sum(p["last"] + 1 for p in rt["offsets"].values()) == sum(
        1 for m in stream.messages if m.topic == topics.settings.ratings
    )
    # What bootstrap and retrain read: the three directories, as they are.
    inter = build_interactions(out / "logs", out / "videos", reactions=out / "reactions",
                               progress=False)  # fmt: skip
    assert inter.summary["rows_read"] == doc["rows"]["logs"]
    assert inter.summary["reactions"]["rows_read"] == doc["rows"]["reactions"]
    assert set(inter.items.ids) == stream.videos
    # What retrain takes from ARCHIVE: its inputs, time range and event table.
    from worker.eval.events import load_events
    from worker.retrain import _archive_part, _time_range_us

    logs = _archive_part(out, "logs")
    assert logs == [str(out / "logs")] and _archive_part(out, "reactions")
    lo, hi = _time_range_us(logs, "event_timestamp")
    assert lo >= int(T0.timestamp() * 1e6) and hi > lo
    table = load_events(logs, out / "videos", out / "reactions")
    assert len(table) == len(stream.valid_ids)


def test_restart_resumes_from_the_files_not_the_committed_offsets(
    broker: str, topics: Topics, tmp_path: Path
) -> None:
    """A second run in a fresh group (no committed offsets at all) archives nothing twice;
    a second process on the same directory is refused."""
    out = tmp_path / "archive"
    first, second = make_stream(topics, 200, seed=1), make_stream(topics, 200, seed=2)
    create_topics(broker, topics)
    send(broker, first.messages)
    log_path = tmp_path / "archive.log"
    env = {"REFOLD_ARCHIVE_ROLL_SECONDS": "0.2"}
    a = ArchiveProcess(bootstrap=broker, topics=topics, out=out, log_path=log_path, **env)
    a.start()
    try:
        wait_archived(out, first.valid_ids, a, timeout_s=60)
        other = subprocess.run([sys.executable, "-m", "worker", "archive"], env=a.env, cwd=ROOT,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert other.returncode == 1 and "another refold archive is writing" in other.stderr
        assert a.terminate() == 0
    finally:
        a.stop()
    send(broker, second.messages)
    b = ArchiveProcess(bootstrap=broker, topics=topics, out=out, log_path=log_path,
                       REFOLD_ARCHIVE_GROUP=f"{topics.prefix}-fresh", **env).start()  # fmt: skip
    try:
        wait_archived(out, first.valid_ids | second.valid_ids, b, timeout_s=60)
        assert b.terminate() == 0
    finally:
        b.stop()
    ids = Counter(archived_ids(out))
    assert set(ids) == first.valid_ids | second.valid_ids and max(ids.values()) == 1
