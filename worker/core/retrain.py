"""The pure decisions of ``refold retrain``: durations, the holdout window, the gate and
which model versions to keep. No files, no Kafka: :mod:`worker.retrain` does the I/O."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

#: Default gate tolerance in absolute NDCG@10. A candidate is refused only when it is
#: worse than the serving model by more than this. 0.005 is about half of the narrowest
#: 95% interval half-width the replay reports (0.006 on 20k synthetic users, 0.013 on
#: ml-latest-small, README): a smaller gap is noise on a slice of this size, so
#: refusing on it would keep a staler model for nothing; a gap wider than that is a
#: real regression.
DEFAULT_TOLERANCE = 0.005
#: Default holdout: the newest tenth of the archive's time span. Tenths are what
#: ``refold replay``'s retrain oracle and ``refold tune``'s windows use; it leaves the
#: candidate 90% of the fresh data while giving the gate thousands of scored lists.
DEFAULT_HOLDOUT_FRACTION = 0.1

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 7 * 86_400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"15m"``, ``"6h"``, ``"1d"``, ``"2w"`` (> 0)."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 6h, 1d, 2w)")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds <= 0:
        raise ValueError(f"duration must be > 0: {text!r}")
    return seconds


def parse_since(text: str, now: datetime) -> datetime:
    """A duration back from ``now`` (``"7d"``) or an ISO 8601 time (naive: UTC)."""
    try:
        return now - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since: not a duration nor a timestamp: {text!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def holdout_start_us(
    first_us: int, last_us: int, *, fraction: float | None, duration_s: float | None
) -> int:
    """Start (µs) of the gate's holdout: the last ``duration_s`` of ``[first, last]``, else
    its last ``fraction``. Events at or after it are held out; the candidate trains on
    what comes before."""
    if last_us < first_us:
        raise ValueError("the archive's last event is before its first")
    if duration_s is not None:
        start = last_us - int(duration_s * 1_000_000)
    else:
        frac = DEFAULT_HOLDOUT_FRACTION if fraction is None else fraction
        if not 0 < frac < 1:
            raise ValueError(f"holdout fraction must be in (0, 1), not {frac}")
        start = last_us - int((last_us - first_us) * frac)
    return max(first_us, min(start, last_us))


@dataclass(frozen=True)
class GateDecision:
    swap: bool
    reason: str
    candidate_ndcg: float | None
    current_ndcg: float | None
    tolerance: float


def decide(
    candidate_ndcg: float | None,
    current_ndcg: float | None,
    tolerance: float,
    *,
    candidate_error: str | None = None,
    lists_scored: int = 0,
    unchanged: bool = False,
) -> GateDecision:
    """Swap iff the candidate verified and ``candidate >= current - tolerance``.

    No serving model (``current_ndcg`` None) lets a verified candidate through; a slice
    without a single scored list refuses (nothing was measured).
    """
    if candidate_error is not None:
        return GateDecision(False, f"candidate failed verification: {candidate_error}",
                            None, current_ndcg, tolerance)  # fmt: skip
    if unchanged:
        return GateDecision(False, "candidate trained on the same data and params as the "
                            "serving model", candidate_ndcg, current_ndcg, tolerance)  # fmt: skip
    if current_ndcg is None:
        return GateDecision(True, "no current model to compare with",
                            candidate_ndcg, None, tolerance)  # fmt: skip
    if candidate_ndcg is None or lists_scored == 0:
        return GateDecision(False, "no scored list in the holdout slice",
                            candidate_ndcg, current_ndcg, tolerance)  # fmt: skip
    gap = candidate_ndcg - current_ndcg
    if gap >= -tolerance - 1e-12:  # 1e-12: a gap equal to T up to float rounding passes
        reason = (f"candidate NDCG@10 {candidate_ndcg:.4f} >= current {current_ndcg:.4f} "
                  f"- tolerance {tolerance:.4f}")  # fmt: skip
        return GateDecision(True, reason, candidate_ndcg, current_ndcg, tolerance)
    reason = (f"candidate NDCG@10 {candidate_ndcg:.4f} < current {current_ndcg:.4f} "
              f"- tolerance {tolerance:.4f} (worse by {-gap:.4f})")  # fmt: skip
    return GateDecision(False, reason, candidate_ndcg, current_ndcg, tolerance)


def same_training(candidate_version: str, current_version: str | None) -> bool:
    """Whether two versions from :func:`worker.train.make_version` (``<time>-<hash of the
    data and params>``) hash the same: a rerun on an archive that did not grow."""
    if current_version is None or "-" not in candidate_version or "-" not in current_version:
        return False
    return candidate_version.rsplit("-", 1)[1] == current_version.rsplit("-", 1)[1]


def select_prune(versions: Sequence[tuple[str, str]], keep: int, protect: set[str]) -> list[str]:
    """Names to delete: all but the ``keep`` newest of ``(name, created_at)``, never a
    protected one (the model announced now, the one served before)."""
    if keep < 1:
        raise ValueError("--keep must be >= 1")
    newest_first = sorted(versions, key=lambda v: (v[1], v[0]), reverse=True)
    return [name for name, _ in newest_first[keep:] if name not in protect]
