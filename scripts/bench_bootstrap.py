#!/usr/bin/env python3
"""Benchmark the bootstrap path: Parquet ingest against a seed-style baseline, and ALS fit overhead.

Run from the repository root with the project's virtual environment::

    .venv/bin/python scripts/bench_bootstrap.py                    # 20M rows, 1M users, 200k videos
    .venv/bin/python scripts/bench_bootstrap.py --cache /tmp/bench  # keep and reuse the synthetic data
    .venv/bin/python scripts/bench_bootstrap.py --rows 2000000 --users 100000 --videos 20000

What it measures, each in its own child process so that no phase's memory counts
for another:

* **refold ingest**: :func:`worker.data.ingest.build_interactions` on the whole log
  (Parquet → CSR + id maps): rows/s and the child's peak RSS (``ru_maxrss``);
* **seed baseline**: what a competent notebook user writes (pandas batches, a merge
  with the videos DataFrame for the duration, Python dicts for the ids, COO → CSR),
  on a prefix of the log (``--seed-rows``), as rows/s;
* **fit overhead**: refold's :func:`worker.train.train_factors` against a raw
  ``implicit.als.AlternatingLeastSquares(...).fit(matrix)``, same parameters, same
  matrix, both under ``threadpool_limits(1, "blas")``; the best of ``--fit-repeats``.

The last line printed is one JSON object with ``ingest_rows_per_s``,
``seed_rows_per_s``, ``speedup``, ``ingest_peak_rss_bytes`` and ``fit_overhead``
(plus extras). Targets on 2 cores: speedup >= 15, peak RSS <= 0.8 GB, fit overhead
<= 5%.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import numpy as np
except ImportError:  # started with a system python: re-run with the project's venv
    venv_python = ROOT / ".venv" / "bin" / "python"
    if venv_python.exists() and not os.environ.get("REFOLD_BENCH_REEXEC"):
        os.environ["REFOLD_BENCH_REEXEC"] = "1"  # never loop
        os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])
    raise
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

#: Rows per pandas batch in the seed baseline (what the seed notebook used).
SEED_BATCH_ROWS = 500_000


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux: ``VmHWM`` from ``/proc/self/status``, the high-water mark of this process
    image. ``ru_maxrss`` is no good in a child: Linux carries it across ``execve``, so
    a child would report at least its parent's peak (the synthesizer's, here).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib * 1024) if sys.platform != "darwin" else int(kib)


# ---- children --------------------------------------------------------------------------------


def child_ingest(logs: Path, videos: Path, batch_size: int) -> dict[str, Any]:
    """refold's ingest of the whole log, timed around the call only (imports excluded)."""
    from worker.data.ingest import build_interactions

    started = time.perf_counter()
    data = build_interactions(logs, videos, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - started
    return {
        "rows": data.summary["rows_read"],
        "rows_used": data.summary["rows_used"],
        "seconds": seconds,
        "users": data.matrix.shape[0],
        "videos": data.matrix.shape[1],
        "nnz": int(data.matrix.nnz),
        "id_mapping": data.summary["id_mapping"],
        "peak_rss_bytes": _peak_rss_bytes(),
    }


def child_seed(logs: Path, videos: Path, max_rows: int) -> dict[str, Any]:
    """The seed-style baseline on the first ``max_rows`` rows of the log."""
    import pandas as pd
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    started = time.perf_counter()
    videos_df = pd.read_parquet(videos, columns=["video_id", "duration"])
    user_map: dict[str, int] = {}
    video_map: dict[str, int] = {}
    rows: list[Any] = []
    cols: list[Any] = []
    vals: list[Any] = []
    n = 0
    pf = pq.ParquetFile(logs)
    for batch in pf.iter_batches(
        batch_size=min(SEED_BATCH_ROWS, max_rows),
        columns=["viewer_uid", "rutube_video_id", "total_watchtime"],
    ):
        df = batch.to_pandas()
        df = df.merge(videos_df, left_on="rutube_video_id", right_on="video_id", how="inner")
        df = df[(df["duration"] > 0) & (df["total_watchtime"] > 0)]
        df["confidence"] = np.minimum(df["total_watchtime"] / df["duration"], 1.0)
        for uid in df["viewer_uid"].unique():
            if uid not in user_map:
                user_map[uid] = len(user_map)
        for vid in df["rutube_video_id"].unique():
            if vid not in video_map:
                video_map[vid] = len(video_map)
        rows.append(df["viewer_uid"].map(user_map).to_numpy(np.int32))
        cols.append(df["rutube_video_id"].map(video_map).to_numpy(np.int32))
        vals.append(df["confidence"].to_numpy(np.float32))
        n += batch.num_rows
        if n >= max_rows:
            break
    matrix = sp.coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(user_map), len(video_map)),
    ).tocsr()
    seconds = time.perf_counter() - started
    return {
        "rows": n,
        "seconds": seconds,
        "nnz": int(matrix.nnz),
        "peak_rss_bytes": _peak_rss_bytes(),
    }


def child_fit(
    logs: Path, videos: Path, batch_size: int, factors: int, iterations: int, repeats: int
) -> dict[str, Any]:
    """refold's train_factors against raw implicit on the same matrix, alternating runs."""
    import implicit
    from threadpoolctl import threadpool_limits

    from worker.core.model import AlsParams
    from worker.data.ingest import build_interactions
    from worker.train import DEFAULT_ALPHA, DEFAULT_REGULARIZATION, RANDOM_STATE, train_factors

    matrix = build_interactions(logs, videos, batch_size=batch_size, progress=False).matrix
    params = AlsParams(
        factors=factors,
        regularization=DEFAULT_REGULARIZATION,
        alpha=DEFAULT_ALPHA,
        iterations=iterations,
    )

    def raw_fit() -> float:
        with threadpool_limits(1, "blas"):
            started = time.perf_counter()
            model = implicit.als.AlternatingLeastSquares(
                factors=factors,
                regularization=DEFAULT_REGULARIZATION,
                alpha=DEFAULT_ALPHA,
                iterations=iterations,
                use_gpu=False,
                random_state=RANDOM_STATE,
            )
            model.fit(matrix, show_progress=False)
            return time.perf_counter() - started

    def refold_fit() -> float:
        started = time.perf_counter()
        train_factors(matrix, params, 0, "off")
        return time.perf_counter() - started

    raw_times: list[float] = []
    refold_times: list[float] = []
    for i in range(repeats):
        # ABBA order, so that a drift in machine load does not favour either side.
        if i % 2 == 0:
            raw_times.append(raw_fit())
            refold_times.append(refold_fit())
        else:
            refold_times.append(refold_fit())
            raw_times.append(raw_fit())
    return {
        "raw_fit_s": min(raw_times),
        "refold_fit_s": min(refold_times),
        "raw_fit_runs_s": raw_times,
        "refold_fit_runs_s": refold_times,
        "matrix_shape": list(matrix.shape),
        "nnz": int(matrix.nnz),
    }


def _run_child(args: list[str]) -> dict[str, Any]:
    """Run this script in child mode; its last stdout line is its JSON result."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ---- main ------------------------------------------------------------------------------------


def _data(
    cache: Path | None, rows: int, users: int, videos: int, seed: int
) -> tuple[Path, bool, float]:
    """Directory with the synthetic data (reused from ``cache`` when it matches)."""
    from worker.data.synth import synthesize

    want = {"events": rows, "users": users, "n_videos": videos, "seed": seed}
    if cache is not None:
        stamp = cache / "synth.json"
        if stamp.is_file():
            have = json.loads(stamp.read_text())
            if all(have.get(k) == v for k, v in want.items()):
                print(f"reusing synthetic data in {cache}", file=sys.stderr)
                return cache, False, 0.0
        directory = cache
    else:
        directory = Path(tempfile.mkdtemp(prefix="refold-bench-"))
    print(f"synthesizing {rows:,} rows into {directory}", file=sys.stderr)
    summary = synthesize(directory, users=users, videos=videos, events=rows, seed=seed)
    (directory / "synth.json").write_text(json.dumps(summary))
    return directory, cache is None, float(summary["seconds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000_000, help="log rows to synthesize")
    parser.add_argument("--users", type=int, default=1_000_000, help="synthetic users")
    parser.add_argument("--videos", type=int, default=200_000, help="synthetic videos")
    parser.add_argument("--seed", type=int, default=7, help="synthetic data seed")
    parser.add_argument("--cache", type=Path, default=None, help="keep/reuse data here")
    parser.add_argument(
        "--seed-rows", type=int, default=2_000_000, help="log prefix the seed baseline reads"
    )
    parser.add_argument("--batch-size", type=int, default=1_000_000, help="ingest batch size")
    parser.add_argument("--factors", type=int, default=64, help="ALS factors for the fit")
    parser.add_argument("--iterations", type=int, default=3, help="ALS iterations for the fit")
    parser.add_argument("--fit-repeats", type=int, default=2, help="fit runs each (best kept)")
    parser.add_argument("--skip-fit", action="store_true", help="measure the ingest only")
    parser.add_argument("--child", choices=["ingest", "seed", "fit"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        logs, videos = args.dir / "logs.parquet", args.dir / "video_stat.parquet"
        if args.child == "ingest":
            out = child_ingest(logs, videos, args.batch_size)
        elif args.child == "seed":
            out = child_seed(logs, videos, args.seed_rows)
        else:
            out = child_fit(
                logs, videos, args.batch_size, args.factors, args.iterations, args.fit_repeats
            )
        print(json.dumps(out))
        return 0

    directory, remove, synth_s = _data(args.cache, args.rows, args.users, args.videos, args.seed)
    try:
        common = ["--dir", str(directory), "--batch-size", str(args.batch_size)]
        print("refold ingest ...", file=sys.stderr)
        ingest = _run_child(["--child", "ingest", *common])
        print(f"  {ingest}", file=sys.stderr)
        print(f"seed baseline on {args.seed_rows:,} rows ...", file=sys.stderr)
        seed = _run_child(["--child", "seed", "--seed-rows", str(args.seed_rows), *common])
        print(f"  {seed}", file=sys.stderr)
        fit: dict[str, Any] = {}
        if not args.skip_fit:
            print(f"ALS fit, {args.iterations} iterations ...", file=sys.stderr)
            fit = _run_child(
                [
                    "--child",
                    "fit",
                    "--factors",
                    str(args.factors),
                    "--iterations",
                    str(args.iterations),
                    "--fit-repeats",
                    str(args.fit_repeats),
                    *common,
                ]
            )
            print(f"  {fit}", file=sys.stderr)
    finally:
        if remove:
            shutil.rmtree(directory, ignore_errors=True)

    ingest_rate = ingest["rows"] / ingest["seconds"]
    seed_rate = seed["rows"] / seed["seconds"]
    result: dict[str, Any] = {
        "ingest_rows_per_s": round(ingest_rate),
        "seed_rows_per_s": round(seed_rate),
        "speedup": round(ingest_rate / seed_rate, 2),
        "ingest_peak_rss_bytes": ingest["peak_rss_bytes"],
        "fit_overhead": (round(fit["refold_fit_s"] / fit["raw_fit_s"] - 1.0, 4) if fit else None),
        "rows": ingest["rows"],
        "users": ingest["users"],
        "videos": ingest["videos"],
        "nnz": ingest["nnz"],
        "ingest_seconds": round(ingest["seconds"], 3),
        "id_mapping": ingest["id_mapping"],
        "seed_rows": seed["rows"],
        "seed_seconds": round(seed["seconds"], 3),
        "seed_peak_rss_bytes": seed["peak_rss_bytes"],
        "refold_fit_s": round(fit["refold_fit_s"], 3) if fit else None,
        "raw_fit_s": round(fit["raw_fit_s"], 3) if fit else None,
        "fit_iterations": args.iterations,
        "synth_seconds": synth_s,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
