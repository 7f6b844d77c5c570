"""A drifting synthetic dataset split by time into base logs and an archive in the
layout ``refold archive`` writes (``logs/``, ``reactions/``, ``videos/`` of Parquet,
with event ids), and a serving model bootstrapped on the base part."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from worker.data.synth import synthesize
from worker.train import bootstrap

# Small enough for seconds of training and scoring on 2 cores, large enough that the
# gate's slice holds a few hundred scored lists.
USERS, VIDEOS, EVENTS, DAYS = 1500, 400, 80_000, 30
#: Tastes rotate half-way round the categories over the 30 days: the base model is stale.
DRIFT = 0.5
#: Base logs are the first 20 days, the archive the last 10.
BASE_DAYS = 20


@dataclass
class Dataset:
    base: Path  # logs.parquet, reactions.parquet, video_stat.parquet
    archive: Path
    models: Path
    current: Path  # the serving model, bootstrapped on the base part

    def retrain_args(self) -> list[str]:
        return [
            "--logs", str(self.base / "logs.parquet"),
            "--videos", str(self.base / "video_stat.parquet"),
            "--reactions", str(self.base / "reactions.parquet"),
            "--archive", str(self.archive),
            "--models", str(self.models),
        ]  # fmt: skip


def _split(src: Path, column: str, cut: pa.Scalar, base: Path, archive_file: Path) -> None:
    table = pq.read_table(src)
    old = pc.less(table[column], cut)
    pq.write_table(table.filter(old), base)
    newer = table.filter(pc.invert(old))
    ids = pa.array([f"{archive_file.parent.name}-{i}" for i in range(newer.num_rows)])
    archive_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(newer.append_column("event_id", ids), archive_file)


def make_dataset(root: Path, *, seed: int = 3) -> Dataset:
    raw = root / "raw"
    synthesize(raw, users=USERS, videos=VIDEOS, events=EVENTS, seed=seed, days=DAYS,
               drift=DRIFT, progress=False)  # fmt: skip
    start = pc.min(pq.read_table(raw / "logs.parquet", columns=["event_timestamp"])[0])
    cut = pa.scalar(start.as_py().replace(hour=0, minute=0) + _days(BASE_DAYS), start.type)
    base, archive = root / "base", root / "archive"
    base.mkdir()
    _split(raw / "logs.parquet", "event_timestamp", cut, base / "logs.parquet",
           archive / "logs" / "part-00000.parquet")  # fmt: skip
    rcut = pa.scalar(cut.as_py(), pq.read_schema(raw / "reactions.parquet").field("ts").type)
    _split(raw / "reactions.parquet", "ts", rcut, base / "reactions.parquet",
           archive / "reactions" / "part-00000.parquet")  # fmt: skip
    videos = pq.read_table(raw / "video_stat.parquet")
    pq.write_table(videos, base / "video_stat.parquet")
    (archive / "videos").mkdir()
    pq.write_table(videos, archive / "videos" / "part-00000.parquet")
    models = root / "models"
    current = models / "v0-base"
    bootstrap(base / "logs.parquet", base / "video_stat.parquet", current,
              reactions=base / "reactions.parquet", version="v0-base", progress=False,
              gpu="off")  # fmt: skip
    return Dataset(base=base, archive=archive, models=models, current=current)


def _days(n: int):  # type: ignore[no-untyped-def]
    from datetime import timedelta

    return timedelta(days=n)
