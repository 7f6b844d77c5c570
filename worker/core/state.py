"""Per-user state: the interaction row, its folded-in factors, and dedup memory.

The row is the user's full history as one value per video (see
:mod:`worker.core.scoring`); fold-in always refits from the full row, never
from a delta. The state also remembers the last source offset it reflects, so
that a restore from the changelog can skip events that were already applied.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

#: Event ids remembered per user for deduplication of app retries. Retries come
#: within seconds; 1,000 ids cover far more than one user's retry window.
DEFAULT_DEDUP_WINDOW = 1000


@dataclass
class UserState:
    """One user's live state inside a worker."""

    row: dict[int, float] = field(default_factory=dict)  # item_idx -> value
    factors: F32 | None = None  # None: must be folded in before scoring
    events_applied: int = 0
    recent_ids: OrderedDict[str, None] = field(default_factory=OrderedDict)
    partition: int = -1
    offset: int = -1  # last applied source offset in ``partition``

    def seen(self, event_id: str) -> bool:
        return event_id in self.recent_ids

    def remember(self, event_id: str, window: int) -> None:
        self.recent_ids[event_id] = None
        while len(self.recent_ids) > window:
            self.recent_ids.popitem(last=False)

    def has_positive(self) -> bool:
        return any(v > 0 for v in self.row.values())

    def to_record(self, video_id_of: Any) -> dict[str, Any]:
        """A JSON-ready snapshot, with videos by id (item indices differ across workers)."""
        items = sorted(self.row.items())
        return {
            "v": 1,
            "videos": [video_id_of(i) for i, _ in items],
            "values": [float(x) for _, x in items],
            "events_applied": self.events_applied,
            "recent_ids": list(self.recent_ids),
            "partition": self.partition,
            "offset": self.offset,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], item_idx_of: Any) -> UserState:
        row = {
            int(item_idx_of(v)): float(x)
            for v, x in zip(record["videos"], record["values"], strict=True)
        }
        return cls(
            row=row,
            factors=None,
            events_applied=int(record["events_applied"]),
            recent_ids=OrderedDict((str(e), None) for e in record["recent_ids"]),
            partition=int(record["partition"]),
            offset=int(record["offset"]),
        )


def encode_record(record: dict[str, Any]) -> bytes:
    """A state record as compact JSON bytes (the changelog value)."""
    return json.dumps(record, separators=(",", ":")).encode("utf-8")


def decode_record(raw: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_record`."""
    record: dict[str, Any] = json.loads(raw)
    return record
