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
class PairState:
    """What decides whether a (user, video) pair is positive: the one definition of
    "positive" that popularity, relevance and the simulated users share.

    A pair is positive when its last reaction is ``like``; with no reaction, when one of
    its views reached ``positive_fraction`` of the video. So a view plus a ``neutral``
    (a 3-star MovieLens rating) is not positive, and a full view plus a ``like`` (5 stars)
    is one positive pair, not two positive events. Popularity counts a pair once, from the
    event that made it positive, and drops it when a later reaction makes it negative.
    """

    reaction: str | None = None  # the last reaction: like / neutral / dislike
    reached: bool = False  # a view reached positive_fraction

    @property
    def positive(self) -> bool:
        return self.reaction == "like" if self.reaction is not None else self.reached


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
        """Whether one event is positive on its own: a like, or a view of >=
        ``positive_fraction``. Whether a (user, video) *pair* is positive is
        :meth:`pair_after`'s (a later neutral or dislike overrides the view)."""
        if action == "like":
            return True
        if action != "view":
            return False
        duration = duration_s if duration_s and duration_s > 0 else self.default_duration_s
        return (watch_seconds or 0.0) / duration >= self.positive_fraction

    def pair_after(
        self,
        state: PairState | None,
        action: str,
        watch_seconds: float | None,
        duration_s: float | None,
    ) -> PairState:
        """The state of a (user, video) pair after one more of its events (see
        :class:`PairState`); ``state`` None is a pair without events."""
        state = state or PairState()
        if action == "view":
            reached = state.reached or self.is_positive(action, watch_seconds, duration_s)
            return PairState(state.reaction, reached)
        return PairState(action, state.reached)

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
