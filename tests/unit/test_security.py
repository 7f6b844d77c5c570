"""Security properties that are easy to lose in a refactor."""

from __future__ import annotations

import re
from pathlib import Path

from worker.config import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]


def test_no_code_path_unpickles():
    pattern = re.compile(r"\bpickle\b|allow_pickle\s*=\s*True|\bjoblib\b|\bdill\b|\bmarshal\.load")
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sorted((ROOT / "worker").rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line) and "never unpickle" not in line.lower()
    ]
    assert offenders == []


def test_metrics_bind_to_loopback_by_default():
    assert WorkerSettings().metrics_host == "127.0.0.1"
