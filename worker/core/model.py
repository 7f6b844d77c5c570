"""The base model: what ``refold bootstrap`` produces and every worker loads.

It is immutable once loaded; the worker's live changes (new users, new videos,
changed rows) live in :mod:`worker.core.catalog` and :mod:`worker.core.state`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from worker.core.als import Confidence
from worker.core.decay import DECAYS, DecayMode
from worker.core.ids import IdMap

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class AlsParams:
    """Hyper-parameters that fold-in must share with training."""

    factors: int
    regularization: float
    alpha: float
    iterations: int = 15
    #: How row values become confidences (see :func:`worker.core.als.confidence`); models
    #: saved before this setting existed load as ``"implicit"``, what they were trained with.
    confidence: Confidence = "implicit"
    # popularity blend: the ranking score is z(x·y) + β·log1p(live popularity), with β for
    # users the base model knows (returning) and for users new to it; 0 (the default) ranks
    # by the ALS score alone (see :mod:`worker.core.blend`).
    blend_returning: float = 0.0
    blend_new: float = 0.0
    #: Recency decay of each user's row (:mod:`worker.core.decay`), the same in training
    #: and fold-in: an interaction weighs ``2 ** (-age / decay_half_life)``, its age in
    #: distinct items touched since (``"items"``) or in days before the user's newest
    #: event (``"time"``). ``"none"`` (the default, and what older models load as): off.
    decay: DecayMode = "none"
    #: Half-life in distinct items (``"items"``) or days (``"time"``); 25 items is what
    #: the study behind issue 15 found on MovieLens (rows of ~800 items).
    decay_half_life: float = 25.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> AlsParams:
        """Params from a JSON object. Missing keys take their defaults (``factors``,
        ``regularization`` and ``alpha`` have none); an unknown key is a ``ValueError``
        when ``strict`` (a ``--params`` file), ignored otherwise (a newer model's manifest).
        """
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown and strict:
            raise ValueError(
                f"unknown AlsParams key(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        kinds: dict[str, Any] = {
            "factors": int,
            "iterations": int,
            "regularization": float,
            "alpha": float,
            "confidence": str,
            "blend_returning": float,
            "blend_new": float,
            "decay": str,
            "decay_half_life": float,
        }
        values = {k: kinds[k](v) for k, v in data.items() if k in known}
        missing = [k for k in ("factors", "regularization", "alpha") if k not in values]
        if missing:
            raise ValueError(f"AlsParams missing {', '.join(missing)}")
        conf = values.get("confidence", "implicit")
        if conf not in ("implicit", "one_plus"):
            raise ValueError(f"confidence must be 'implicit' or 'one_plus', got {conf!r}")
        decay = values.get("decay", "none")
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {', '.join(DECAYS)}, got {decay!r}")
        half_life = values.get("decay_half_life", 25.0)
        if not (half_life > 0.0 and half_life < float("inf")):
            raise ValueError(f"decay_half_life must be a finite number > 0, got {half_life!r}")
        for name in ("blend_returning", "blend_new"):
            beta = values.get(name, 0.0)
            if not (beta >= 0.0 and beta < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {beta!r}")
        return cls(**values)


@dataclass(frozen=True)
class VideoMeta:
    """Per-video metadata needed for cold start, aligned with the item index."""

    duration_s: F32  # seconds; NaN when unknown
    category: npt.NDArray[np.int32]  # index into categories; -1 unknown
    author: npt.NDArray[np.int32]  # index into authors; -1 unknown
    popularity: F32  # positive interactions in the training data
    categories: list[str]
    authors: list[str]

    @classmethod
    def empty(cls, n: int) -> VideoMeta:
        return cls(
            duration_s=np.full(n, np.nan, dtype=np.float32),
            category=np.full(n, -1, dtype=np.int32),
            author=np.full(n, -1, dtype=np.int32),
            popularity=np.zeros(n, dtype=np.float32),
            categories=[],
            authors=[],
        )


@dataclass(frozen=True)
class Model:
    """Factors, id maps, the training rows of every known user, and video metadata."""

    version: str
    params: AlsParams
    user_factors: F32  # (n_users, f)
    item_factors: F32  # (n_items, f)
    users: IdMap
    items: IdMap
    user_rows: sp.csr_matrix  # (n_users, n_items) row values (before alpha)
    videos: VideoMeta
    manifest: dict[str, Any] = field(default_factory=dict)
    #: Per entry of ``user_rows.data``: its latest event time (µs since the epoch), or
    #: None where the model has none (trained without decay, or before times were kept).
    user_row_times: npt.NDArray[np.int64] | None = None

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def row_of(self, user_idx: int) -> tuple[npt.NDArray[np.int32], F32]:
        """The bootstrap row of a known user as (item indices, values)."""
        lo, hi = self.user_rows.indptr[user_idx], self.user_rows.indptr[user_idx + 1]
        return self.user_rows.indices[lo:hi], self.user_rows.data[lo:hi]

    def row_times_of(self, user_idx: int) -> npt.NDArray[np.int64] | None:
        """The latest event time of each entry of :meth:`row_of`, or None (unknown)."""
        if self.user_row_times is None:
            return None
        lo, hi = self.user_rows.indptr[user_idx], self.user_rows.indptr[user_idx + 1]
        return self.user_row_times[lo:hi]
