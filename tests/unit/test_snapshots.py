"""Local snapshots: round trip, and any doubt means "ignore it"."""

from __future__ import annotations

from worker.snapshots import load_snapshot, save_snapshot


def test_round_trip_per_partition_of_a_dotted_topic(tmp_path):
    topic = "refold.state-changelog"
    records = {f"u{i}": f'{{"i":{i}}}'.encode() for i in range(1000)}
    save_snapshot(tmp_path, topic, 3, records, 4567)
    save_snapshot(tmp_path, topic, 4, {"other": b"{}"}, 9)
    snap = load_snapshot(tmp_path, topic, 3)
    assert snap is not None and snap.records == records and snap.next_offset == 4567
    assert load_snapshot(tmp_path, topic, 4).records == {"other": b"{}"}
    assert load_snapshot(tmp_path, topic, 2) is None
    assert load_snapshot(tmp_path, "other-topic", 3) is None


def test_corrupt_or_partial_snapshot_is_ignored(tmp_path):
    path = save_snapshot(tmp_path, "cl", 0, {"u": b"x"}, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert load_snapshot(tmp_path, "cl", 0) is None
    save_snapshot(tmp_path, "cl", 1, {"u": b"x"}, 1)
    (tmp_path / "cl-1.json").unlink()  # crashed between the two renames
    assert load_snapshot(tmp_path, "cl", 1) is None
