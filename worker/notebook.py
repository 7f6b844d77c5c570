"""Seed-compatible notebook API: the original Rutube ALS workflow, in-process, without Kafka.

refold replaces a Jupyter notebook that trained implicit's ALS on Rutube watch
logs, asked a user for a few reactions, recommended 10 videos, and measured
precision over feedback rounds. This module keeps that notebook's function
names and call shapes, but runs them on refold's core: the model is a refold
model directory (trained with :func:`worker.train.bootstrap`), and a user is
folded in exactly, as the streaming worker does, through
:class:`worker.core.engine.Recommender`. No broker is involved.

The seed's README showed two snippets; they run as written, paths aside (README.md,
"The seed's notebook", shows them; tests/unit/test_notebook.py runs that text). The
seed kept ``ratings = {'like': 0, 'dislike': 0, 'neutral': 0}`` as running counts, and
:func:`presicion_colab` on that dict gives likes over all rated videos. The two
snippets below are the same workflow in refold's style (only the paths and video ids
depend on your data).

Snippet 1: load (or train) the model, rate a few videos, get 10 recommendations::

    from worker.notebook import load_model_and_indices, run_recommendation_system

    model, user_index, video_index = load_model_and_indices(
        "models/als", logs_path="data/logs.parquet", videos_path="data/video_stat.parquet"
    )
    initial_ratings = {"video_1": "like", "video_2": "dislike", "video_3": "neutral"}
    watched_videos = ["video_1", "video_2", "video_3", "video_4"]
    recommendations = run_recommendation_system(initial_ratings, watched_videos, "new_user")
    print(recommendations)  # 10 video ids, none watched, none disliked

Snippet 2: feedback rounds, and precision as likes over shown videos::

    import random

    from worker.notebook import presicion_colab, run_recommendation_system

    ratings = []
    for _ in range(15):
        recommendations = run_recommendation_system(initial_ratings, watched_videos, "new_user")
        answers = {
            video_id: random.choices(["like", "dislike", "neutral"], weights=[4, 1, 2])[0]
            for video_id in recommendations
        }
        ratings.append(answers)
        initial_ratings.update(answers)
    print("Precision:", presicion_colab(ratings))

Snippet 2's simulated user answers at random, with like:dislike:neutral =
4:1:2, as the seed's did, so its precision is about 4/7 whatever the model
recommends: **it measures nothing about the model**. To measure the model,
use :func:`simulate_session` with ``answer="truth"``, where the simulated user
answers from held-out ground truth (like for held-out positives, dislike for
held-out negatives, "not watched" otherwise).

How the seed's arguments map onto refold:

* ``initial_ratings``: ``{video_id: "like" | "dislike" | "neutral"}`` or a
  list of ``(video_id, reaction)`` pairs. Each becomes one rating event.
  ``"not_watched"`` (also ``"not watched"``/``"skip"``) records an impression:
  a view of 0 seconds that adds no signal but keeps the video out of later lists.
* ``watched_videos``: video ids (each a full watch, ``duration`` seconds),
  ``(video_id, watch_seconds)`` pairs or a ``{video_id: watch_seconds}``
  dict. Each becomes one view event, scored by the watched fraction as in
  :class:`worker.core.scoring.Weights`.
* Every call of :func:`run_recommendation_system` rebuilds the user from
  exactly these arguments (on top of their bootstrap row when the user id is
  known to the model), so calling it again with the grown dict, as snippet 2
  does, never counts an answer twice.
* Videos the user watched, rated or was shown-and-skipped never come back;
  neither do disliked ones. A video id unknown to the model is registered as a
  new video with a content prior, as the worker does (pass ``strict=True`` to
  :class:`Session` to reject unknown ids instead).

The module keeps one current :class:`Session`, like the notebook's globals:
:func:`load_model_and_indices` sets it, and the other functions use it unless
given ``session=``. Use :class:`Session` directly for several models at once.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from worker.core.engine import Recommender, UserList
from worker.core.ids import IdMap
from worker.core.model import Model
from worker.core.scoring import Weights
from worker.core.wire import TOP_K, RatingEvent
from worker.data.ingest import build_interactions
from worker.data.layout import (
    LAYOUTS,
    MAX_WATCH_DURATIONS,
    MAX_WATCH_S,
    MS_DETECT_THRESHOLD,
    ColumnMapping,
    DurationUnit,
)
from worker.errors import ConfigError, DataError, ModelError
from worker.storage import load_model

#: The answer for a shown video the simulated user has no held-out opinion on.
NOT_WATCHED = "not_watched"
#: Reactions a notebook user may give, after normalisation (see :func:`normalise_reaction`).
REACTIONS = ("like", "dislike", "neutral", NOT_WATCHED)
_ALIASES = {"not watched": NOT_WATCHED, "notwatched": NOT_WATCHED, "skip": NOT_WATCHED}
#: The seed's random simulated user: like, dislike, neutral with weights 4:1:2.
RANDOM_ANSWERS = ("like", "dislike", "neutral")
RANDOM_WEIGHTS = (4.0, 1.0, 2.0)

AnswerPolicy = Literal["truth", "random"]
RatingsLike = Mapping[str, str] | Iterable[tuple[str, str]]
WatchedLike = Mapping[str, float] | Iterable[str | tuple[str, float]]


# ---- id maps -------------------------------------------------------------------------------


class IdIndex(Mapping[str, int]):
    """A read-only ``{id: row}`` view of the model's id map (the seed's ``*_to_index`` dict).

    ``index["video_1"]`` is a row of the factor matrix; ``index.id_of(row)`` goes back.
    It copies nothing, so it is cheap for millions of ids.
    """

    __slots__ = ("_ids",)

    def __init__(self, ids: IdMap) -> None:
        self._ids = ids

    def __getitem__(self, key: str) -> int:
        idx = self._ids.get(key)
        if idx is None:
            raise KeyError(key)
        return idx

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids.ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def id_of(self, row: int) -> str:
        """The id at matrix row ``row``."""
        return self._ids.id_of(row)

    def __repr__(self) -> str:
        return f"IdIndex({len(self)} ids)"


class ModelAndIndices(NamedTuple):
    """What :func:`load_model_and_indices` returns; unpacks like the seed's tuple.

    ``model`` is the refold :class:`~worker.core.model.Model` (factors, params,
    bootstrap rows, video metadata); ``user_index`` and ``video_index`` map
    user / video ids to rows of ``model.user_factors`` / ``model.item_factors``.
    """

    model: Model
    user_index: IdIndex
    video_index: IdIndex


class InteractionMatrix(NamedTuple):
    """What :func:`create_interaction_matrix_in_batches` returns.

    ``matrix`` is the (users × videos) CSR of confidence values (before
    ``alpha``); ``user_index`` / ``video_index`` map ids to its rows / columns.
    """

    matrix: sp.csr_matrix
    user_index: IdIndex
    video_index: IdIndex


# ---- reactions -----------------------------------------------------------------------------


def normalise_reaction(value: str) -> str:
    """``"Like "`` → ``"like"``, ``"not watched"``/``"skip"`` → ``"not_watched"``.

    Raises :class:`ValueError` for anything else.
    """
    key = " ".join(str(value).strip().lower().replace("_", " ").split())
    key = _ALIASES.get(key, key)
    if key not in REACTIONS:
        raise ValueError(f"unknown reaction {value!r}; expected one of {REACTIONS}")
    return key


def _pairs(ratings: RatingsLike | None) -> list[tuple[str, str]]:
    if ratings is None:
        return []
    items = ratings.items() if isinstance(ratings, Mapping) else ratings
    out = []
    for pair in items:
        video_id, reaction = pair
        out.append((str(video_id), normalise_reaction(reaction)))
    return out


def _watches(watched: WatchedLike | None) -> list[tuple[str, float | None]]:
    if watched is None:
        return []
    if isinstance(watched, Mapping):
        return [(str(v), float(sec)) for v, sec in watched.items()]
    out: list[tuple[str, float | None]] = []
    for entry in watched:
        if isinstance(entry, (tuple, list)):
            video_id, seconds = entry
            out.append((str(video_id), float(seconds)))
        else:
            out.append((str(entry), None))
    return out


# ---- the session ---------------------------------------------------------------------------


class Session:
    """An in-process recommender over one model: the notebook's state, made explicit.

    It wraps :class:`~worker.core.engine.Recommender`, so ratings fold a user in
    with the exact ALS normal equations, and the ranking, filtering and
    popularity fallback are the worker's. Events are scored with ``weights``,
    by default the weights the model was trained with (see
    :func:`training_weights`), so a fold-in sees the same scale as training.
    """

    def __init__(
        self,
        model: Model,
        *,
        weights: Weights | None = None,
        k: int = TOP_K,
        strict: bool = False,
    ) -> None:
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        self.model = model
        weights = weights or training_weights(model)
        # Fixed popularity: a session's own ratings do not reorder its cold-start lists, so
        # a simulation replays the same way (live popularity is the worker's).
        self.recommender = Recommender(model, weights=weights, k=k, live_popularity=False)
        self.k = k
        self.strict = strict
        self.user_index = IdIndex(model.users)
        self.video_index = IdIndex(model.items)
        self._event_no = itertools.count(1)

    @classmethod
    def open(
        cls,
        model_path: str | Path,
        *,
        weights: Weights | None = None,
        k: int = TOP_K,
        strict: bool = False,
    ) -> Session:
        """A session over the model directory at ``model_path`` (verified on load)."""
        return cls(load_model(Path(model_path)), weights=weights, k=k, strict=strict)

    @property
    def weights(self) -> Weights:
        """The confidence weights events are scored with."""
        return self.recommender.weights

    # ---- events --------------------------------------------------------------------------

    def _event(
        self, user_id: str, video_id: str, action: str, watch_seconds: float | None = None
    ) -> None:
        video_id = str(video_id)
        if self.strict and video_id not in self.recommender.catalog.items:
            raise KeyError(f"video {video_id!r} is not in the model (strict session)")
        event = RatingEvent(
            event_id=f"nb-{next(self._event_no)}",
            user_id=str(user_id),
            video_id=video_id,
            action=action,  # type: ignore[arg-type]
            watch_seconds=watch_seconds,
            ts=datetime.now(timezone.utc),
        )
        self.recommender.apply(event)

    def rate(self, user_id: str, video_id: str, reaction: str) -> None:
        """Record a reaction: like, dislike, neutral, or not_watched (an impression)."""
        reaction = normalise_reaction(reaction)
        if reaction == NOT_WATCHED:
            self.show(user_id, video_id)
        else:
            self._event(user_id, video_id, reaction)

    def watch(self, user_id: str, video_id: str, watch_seconds: float | None = None) -> None:
        """Record a view of ``watch_seconds`` (default: the whole video)."""
        if watch_seconds is None:
            idx = self.recommender.catalog.items.get(str(video_id))
            duration = None if idx is None else self.recommender.catalog.duration_of(idx)
            watch_seconds = duration if duration else self.weights.default_duration_s
        self._event(user_id, video_id, "view", watch_seconds)

    def show(self, user_id: str, video_id: str) -> None:
        """Record that ``video_id`` was shown and not watched: no signal, never shown again.

        It is a view of 0 seconds, which adds 0 to the user's row but puts the
        video in it, and the ranking skips every video in the row.
        """
        self._event(user_id, video_id, "view", 0.0)

    def apply(
        self,
        user_id: str,
        ratings: RatingsLike | None = None,
        watched: WatchedLike | None = None,
    ) -> None:
        """Record ``watched`` views, then ``ratings`` reactions, for one user."""
        for video_id, seconds in _watches(watched):
            self.watch(user_id, video_id, seconds)
        for video_id, reaction in _pairs(ratings):
            self.rate(user_id, video_id, reaction)

    def reset(self, user_id: str) -> None:
        """Forget the live events of ``user_id``; a known user is back to their bootstrap row."""
        rec = self.recommender
        st = rec.users.get(str(user_id))
        if st is None:
            return
        key = rec.user_idx.get(str(user_id))
        if key is not None:
            for item in st.row:
                rec.catalog.note_interaction(item, key, 0.0)
        rec.forget([str(user_id)])

    def history(self, user_id: str) -> dict[str, float]:
        """The user's current row: ``{video_id: value}`` (bootstrap row plus live events)."""
        st = self.recommender.state_of(str(user_id))
        return {self.recommender.catalog.items.id_of(i): v for i, v in st.row.items()}

    # ---- ranking -------------------------------------------------------------------------

    def recommend_lists(self, user_ids: Sequence[str], n: int | None = None) -> list[UserList]:
        """Ranked lists with scores and strategy (``als`` or ``popular``), one batched solve."""
        rec = self.recommender
        k = self.k if n is None else n
        if k < 1:
            raise ConfigError(f"n must be >= 1, got {k}")
        ids = [str(u) for u in user_ids]
        if k == rec.k:
            return rec.recommend(ids)
        saved, rec.k = rec.k, k
        try:
            return rec.recommend(ids)
        finally:
            rec.k = saved

    def recommend(self, user_id: str, n: int | None = None) -> list[str]:
        """Top-``n`` (default ``k``) video ids for the user's current state."""
        return self.recommend_lists([user_id], n)[0].video_ids

    def recommend_many(self, user_ids: Sequence[str], n: int | None = None) -> dict[str, list[str]]:
        """Top-``n`` video ids for many users in one batched fold-in and top-k."""
        return {ul.user_id: ul.video_ids for ul in self.recommend_lists(user_ids, n)}

    def run(
        self,
        initial_ratings: RatingsLike | None,
        watched_videos: WatchedLike | None,
        user_id: str,
        n: int | None = None,
    ) -> list[str]:
        """The seed's call: rebuild ``user_id`` from these arguments, return the top list."""
        self.reset(user_id)
        self.apply(user_id, initial_ratings, watched_videos)
        return self.recommend(user_id, n)


def training_weights(model: Model) -> Weights | None:
    """The confidence weights recorded in the model's manifest by bootstrap, if any."""
    summary = model.manifest.get("data_summary") or {}
    recorded = (summary.get("training") or {}).get("weights")
    if not isinstance(recorded, Mapping):
        return None
    known = set(Weights.__dataclass_fields__)
    return Weights(**{k: float(v) for k, v in recorded.items() if k in known})


_current: Session | None = None


def current_session() -> Session:
    """The session :func:`load_model_and_indices` set; :class:`ModelError` when none."""
    if _current is None:
        raise ModelError("no model loaded: call load_model_and_indices(model_path, ...) first")
    return _current


def set_session(session: Session | None) -> None:
    """Make ``session`` the module's current one (``None`` clears it)."""
    global _current
    _current = session


def _session(session: Session | None) -> Session:
    return session if session is not None else current_session()


# ---- the seed's functions ------------------------------------------------------------------


def _missing_paths_message(path: Path, caller_globals: Mapping[str, Any]) -> str:
    """Why a missing model cannot be trained; names the keyword arguments to pass.

    The seed's notebook kept ``logs_path`` and ``video_data_path`` as module globals
    that its function read; here they must be passed, and the message says so.
    """
    found = [n for n in ("logs_path", "video_data_path", "videos_path") if n in caller_globals]
    msg = (
        f"model directory {path} does not exist, and no logs_path and videos_path were given "
        "to train it from: call load_model_and_indices(model_path, logs_path=..., "
        "videos_path=...)"
    )
    if found:
        logs = "logs_path" if "logs_path" in found else "..."
        vids = next((n for n in ("video_data_path", "videos_path") if n in found), "...")
        msg += (
            f". Your module defines {', '.join(found)} as globals; they are not read "
            f"implicitly: pass logs_path={logs}, videos_path={vids}"
        )
    return msg


def load_model_and_indices(
    model_path: str | Path,
    logs_path: str | Path | None = None,
    videos_path: str | Path | None = None,
    batch_size: int = 1_000_000,
    *,
    reactions_path: str | Path | None = None,
    weights: Weights | None = None,
    k: int = TOP_K,
    **bootstrap_options: Any,
) -> ModelAndIndices:
    """Load the model at ``model_path``, or train it there first, and make it current.

    When ``model_path`` exists it is loaded and verified (a corrupt or partial
    directory raises :class:`ModelError`; it is never silently retrained).
    Otherwise the model is trained with :func:`worker.train.bootstrap` from
    ``logs_path`` and ``videos_path`` (and ``reactions_path``), reading
    ``batch_size`` rows at a time, and saved at ``model_path``;
    ``bootstrap_options`` (``factors``, ``iterations``, ``regularization``,
    ``alpha``, ``duration_unit``, ``progress``…) pass through.

    Returns ``(model, user_index, video_index)``: see :class:`ModelAndIndices`.
    """
    path = Path(model_path)
    if path.exists():
        model = load_model(path)
    else:
        if logs_path is None or videos_path is None:
            raise ModelError(_missing_paths_message(path, sys._getframe(1).f_globals))
        from worker.train import bootstrap  # training stack only when training

        model = bootstrap(
            Path(logs_path),
            Path(videos_path),
            path,
            reactions=None if reactions_path is None else Path(reactions_path),
            batch_size=batch_size,
            weights=weights,
            **bootstrap_options,
        )
    session = Session(model, weights=weights, k=k)
    set_session(session)
    return ModelAndIndices(model, session.user_index, session.video_index)


def run_recommendation_system(
    initial_ratings: RatingsLike | None,
    watched_videos: WatchedLike | None,
    user_id: str,
    *,
    session: Session | None = None,
) -> list[str]:
    """Fold ``user_id`` in from these ratings and views; return the top 10 video ids.

    ``initial_ratings``: ``{video_id: "like" | "dislike" | "neutral" |
    "not_watched"}`` or ``(video_id, reaction)`` pairs. ``watched_videos``:
    video ids (full watches) or ``(video_id, watch_seconds)`` pairs. The user is
    rebuilt from exactly these on every call (see the module docstring), and
    the list never holds a watched, rated or disliked video. A user without any
    positive signal gets the popularity list, demoting disliked categories.
    """
    return _session(session).run(initial_ratings, watched_videos, user_id)


def generate_recommendations(
    user_id: str, n: int = TOP_K, *, session: Session | None = None
) -> list[str]:
    """Top-``n`` video ids for the user's current state, without changing it.

    A user known to the model starts from their bootstrap row; events recorded
    through the session (:meth:`Session.rate`…) count too.
    """
    return _session(session).recommend(user_id, n)


def run_recommendation_system_batch(
    initial_ratings: Mapping[str, RatingsLike],
    watched_videos: Mapping[str, WatchedLike] | None = None,
    *,
    session: Session | None = None,
) -> dict[str, list[str]]:
    """:func:`run_recommendation_system` for many users: ``{user_id: top-10 ids}``.

    ``initial_ratings`` maps user ids to their ratings, ``watched_videos`` user
    ids to their views; a user in either is rebuilt, then all are folded in and
    ranked in one batched solve.
    """
    s = _session(session)
    watched = watched_videos or {}
    users = list(dict.fromkeys([*initial_ratings.keys(), *watched.keys()]))
    for u in users:
        s.reset(u)
        s.apply(u, initial_ratings.get(u), watched.get(u))
    return s.recommend_many(users)


def create_interaction_matrix_in_batches(
    logs_path: str | Path,
    videos_path: str | Path,
    batch_size: int = 1_000_000,
    *,
    reactions_path: str | Path | None = None,
    weights: Weights | None = None,
    mapping: ColumnMapping | None = None,
    duration_unit: DurationUnit = "auto",
    progress: bool = False,
) -> InteractionMatrix:
    """The (users × videos) confidence matrix, built from Parquet ``batch_size`` rows at a time.

    Delegates to :func:`worker.data.ingest.build_interactions` (the reader
    bootstrap uses), so the values are exactly what training sees; paths may
    also be directories or globs. Returns ``(matrix, user_index,
    video_index)``: see :class:`InteractionMatrix`.
    """
    result = build_interactions(
        Path(logs_path),
        Path(videos_path),
        reactions=None if reactions_path is None else Path(reactions_path),
        batch_size=batch_size,
        weights=weights,
        mapping=mapping,
        duration_unit=duration_unit,
        progress=progress,
    )
    return InteractionMatrix(result.matrix, IdIndex(result.users), IdIndex(result.items))


def preprocess_logs_batch(
    batch_df: pd.DataFrame,
    videos_df: pd.DataFrame,
    *,
    weights: Weights | None = None,
    mapping: ColumnMapping | None = None,
    duration_unit: DurationUnit = "auto",
) -> pd.DataFrame:
    """One pandas batch of watch logs → ``user_id, video_id, value`` (summed per pair).

    The pandas twin of what :mod:`worker.data.ingest` does to each Parquet batch,
    with the same rules, so the values equal the view part of the training matrix:

    * columns come from the seed layout (``viewer_uid``, ``rutube_video_id``,
      ``total_watchtime``; ``video_id``, ``duration``) or the hackathon layout,
      detected from the names, with ``mapping`` overriding any of them;
    * ``duration_unit="auto"`` reads durations as milliseconds when their
      median is above :data:`~worker.data.layout.MS_DETECT_THRESHOLD`;
    * a row is dropped when its user or video id is null, its video is not in
      ``videos_df``, or its watch time is missing, ≤ 0, over a day or over ten
      times the duration (ingest counts these as skipped);
    * ``value = view × min(watchtime / duration, watch_cap)`` per view
      (:class:`~worker.core.scoring.Weights`), where a video with a missing or
      non-positive duration counts as ``default_duration_s`` long.
    """
    w = weights or Weights()
    overrides = {k: v for k, v in (mapping or ColumnMapping()).model_dump().items() if v}
    cols = _pick_layout(LAYOUTS, overrides, batch_df.columns, _LOG_ROLES, "log batch")
    vcols = _pick_layout(LAYOUTS, overrides, videos_df.columns, _VIDEO_ROLES, "videos")
    vid = videos_df[vcols["video_id"]]
    raw = pd.to_numeric(videos_df[vcols["video_duration"]], errors="coerce").to_numpy(np.float64)
    if duration_unit == "auto":
        positive = raw[np.isfinite(raw) & (raw > 0)]
        median = float(np.median(positive)) if len(positive) else float("nan")
        duration_unit = "ms" if median > MS_DETECT_THRESHOLD else "s"
    seconds = raw / 1000.0 if duration_unit == "ms" else raw
    seconds = np.where(np.isfinite(seconds) & (seconds > 0), seconds, np.nan)
    keep = vid.notna().to_numpy()
    durations = pd.Series(seconds[keep], index=vid[keep].astype(str).to_numpy())
    durations = durations[~durations.index.duplicated(keep="first")]

    user = batch_df[cols["log_user"]]
    video = batch_df[cols["log_video"]]
    ok = (user.notna() & video.notna()).to_numpy()
    video_s = video.astype(str)
    known = video_s.isin(durations.index).to_numpy()
    dur = video_s.map(durations).to_numpy(np.float64)
    watch = pd.to_numeric(batch_df[cols["log_watchtime"]], errors="coerce").to_numpy(np.float64)
    with np.errstate(invalid="ignore"):
        ok = ok & known & np.isfinite(watch) & (watch > 0) & (watch <= MAX_WATCH_S)
        ok = ok & ~(watch > MAX_WATCH_DURATIONS * dur)  # a NaN duration compares False
    dur = np.where(np.isnan(dur), w.default_duration_s, dur)
    frame = pd.DataFrame(
        {
            "user_id": user[ok].astype(str).to_numpy(),
            "video_id": video_s[ok].to_numpy(),
            "value": w.view_values(watch[ok], dur[ok]),
        }
    )
    return frame.groupby(["user_id", "video_id"], as_index=False, sort=False)["value"].sum()


_LOG_ROLES = ("log_user", "log_video", "log_watchtime")
_VIDEO_ROLES = ("video_id", "video_duration")


def _pick_layout(
    layouts: Mapping[str, Mapping[str, str]],
    overrides: Mapping[str, str],
    columns: Iterable[str],
    roles: Sequence[str],
    what: str,
) -> dict[str, str]:
    """Column names for ``roles``: the first layout (with overrides) whose columns exist."""
    present = set(columns)
    for defaults in layouts.values():
        cols = {**defaults, **overrides}
        if all(cols[r] in present for r in roles):
            return cols
    raise DataError(
        f"{what}: columns {sorted(present)} match no known layout for {list(roles)}; "
        "pass mapping=ColumnMapping(...)"
    )


# ---- precision over feedback rounds --------------------------------------------------------


def _is_counts(ratings: Mapping[Any, Any]) -> bool:
    """``{"like": 3, "dislike": 1, "neutral": 2}``: the seed's running counts."""
    return bool(ratings) and all(
        isinstance(n, int | np.integer) and not isinstance(n, bool) for n in ratings.values()
    )


def precision_colab(ratings: Iterable[Any] | Mapping[str, Any]) -> float:
    """Likes over rated videos (the seed's ``presicion_colab``).

    ``ratings`` is any of:

    * the seed's running counts, ``{"like": n, "dislike": n, "neutral": n}``
      (``"not_watched"`` may be counted too): likes over all of them;
    * one round, ``{video_id: reaction}``;
    * a list of rounds, each a ``{video_id: reaction}`` dict or a list of
      reactions, or one flat list of reactions.

    Every reaction is one shown and rated video; only ``"like"`` counts as a
    hit. Nothing rated gives 0.0.
    """
    if isinstance(ratings, Mapping):
        if _is_counts(ratings):
            counts = {normalise_reaction(k): 0 for k in ratings}
            for reaction, n in ratings.items():
                if n < 0:
                    raise ValueError(f"a count must be >= 0, got {reaction!r}: {n}")
                counts[normalise_reaction(reaction)] += int(n)
            total = sum(counts.values())
            return counts.get("like", 0) / total if total else 0.0
        ratings = [ratings]  # one round of {video_id: reaction}
    likes = shown = 0
    for entry in ratings:
        if isinstance(entry, str):
            answers: Iterable[Any] = [entry]
        elif isinstance(entry, Mapping):
            answers = entry.values()
        elif isinstance(entry, Iterable):
            answers = entry
        else:
            raise TypeError(f"a round must be a dict, a list or a reaction, got {entry!r}")
        for a in answers:
            if not isinstance(a, str):
                raise TypeError(f"a reaction must be a string, got {a!r}")
            shown += 1
            likes += normalise_reaction(a) == "like"
    return likes / shown if shown else 0.0


#: The seed's spelling, kept so its notebooks run unchanged.
presicion_colab = precision_colab


# ---- feedback-loop simulation --------------------------------------------------------------


def answer_for(
    video_id: str,
    truth: Mapping[str, str],
    policy: AnswerPolicy,
    rng: np.random.Generator,
) -> str:
    """The simulated user's answer to one shown video; pure apart from ``rng``.

    ``policy="truth"``: the held-out reaction in ``truth`` (like / dislike /
    neutral), ``"not_watched"`` when the video is not in it. ``rng`` is unused.
    ``policy="random"``: the seed's answers, like:dislike:neutral = 4:1:2
    regardless of the video; it measures nothing about the model.
    """
    if policy == "truth":
        held = truth.get(video_id)
        return NOT_WATCHED if held is None else normalise_reaction(held)
    if policy == "random":
        p = np.asarray(RANDOM_WEIGHTS) / sum(RANDOM_WEIGHTS)
        return str(RANDOM_ANSWERS[int(rng.choice(len(RANDOM_ANSWERS), p=p))])
    raise ValueError(f"unknown answer policy {policy!r}; expected 'truth' or 'random'")


def truth_from_frames(
    user_id: str,
    *,
    reactions: pd.DataFrame | None = None,
    logs: pd.DataFrame | None = None,
    videos: pd.DataFrame | None = None,
    like_fraction: float = 0.8,
) -> dict[str, str]:
    """Held-out ground truth of one user, for :func:`simulate_session`.

    From ``reactions`` (seed layout: ``user_id, video_id, action, ts``), the
    user's last reaction per video. From ``logs`` (with ``videos`` for
    durations in seconds), a video the user watched at least ``like_fraction``
    of counts as liked, unless a reaction says otherwise.
    """
    truth: dict[str, str] = {}
    if logs is not None:
        mine = logs[logs["viewer_uid"].astype(str) == str(user_id)]
        if not mine.empty:
            if videos is None:
                raise DataError("truth_from_frames: logs need videos for the durations")
            values = preprocess_logs_batch(
                mine, videos, weights=Weights(view=1.0, watch_cap=float("inf"))
            )
            for vid in values.loc[values["value"] >= like_fraction, "video_id"]:
                truth[str(vid)] = "like"
    if reactions is not None:
        mine = reactions[reactions["user_id"].astype(str) == str(user_id)]
        if "ts" in mine.columns:
            mine = mine.sort_values("ts", kind="stable")
        for vid, action in zip(mine["video_id"], mine["action"], strict=True):
            truth[str(vid)] = normalise_reaction(str(action))
    return truth


@dataclass
class SimulationResult:
    """What :func:`simulate_session` returns: one entry per round, and the overall precision."""

    user_id: str
    policy: str
    shown: list[list[str]] = field(default_factory=list)
    answers: list[dict[str, str]] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)

    @property
    def precision(self) -> float:
        """Likes over shown, over all rounds (:func:`precision_colab` of ``answers``)."""
        return precision_colab(self.answers)

    @property
    def round_precision(self) -> list[float]:
        """Likes over shown, per round."""
        return [precision_colab([a]) for a in self.answers]


def simulate_session(
    session: Session,
    user_id: str,
    truth: Mapping[str, str],
    rounds: int = 15,
    k: int = TOP_K,
    initial: RatingsLike | None = None,
    watched: WatchedLike | None = None,
    answer: AnswerPolicy = "truth",
    seed: int = 0,
) -> SimulationResult:
    """The seed's feedback loop: show ``k`` videos, collect answers, fold in, repeat.

    The user is rebuilt from ``initial`` ratings and ``watched`` views (on top
    of their bootstrap row when the model knows them). Each round shows the
    top ``k``; the simulated user answers each video with :func:`answer_for`
    (``truth``: held-out reactions in ``truth``, else "not watched"; ``random``:
    the seed's 4:1:2 draw, which measures nothing about the model), and every
    answer is applied before the next round, so a shown video never comes back.
    Stops early when nothing is left to show.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    rng = np.random.default_rng(seed)
    session.reset(user_id)
    session.apply(user_id, initial, watched)
    result = SimulationResult(user_id=str(user_id), policy=answer)
    for _ in range(rounds):
        ranked = session.recommend_lists([user_id], k)[0]
        if not ranked.video_ids:
            break
        answers = {v: answer_for(v, truth, answer, rng) for v in ranked.video_ids}
        for v, a in answers.items():
            session.rate(user_id, v, a)
        result.shown.append(list(ranked.video_ids))
        result.answers.append(answers)
        result.strategies.append(ranked.strategy)
    return result
