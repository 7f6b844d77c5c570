"""The archive directory on real Parquet (no broker): atomic roll files that bootstrap's
reader takes as they are, repair of an interrupted roll, the dedup restore stream, the
writer lock and the summary."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.unit.test_archive import R, V, archiver, rating, video
from worker.archive import ArchiveStore, accepted_ids, read_meta, summary
from worker.core.archive import Roll, resume_offsets
from worker.data.ingest import build_interactions
from worker.errors import ArchiveError

AT = datetime(2026, 11, 2, tzinfo=timezone.utc)


def _rolls() -> list[Roll]:
    a = archiver(roll_rows=100)
    for i in range(7):  # every video rating() names
        a.offer(V, 0, i, f"v{i}".encode(), video(f"v{i}"), now=0.0)
    for i, (user, action) in enumerate([("u1", "view"), ("u2", "like"), ("u1", "view")]):
        a.offer(R, i % 2, i, user.encode(), rating(i, user, action), now=0.0)
    first = a.take(R, 1, AT)
    vids = a.take(V, 2, AT)
    a.offer(R, 0, 10, b"u3", rating(10, "u3", "neutral"), now=0.0)
    second = a.take(R, 3, AT)
    assert first and vids and second
    return [first, vids, second]


def test_rolls_are_renamed_files_that_bootstrap_reads(tmp_path: Path) -> None:
    store = ArchiveStore(tmp_path)
    for roll in _rolls():
        store.write(roll)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert names == [
        "logs", "logs/0000000001-20261102T000000Z.parquet",
        "reactions", "reactions/0000000001-20261102T000000Z.parquet",
        "reactions/0000000003-20261102T000000Z.parquet",
        "videos", "videos/0000000002-20261102T000000Z.parquet",
    ]  # fmt: skip
    meta = read_meta(tmp_path / "logs" / "0000000001-20261102T000000Z.parquet")
    assert meta.kinds == ("logs", "reactions") and meta.rows == {"logs": 2, "reactions": 1}
    inter = build_interactions(
        tmp_path / "logs",
        tmp_path / "videos",
        reactions=tmp_path / "reactions",
        progress=False,
    )
    assert set(inter.users.ids) == {"u1", "u2", "u3"}
    assert set(inter.items.ids) == {f"v{i}" for i in range(7)}
    assert inter.summary["rows_used"] == 2 and inter.summary["reactions"]["rows_used"] == 2
    found = store.scan(repair=True)
    assert resume_offsets(found.metas.values()) == {(R, 0): 11, (R, 1): 2, (V, 0): 7}
    assert list(accepted_ids(found, R, {0})) == [("u1", "e0"), ("u1", "e2"), ("u3", "e10")]
    assert list(accepted_ids(found, R, {1})) == [("u2", "e1")]


def test_an_interrupted_roll_is_removed_and_read_again(tmp_path: Path) -> None:
    store = ArchiveStore(tmp_path)
    first, _vids, second = _rolls()
    store.write(first)
    store.write(second)
    # A kill between the two renames of `second`... it has one kind only; fake a
    # two-kind roll whose reactions file never got its name, and a leftover temp file.
    (tmp_path / "reactions" / "0000000001-20261102T000000Z.parquet").rename(
        tmp_path / "reactions" / ".0000000001-20261102T000000Z.parquet.tmp"
    )
    doc = summary(tmp_path)
    assert doc["incomplete_files"] == 1 and doc["temporary_files"] == 1
    assert doc["rolls"] == 1 and doc["topics"][R]["offsets"] == {"0": {"first": 10, "last": 10}}
    found = store.scan(repair=True)
    assert list(found.metas) == ["0000000003-20261102T000000Z"]
    assert not (tmp_path / "logs" / "0000000001-20261102T000000Z.parquet").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    # Offsets 0..2 are read again: the resume point of partition 1 is gone.
    assert resume_offsets(found.metas.values()) == {(R, 0): 11}


def test_foreign_parquet_is_an_error_not_skipped(tmp_path: Path) -> None:
    store = ArchiveStore(tmp_path)
    store.write(_rolls()[0])
    pq.write_table(pq.read_table(next((tmp_path / "logs").glob("*.parquet"))).replace_schema_metadata(
        {}), tmp_path / "logs" / "foreign.parquet")  # fmt: skip
    with pytest.raises(ArchiveError, match="not an archive file"):
        store.scan(repair=True)


def test_one_writer_per_directory(tmp_path: Path) -> None:
    a, b = ArchiveStore(tmp_path), ArchiveStore(tmp_path)
    a.lock()
    with pytest.raises(ArchiveError, match="another refold archive"):
        b.lock()
    a.unlock()
    b.lock()
    b.unlock()
