"""``refold archive`` under kill -9: five kills at random points (during start-up and
restore, mid-stream, mid-roll) while events flow; afterwards the archive holds every
valid event exactly once, every visible file opens, and no temporary file is left."""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.archive_process import (
    ArchiveProcess,
    archived_ids,
    archived_videos,
    create_topics,
    make_stream,
    send,
    visible_files,
    wait_archived,
)
from tests.kit import Topics
from worker.archive import summary

pytestmark = pytest.mark.fault

KILLS = 5
#: Messages per send and the pause between sends: ~2,400 messages over ~9 s, so the
#: stream is mostly still flowing while the archive is killed and restarted.
CHUNK, PAUSE_S = 40, 0.15


def test_kill9_five_times_keeps_every_valid_event_once(
    broker: str, topics: Topics, tmp_path: Path
) -> None:
    seed = int(os.environ.get("REFOLD_FAULT_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)  # the kill points; a failure names the seed to rerun with
    out = tmp_path / "archive"
    stream = make_stream(topics, 2000, seed=3)
    create_topics(broker, topics)
    # Small rolls written often: kills land between rolls, inside one, and in restores.
    archive = ArchiveProcess(bootstrap=broker, topics=topics, out=out,
                             log_path=tmp_path / "archive.log",
                             REFOLD_ARCHIVE_ROLL_ROWS="37",
                             REFOLD_ARCHIVE_ROLL_SECONDS="0.15")  # fmt: skip
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for i in range(0, len(stream.messages), CHUNK):
                send(broker, stream.messages[i : i + CHUNK])
                time.sleep(PAUSE_S)  # pacing the producer, not waiting on a condition
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)

    producer = threading.Thread(target=produce, daemon=True)
    kills: list[str] = []
    try:
        archive.start()
        archive.wait_joined()
        producer.start()
        for k in range(KILLS):
            if k % 2:  # anywhere from start-up on: scan, restore, join, or first rolls
                archive.start()
                time.sleep(rng.uniform(0.05, 1.5))  # a random kill point
                kills.append("joined" if archive.joined() else "starting")
            else:  # mid-stream: a random time after this process wrote its first roll
                if not archive.alive():
                    archive.start()
                archive.wait_rolled(unless=lambda: not producer.is_alive())
                time.sleep(rng.uniform(0.0, 0.6))  # a random kill point
                kills.append("streaming")
            assert archive.alive(), archive.log_tail()
            archive.kill9()
        producer.join(timeout=120)
        assert not producer.is_alive() and not errors, errors
        archive.start()
        archive.wait_joined()
        wait_archived(out, stream.valid_ids, archive, timeout_s=90)
        assert archive.terminate() == 0
    finally:
        archive.stop()
    ids = Counter(archived_ids(out))
    doubled = {e: n for e, n in ids.items() if n > 1}
    assert doubled == {}, f"seed {seed}, kills {kills}: archived more than once: {doubled}"
    assert set(ids) == stream.valid_ids, f"seed {seed}, kills {kills}"
    assert set(archived_videos(out)) == stream.videos
    for kind in ("logs", "reactions", "videos"):
        for p in visible_files(out, kind):
            pq.read_table(p)  # no visible file is partial
    doc = summary(out)
    assert doc["temporary_files"] == doc["incomplete_files"] == 0
    assert not list(out.rglob("*.tmp"))
    log = archive.log_path.read_text()
    # Restarts resumed from written rolls (not all from the beginning).
    assert re.search(r"partitions assigned; .* from [1-9]\d* rolls", log), log
