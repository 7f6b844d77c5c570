"""Scoring rules: how an event becomes implicit-feedback confidence.

A user's row holds one value per video: the sum of what each event
contributed. ALS then uses ``alpha * value`` as the confidence ``C_ui``:

* ``view``: ``view_weight * min(watch_seconds / duration, watch_cap)``, so a
  video watched to the end counts fully and a repeated view adds again;
* ``like`` adds ``like_weight`` (strongly positive);
* ``neutral`` adds ``neutral_weight`` (weakly positive);
* ``dislike`` subtracts ``dislike_weight`` (negative: implicit's ALS treats a
  negative confidence as "does not like, with this much certainty").

The sum is commutative, so the same events give the same row in any order,
which is what makes exactly-once checks across crashes meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Weights:
    """Confidence weights; configuration overrides the defaults."""

    view: float = 1.0
    like: float = 2.0
    neutral: float = 0.5
    dislike: float = 2.0
    #: Upper bound of the watched fraction of one view (rewatch within a view is not extra signal).
    watch_cap: float = 1.0
    #: Duration assumed for a video whose metadata never arrived (10 minutes, a typical length).
    default_duration_s: float = 600.0
    #: A view of at least this watched fraction is a positive event on its own (half the video).
    positive_fraction: float = 0.5

    def is_positive(
        self, action: str, watch_seconds: float | None, duration_s: float | None
    ) -> bool:
        """The one definition of a positive event: live popularity, the replay's popularity
        baseline and relevance all use it. A like, or a view of >= ``positive_fraction``."""
        if action == "like":
            return True
        if action != "view":
            return False
        duration = duration_s if duration_s and duration_s > 0 else self.default_duration_s
        return (watch_seconds or 0.0) / duration >= self.positive_fraction

    def event_value(
        self, action: str, watch_seconds: float | None, duration_s: float | None
    ) -> float:
        """Contribution of one event to the row value of its (user, video)."""
        if action == "view":
            duration = duration_s if duration_s and duration_s > 0 else self.default_duration_s
            fraction = min((watch_seconds or 0.0) / duration, self.watch_cap)
            return self.view * fraction
        if action == "like":
            return self.like
        if action == "neutral":
            return self.neutral
        if action == "dislike":
            return -self.dislike
        raise ValueError(f"unknown action {action!r}")

    def reaction_values(self, actions: npt.NDArray[np.str_] | list[str]) -> npt.NDArray[np.float32]:
        """Vectorised :meth:`event_value` for like/dislike/neutral reactions."""
        table = {"like": self.like, "neutral": self.neutral, "dislike": -self.dislike}
        return np.array([table[a] for a in actions], dtype=np.float32)

    def view_values(
        self, watch_seconds: npt.NDArray[np.floating], duration_s: npt.NDArray[np.floating]
    ) -> npt.NDArray[np.float32]:
        """Vectorised :meth:`event_value` for views with known durations (> 0)."""
        frac = np.minimum(watch_seconds / duration_s, self.watch_cap)
        return (self.view * frac).astype(np.float32)
