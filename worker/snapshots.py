"""Local state snapshots: a restart cache in front of the changelog (Kafka Streams' checkpoint).

A snapshot holds, for one changelog partition, the latest record of every user
and the changelog offset it covers. A restart loads it and reads only the
changelog tail after that offset; without a snapshot (or with a bad one) the
whole partition is read. The changelog stays the source of truth: a snapshot
only saves time, so any doubt about one means it is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

log = logging.getLogger(__name__)

FORMAT = "refold-snapshot-1"


@dataclass(frozen=True)
class Snapshot:
    records: dict[str, bytes]
    next_offset: int  # first changelog offset not reflected


def _paths(state_dir: Path, topic: str, partition: int) -> tuple[Path, Path]:
    # Topic names contain dots: build the names whole, never with Path.with_suffix.
    base = f"{topic}-{partition}"
    return Path(state_dir) / f"{base}.arrow", Path(state_dir) / f"{base}.json"


def save_snapshot(
    state_dir: Path, topic: str, partition: int, records: dict[str, bytes], next_offset: int
) -> Path:
    """Write atomically: data file, then its sidecar (format, offset, sha256) last."""
    data_path, meta_path = _paths(state_dir, topic, partition)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "user_id": pa.array(list(records.keys()), pa.string()),
            "record": pa.array(list(records.values()), pa.binary()),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    body = sink.getvalue().to_pybytes()
    meta = {
        "format": FORMAT,
        "topic": topic,
        "partition": partition,
        "next_offset": next_offset,
        "users": len(records),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    for path, data in ((data_path, body), (meta_path, json.dumps(meta).encode())):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return data_path


def load_snapshot(state_dir: Path, topic: str, partition: int) -> Snapshot | None:
    """The snapshot of a partition, or None when absent, stale-format or corrupt."""
    data_path, meta_path = _paths(state_dir, topic, partition)
    if not data_path.is_file() or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_bytes())
        body = data_path.read_bytes()
        if (meta.get("format"), meta.get("topic"), meta.get("partition")) != (
            FORMAT,
            topic,
            partition,
        ):
            raise ValueError("format, topic or partition mismatch")
        if hashlib.sha256(body).hexdigest() != meta["sha256"]:
            raise ValueError("checksum mismatch")
        table = pa.ipc.open_file(pa.BufferReader(body)).read_all()
        records = dict(zip(table["user_id"].to_pylist(), table["record"].to_pylist(), strict=True))
        return Snapshot(records=records, next_offset=int(meta["next_offset"]))
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        log.warning("ignoring snapshot %s: %s; restoring from the changelog", data_path, exc)
        return None
