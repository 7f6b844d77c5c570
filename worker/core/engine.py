"""The recommender engine: base model + live catalog + user states, in memory.

This is the pure heart of the worker, and also what the notebook API and the
replay baselines use in-process. It knows nothing of Kafka or files.
"""

from __future__ import annotations

from collections.abc import Collection, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum

import numpy as np
import numpy.typing as npt

from worker.core.als import F32, fold_in, gramian, top_k
from worker.core.blend import blend_top_k
from worker.core.catalog import Catalog
from worker.core.decay import UNKNOWN, decayed_rows
from worker.core.ids import IdMap
from worker.core.items import Contribution, ItemUpdate, Member
from worker.core.model import Model
from worker.core.popularity import (
    LivePopularity,
    PopularityPair,
    PopularityUpdate,
    half_life_us_of,
)
from worker.core.scoring import PairState, Weights
from worker.core.state import (
    DEFAULT_DEDUP_WINDOW,
    UserState,
    decode_record,
    pair_flags,
    pair_of_flags,
)
from worker.core.wire import TOP_K, RatingEvent, VideoEvent

#: Default half-life of live popularity: one day (``WorkerSettings.popularity_half_life_s``).
DEFAULT_POPULARITY_HALF_LIFE_S = 86_400.0

#: Score multiplier for a popular video in a category the user has disliked.
DISLIKED_CATEGORY_PENALTY = 0.5


class Applied(Enum):
    """What :meth:`Recommender.apply_at` did with an event."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"  # an event id already applied (an app's producer retry)
    REPLAYED = "replayed"  # at or before the source offset the state already reflects


@dataclass(frozen=True)
class UserList:
    """A ranked list for one user, before it becomes a wire message."""

    user_id: str
    video_ids: list[str]
    scores: list[float]
    strategy: str  # "als" | "popular"


@dataclass(frozen=True)
class Prepared:
    """A model and what a swap installs from it, built off the hot path (:meth:`prepare`)."""

    model: Model
    catalog: Catalog  # with the announced videos registered and the top-k index built
    user_gram: F32
    announced_upto: int  # announcements up to this sequence number are in ``catalog``
    weights: Weights | None  # event weights from then on; None keeps the current ones


class Recommender:
    """Applies rating events to user rows, folds users in, and ranks videos."""

    def __init__(
        self,
        model: Model,
        *,
        weights: Weights | None = None,
        k: int = TOP_K,
        dedup_window: int = DEFAULT_DEDUP_WINDOW,
        popularity_half_life_s: float = DEFAULT_POPULARITY_HALF_LIFE_S,
        live_popularity: bool = True,
        shared_items: bool = False,
        shared_popularity: bool = False,
    ) -> None:
        # False keeps the model's popularity fixed (the notebook: one person's ratings
        # replayed in a session should not reorder everyone's cold-start list).
        self.live_popularity = live_popularity
        # True (the Kafka worker): new videos' factors come from their owners
        # (:mod:`worker.core.items`), installed with :meth:`install_item_update`; this
        # engine then sends :meth:`contributions` and solves no video itself.
        self.shared_items = shared_items
        # The latest update received per new video, of any model version: a swap to the
        # version it belongs to installs it (an owner may have swapped first).
        self._item_updates: dict[str, ItemUpdate] = {}
        # True (the Kafka worker): live popularity comes from the videos' owners
        # (:class:`worker.core.popularity.PopularityOwner`), installed with
        # :meth:`install_popularity`; this engine counts none of its own events and hands
        # out the pairs whose positivity changed (:meth:`take_popularity_pairs`).
        self.shared_popularity = shared_popularity
        self._pop_updates: dict[str, PopularityUpdate] = {}  # the latest per video
        self._pair_changes: dict[tuple[str, int], None] = {}  # (user, item) to send
        self.weights = weights or Weights()
        self.popularity_half_life_s = float(popularity_half_life_s)
        # The latest event time applied (µs): "now" for live popularity.
        self.now_us: int | None = None
        self._first_us: int | None = None  # the first event time applied (a seed fallback)
        self.k = k
        self.dedup_window = dedup_window
        self.users: dict[str, UserState] = {}
        # Restored but untouched users: their changelog record, decoded on first use.
        # A restart with a million users then costs a dict load, not a million objects.
        self.dormant: dict[str, bytes] = {}
        # Live states from before a model swap, in the item indices of the catalog they
        # were built on (that catalog's video ids with them, ~7 MB per 100k videos, kept
        # while one of its users has not come back); each moves to ``users`` on first use,
        # so a swap does not walk every live row on the hot path.
        self._older: list[tuple[Sequence[str], dict[str, UserState]]] = []
        # The latest VideoEvent of each announced video, with its sequence number: a swap
        # registers them again in the new model's catalog, as a restart would by reading
        # the ``videos`` topic.
        self._announced: dict[str, tuple[int, VideoEvent]] = {}
        self._announce_seq = 0
        # Interns user ids as the keys of new videos' interactions; it outlives swaps.
        self.user_idx: IdMap = model.users.copy()
        self._install(self.prepare(model))

    def prepare(self, model: Model, *, weights: Weights | None = None) -> Prepared:
        """Build what :meth:`swap_model` installs: the catalog (with the videos announced so
        far and its top-k index) and the user gramian.

        This is the costly part of a swap (~0.5 s for 100k videos and 200k users), and it
        may run in another thread while this engine serves: it only reads the
        announcements, through an atomic copy.
        """
        upto = self._announce_seq  # read before the copy: a later one is registered again
        announced = sorted(self._announced.copy().values(), key=lambda a: a[0])
        catalog = Catalog(model)
        for _, event in announced:
            _register(catalog, event)
        catalog.index()
        return Prepared(
            model=model,
            catalog=catalog,
            user_gram=gramian(model.user_factors),
            announced_upto=upto,
            weights=weights,
        )

    def _install(self, prepared: Prepared) -> None:
        self.model = prepared.model
        self.catalog = prepared.catalog
        if prepared.weights is not None:
            self.weights = prepared.weights
        self._user_gram = prepared.user_gram
        self._seed_popularity()
        for update in list(self._item_updates.values()):
            self.install_item_update(update)

    def _seed_popularity(self) -> None:
        """Popularity starts from the model's (its training positive pairs per video),
        decayed from the model's as-of time (:func:`seed_asof_us`), plus the live counts.

        The seed is each worker's own, computed from the model alone, so every worker with
        the same model holds the same bits; the live part is the owners' (shared) or this
        engine's positive pairs (not shared: a restart then starts again from the seed, and
        a swap starts again from the new model's, which counts the retrained data). Shared
        counts survive a swap: they are re-installed on the new catalog's indices.
        """
        self.popularity = LivePopularity(len(self.catalog), half_life_s=self.popularity_half_life_s)
        self._popularity_seed = self.catalog.popularity[: self.catalog.n_base].astype(np.float64)
        self._seed_asof_us = seed_asof_us(self.model)
        self._seed_fallback_us = self.now_us  # a model without a manifest: as of now
        for update in list(self._pop_updates.values()):
            self.install_popularity(update)

    def _seed_at(self, now_us: int) -> npt.NDArray[np.float64]:
        """The model's popularity decayed from its as-of time to ``now_us``."""
        seed = self._popularity_seed
        hl = half_life_us_of(self.popularity_half_life_s)
        if not self.live_popularity or hl == 0:
            return seed.copy()
        asof = next(
            (t for t in (self._seed_asof_us, self._seed_fallback_us, self._first_us) if t),
            None,
        )
        if asof is None:
            return seed.copy()
        with np.errstate(over="ignore", under="ignore"):
            factor = min(float(np.exp2(-(now_us - asof) / hl)), np.finfo(np.float64).max)
            out: npt.NDArray[np.float64] = seed * factor
        return out

    def popularity_values(self) -> npt.NDArray[np.float64]:
        """Live popularity of every catalog video at the latest event time (a new array);
        before any event, at the newest shared count's as-of time."""
        now = self.now_us
        if now is None:
            now = self.popularity_asof()
        if now is None:
            n = len(self.catalog)
            out = np.zeros(n, dtype=np.float64)
            out[: len(self._popularity_seed)] = self._popularity_seed
            return out
        return self.popularity_at(now)

    def popularity_at(self, now_us: int) -> npt.NDArray[np.float64]:
        """Popularity of every catalog video at ``now_us``: the decayed seed plus the live
        counts (a new array)."""
        n = len(self.catalog)
        self.popularity.grow(n)
        out = self.popularity.values(now_us)[:n].copy()
        seed = self._seed_at(now_us)
        out[: len(seed)] += seed
        return out

    # ---- shared popularity -------------------------------------------------------------------

    def take_popularity_pairs(self) -> list[PopularityPair]:
        """The latest state of every pair whose positivity or ``since`` changed (or whose
        event was replayed) since the last call, for the videos' owners."""
        out: list[PopularityPair] = []
        for user_id, item in self._pair_changes:
            st = self.users.get(user_id)
            if st is None:
                continue  # forgotten (revoked) since: its new owner sends it
            out.append(PopularityPair(self.catalog.items.id_of(item), user_id, st.since.get(item)))
        self._pair_changes = {}
        return out

    def popularity_asof(self) -> int | None:
        """The newest as-of time among the shared counts installed (None: none)."""
        return max((u.asof_us for u in self._pop_updates.values()), default=None)

    def install_popularity(self, update: PopularityUpdate) -> None:
        """Install a video's shared count from its owner (kept across model swaps)."""
        self._pop_updates[update.video_id] = update
        if not self.shared_popularity:
            return
        idx = self.catalog.ensure(update.video_id)
        self.popularity.set(idx, update.value, update.asof_us)

    @property
    def model_version(self) -> str:
        return self.model.version

    # ---- state ---------------------------------------------------------------------------

    def state_of(self, user_id: str) -> UserState:
        """The live state of a user; a known user starts from their bootstrap row."""
        st = self.users.get(user_id)
        if st is None and user_id in self.dormant:
            self.restore(user_id, decode_record(self.dormant.pop(user_id)))
            return self.users[user_id]
        if st is None and self._older:
            st = self._adopt(user_id)
        if st is None:
            st = UserState()
            base = self.model.users.get(user_id)
            if base is not None:
                cols, vals = self.model.row_of(base)
                st.row = dict(zip(cols.tolist(), vals.tolist(), strict=True))
                times = self.model.row_times_of(base)
                if times is not None:
                    st.touched = {
                        i: t for i, t in zip(cols.tolist(), times.tolist(), strict=True)
                        if t != UNKNOWN
                    }  # fmt: skip
                st.factors = self.model.user_factors[base]
            self.users[user_id] = st
        return st

    def _adopt(self, user_id: str) -> UserState | None:
        """Move a user's state from before a model swap into the current catalog."""
        for gen, (items, states) in enumerate(self._older):
            st = states.pop(user_id, None)
            if st is None:
                continue
            if not states:
                del self._older[gen]
            st.row = {self.catalog.ensure(items[i]): v for i, v in st.row.items()}
            st.touched = {self.catalog.ensure(items[i]): t for i, t in st.touched.items()}
            st.pairs = {self.catalog.ensure(items[i]): f for i, f in st.pairs.items()}
            st.since = {self.catalog.ensure(items[i]): t for i, t in st.since.items()}
            st.factors = None
            self.users[user_id] = st
            for i, v in st.row.items():
                if i in self.catalog.new:
                    self.catalog.note_interaction(i, self.user_idx.add(user_id), v)
            return st
        return None

    def settle(self, max_users: int) -> int:
        """Move up to ``max_users`` users set aside by a swap into the current catalog,
        oldest swap first; returns how many moved.

        Users who do not come back would otherwise keep their old catalog's video ids
        alive; the worker settles a few per loop turn until none is left.
        """
        moved = 0
        while self._older and moved < max_users:
            self._adopt(next(iter(self._older[0][1])))
            moved += 1
        return moved

    @property
    def unsettled(self) -> int:
        """Users set aside by a swap, not moved to the current catalog yet."""
        return sum(len(states) for _, states in self._older)

    def live_users(self) -> Iterator[tuple[str, UserState]]:
        """Every user with a decoded state (dormant records excluded)."""
        yield from self.users.items()
        for _, states in self._older:
            yield from states.items()

    @property
    def n_live_users(self) -> int:
        return len(self.users) + self.unsettled

    def register_video(self, event: VideoEvent) -> int:
        """Register or update a video from the ``videos`` topic; no retrain."""
        seq = self._announce_seq + 1
        self._announced.pop(event.video_id, None)
        self._announced[event.video_id] = (seq, event)
        self._announce_seq = seq  # after the entry: see prepare()
        return _register(self.catalog, event)

    def apply(self, event: RatingEvent, *, partition: int = -1, offset: int = -1) -> bool:
        """Apply one event to its user's row. False when it was already applied."""
        return self.apply_at(event, partition=partition, offset=offset) is Applied.APPLIED

    def apply_at(self, event: RatingEvent, *, partition: int = -1, offset: int = -1) -> Applied:
        """Apply one event at a source position, telling a replay from a duplicate."""
        st = self.state_of(event.user_id)
        if partition >= 0 and partition == st.partition and offset <= st.offset:
            # Re-read after a restore: the state already reflects it. Its pair's record may
            # not have been acknowledged before the crash: send the pair's state again.
            if self.shared_popularity:
                item = self.catalog.items.get(event.video_id)
                if item is not None and item in st.pairs:
                    self._pair_changes[event.user_id, item] = None
            return Applied.REPLAYED
        if st.seen(event.event_id):
            return Applied.DUPLICATE
        item = self.catalog.ensure(event.video_id)
        value = self.weights.event_value(
            event.action, event.watch_seconds, self.catalog.duration_of(item)
        )
        st.row[item] = st.row.get(item, 0.0) + value
        st.factors = None
        ts_us = int(event.ts.timestamp() * 1_000_000)
        # The latest event time per item (a max, so the order events arrive in does not
        # matter, as the row's sum does not): the age recency decay uses.
        if ts_us > st.touched.get(item, UNKNOWN):
            st.touched[item] = ts_us
        if self._first_us is None:
            self._first_us = ts_us
        if self.now_us is None or ts_us > self.now_us:
            self.now_us = ts_us
        self._pair_event(event, st, item, ts_us)
        st.events_applied += 1
        st.remember(event.event_id, self.dedup_window)
        if partition >= 0:
            st.partition, st.offset = partition, offset
        if item in self.catalog.new:
            self.catalog.note_interaction(item, self.user_idx.add(event.user_id), st.row[item])
        return Applied.APPLIED

    def _pair_event(self, event: RatingEvent, st: UserState, item: int, ts_us: int) -> None:
        """Move the (user, video) pair's state (:meth:`Weights.pair_after`); count it in
        popularity when it turns positive, take it back when it stops being positive."""
        flags = st.pairs.get(item)
        old = None if flags is None else PairState(*pair_of_flags(flags))
        new = self.weights.pair_after(
            old, event.action, event.watch_seconds, self.catalog.duration_of(item)
        )
        st.pairs[item] = pair_flags(new.reaction, new.reached)
        was = old is not None and old.positive
        if new.positive == was:
            return
        if new.positive:
            st.since[item] = ts_us
        since = st.since[item] if new.positive else st.since.pop(item)
        if self.shared_popularity:
            self._pair_changes[event.user_id, item] = None
        elif self.live_popularity and new.positive:
            self.popularity.add(item, since)
        elif self.live_popularity:
            self.popularity.remove(item, since)

    # ---- ranking -------------------------------------------------------------------------

    def refresh(self, user_ids: Iterable[str]) -> None:
        """Fold in every stale user among ``user_ids`` in one batched solve.

        Order: the stale users are folded in, the new videos they touched are refit
        (item-side fold-in) from everyone who interacted with them, and then the stale
        users whose rows hold one of those videos are folded in *again*, against the
        refit vectors. So every list is ranked with user factors solved against the item
        vectors it is scored with (issue 15).

        Why not refit first: the refit needs the interactors' factors, and the touched
        users' are stale (their rows just changed), so they must be solved once before
        the refit can use their new interaction; refitting from their previous factors
        would drop the event that made them stale. The second solve is one more ALS
        half-step for users touching new videos only (one batched solve).
        """
        stale = [u for u in dict.fromkeys(user_ids) if self.state_of(u).factors is None]
        self._fold_in(stale)
        if self.shared_items:
            return  # the videos' owners solve them from this batch's contributions
        new_items = {i for u in stale for i in self.users[u].row if i in self.catalog.new}
        if not new_items:
            return
        keys = sorted({k for i in new_items for k in self.catalog.new[i].interactions})
        interactors = [self.user_idx.id_of(k) for k in keys]
        self._fold_in([u for u in interactors if self.state_of(u).factors is None])
        values = dict(zip(interactors, self._fold_values(interactors, new_items), strict=True))

        def members(item: int, interactions: Mapping[int, float]) -> list[Member]:
            out: list[Member] = []
            for key in sorted(interactions, key=self.user_idx.id_of):
                uid = self.user_idx.id_of(key)
                x = self.users[uid].factors
                assert x is not None  # folded in above
                out.append((values[uid].get(item, 0.0), x, self.trained_factors(uid)))
            return out

        self.catalog.refit_new_items(sorted(new_items), members, self._user_gram)
        self._fold_in([u for u in stale if any(i in new_items for i in self.users[u].row)])

    @property
    def user_gram(self) -> F32:
        """Gramian of the model's trained user factors (what item solves start from)."""
        return self._user_gram

    def trained_factors(self, user_id: str) -> F32 | None:
        """A user's factors in the model as trained (None for a user new to it)."""
        idx = self.model.users.get(user_id)
        return None if idx is None else self.model.user_factors[idx]

    def _fold_values(
        self, user_ids: Sequence[str], items: Container[int]
    ) -> list[dict[int, float]]:
        """Per user, the values of ``items`` in their row as fold-in takes it (decayed:
        one vectorised pass for all of them), so the item side solves the same system
        as the user side."""
        states = [self.users[u] for u in user_ids]
        if self.model.params.decay == "none":
            return [{i: float(v) for i, v in st.row.items() if i in items} for st in states]
        return [
            {i: v for i, v in zip(cols.tolist(), vals.tolist(), strict=True) if i in items}
            for cols, vals in self._fold_rows(states)
        ]

    # ---- shared item side (worker.core.items) ----------------------------------------------

    def contributions(
        self, user_ids: Iterable[str], event_ms: Mapping[str, int] | None = None
    ) -> list[Contribution]:
        """What the owners of new videos need from ``user_ids`` (folded in by
        :meth:`recommend`): one per new video in each user's row, value and factors."""
        new = self.catalog.new
        out: list[Contribution] = []
        if not new:
            return out
        held: dict[str, list[int]] = {}  # user -> the new videos in their row
        for uid in dict.fromkeys(user_ids):
            st = self.users.get(uid)
            if st is None or st.factors is None:
                continue
            # Iterate over the smaller side: rows run to thousands, new videos are few.
            found = (
                [i for i in new if i in st.row]
                if len(new) < len(st.row)
                else [i for i in st.row if i in new]
            )
            if found:
                held[uid] = sorted(found)
        users = list(held)
        decayed = self.model.params.decay != "none"
        fold = self._fold_values(users, new) if decayed else [{} for _ in users]
        for uid, values in zip(users, fold, strict=True):
            st = self.users[uid]
            x = st.factors
            assert x is not None  # users without factors were left out above
            ms = (event_ms or {}).get(uid, 0)
            for i in held[uid]:
                # Decayed: the fold-in row's value (0 if decayed away); else the row's own.
                v = values.get(i, 0.0) if decayed else st.row[i]
                out.append(
                    Contribution(
                        video_id=self.catalog.items.id_of(i),
                        user_id=uid,
                        model_version=self.model_version,
                        value=float(v),
                        factors=x,
                        event_ms=ms,
                    )
                )
        return out

    def install_item_update(self, update: ItemUpdate) -> bool:
        """Install a new video's factors from its owner; True when they were taken.

        Kept (not installed) when it is of another model version; ignored when the
        current model trained the video (its own factors win)."""
        self._item_updates[update.video_id] = update
        if update.model_version != self.model_version:
            return False
        idx = self.catalog.ensure(update.video_id)
        if idx not in self.catalog.new or len(update.factors) != self.catalog.factors.shape[1]:
            return False
        self.catalog.install(idx, update.factors)
        return True

    def new_item_factors(self) -> dict[str, F32]:
        """Factors of every video new to the model, by id (checks and tools)."""
        items, factors = self.catalog.items, self.catalog.factors
        return {items.id_of(i): factors[i].copy() for i in self.catalog.new}

    def _fold_in(self, user_ids: Sequence[str]) -> None:
        if not user_ids:
            return
        solved = fold_in(
            self.catalog.factors,
            self.catalog.gram,
            self._fold_rows([self.users[u] for u in user_ids]),
            regularization=self.model.params.regularization,
            alpha=self.model.params.alpha,
            confidence_mode=self.model.params.confidence,
        )
        for u, vec in zip(user_ids, solved, strict=True):
            self.users[u].factors = vec

    def _fold_row(self, st: UserState) -> tuple[npt.NDArray[np.int64], F32]:
        """A state's row as fold-in takes it (see :meth:`_fold_rows`)."""
        return self._fold_rows([st])[0]

    def _fold_rows(self, states: Sequence[UserState]) -> list[tuple[npt.NDArray[np.int64], F32]]:
        """States' rows as fold-in takes them: zero values dropped, recency decay applied
        (:mod:`worker.core.decay`, as bootstrap applies it to the rows it trains on), in one
        vectorised pass for the whole batch."""
        rows = [row_arrays(st.row) for st in states]
        p = self.model.params
        if p.decay == "none":
            return rows
        times = [
            np.fromiter(
                (st.touched.get(i, UNKNOWN) for i in cols.tolist()), dtype=np.int64, count=len(cols)
            )
            for st, (cols, _) in zip(states, rows, strict=True)
        ]
        vals = decayed_rows([v for _, v in rows], times, p.decay, p.decay_half_life)
        out = []
        for (cols, _), dv in zip(rows, vals, strict=True):
            if not dv.all():  # decayed to exactly 0 (underflow): dropped, as training does
                keep = dv != 0.0
                cols, dv = cols[keep], dv[keep]
            out.append((cols, dv))
        return out

    def recommend(self, user_ids: Sequence[str]) -> list[UserList]:
        """Top-k lists for ``user_ids``: one fold-in, one batched top-k, popular fallback."""
        self.refresh(user_ids)
        states = [self.state_of(u) for u in user_ids]
        personal = [i for i, st in enumerate(states) if st.has_positive()]
        out: list[UserList | None] = [None] * len(user_ids)
        pop: npt.NDArray[np.float64] | None = None
        if personal:
            x = np.stack([states[i].factors for i in personal]).astype(np.float32)  # type: ignore[misc]
            exclude = [np.array(list(states[i].row), dtype=np.int64) for i in personal]
            params = self.model.params
            if params.blend_returning or params.blend_new:
                pop = self.popularity_values()
                betas = np.array(
                    [
                        params.blend_returning if user_ids[i] in self.model.users
                        else params.blend_new
                        for i in personal
                    ],
                    dtype=np.float64,
                )  # fmt: skip
                mean, cov = self.catalog.moments()
                g = np.log1p(np.maximum(pop, 0.0)).astype(np.float32)
                items, blended = blend_top_k(
                    self.catalog.blend_index(g), x, betas, mean, cov, exclude, self.k
                )
                scores = blended.astype(np.float32)
            else:
                items, scores = top_k(self.catalog.index(), x, exclude, self.k)
            ids = self.catalog.items.ids
            # Whole-matrix conversions: per-row numpy indexing costs more than the ranking.
            for i, its, scs in zip(personal, items.tolist(), scores.tolist(), strict=True):
                n = its.index(-1) if -1 in its else len(its)  # missing items trail
                out[i] = UserList(
                    user_id=user_ids[i],
                    video_ids=[ids[v] for v in its[:n]],
                    scores=scs[:n],
                    strategy="als",
                )
        if pop is None and None in out:
            pop = self.popularity_values()
        for i, st in enumerate(states):
            if out[i] is None:
                out[i] = self._popular(user_ids[i], st, pop)
        return [o for o in out if o is not None]

    def _popular(
        self, user_id: str, st: UserState, pop: npt.NDArray[np.float64] | None = None
    ) -> UserList:
        """Live-popularity list without the user's seen videos, demoting disliked
        categories. Ties go to the lower item index (the model's order, then new videos)."""
        if pop is None:
            pop = self.popularity_values()
        disliked = {self.catalog.category_of(i) for i, v in st.row.items() if v < 0} - {-1}
        want = self.k * 5 if disliked else self.k  # room to rerank when demoting
        n = len(pop)
        m = min(n, want + len(st.row))
        if m == 0:
            cand = np.empty(0, dtype=np.int64)
        else:
            cut = np.partition(pop, n - m)[n - m]
            cand = np.flatnonzero(pop >= cut)
            cand = cand[np.lexsort((cand, -pop[cand]))]
        picked: list[tuple[float, int]] = []
        for pos, item in enumerate(cand.tolist()):
            if item in st.row:
                continue
            score = float(pop[item])
            if self.catalog.category_of(item) in disliked:
                score *= DISLIKED_CATEGORY_PENALTY
            picked.append((-score, pos))
            if len(picked) >= want:
                break
        picked.sort()
        top = [int(cand[p]) for _, p in picked[: self.k]]
        return UserList(
            user_id=user_id,
            video_ids=[self.catalog.items.id_of(i) for i in top],
            scores=[float(-s) for s, _ in picked[: self.k]],
            strategy="popular",
        )

    # ---- model swap ----------------------------------------------------------------------

    def swap_model(self, model: Model | Prepared) -> None:
        """Hot-swap the base model. Live rows are kept and refolded lazily on next use.

        Pass what :meth:`prepare` built (in another thread, say) to keep the swap itself
        cheap: it then registers the videos announced since, carries over the
        interactions with videos that stay untrained, and sets the live states aside to
        be moved on first use.
        """
        prepared = model if isinstance(model, Prepared) else self.prepare(model)
        old_catalog = self.catalog
        for seq, event in sorted(self._announced.values(), key=lambda a: a[0]):
            if seq > prepared.announced_upto:
                _register(prepared.catalog, event)
        self._install(prepared)
        # Interactions with videos that stay untrained keep feeding their item-side
        # fold-in, before the rows that hold them move over (same user keys: user_idx
        # outlives the swap).
        for i, entry in old_catalog.new.items():
            if not entry.interactions:
                continue
            j = self.catalog.ensure(old_catalog.items.id_of(i))
            if j in self.catalog.new:
                self.catalog.new[j].interactions = entry.interactions
        if self.users:
            self._older.append((old_catalog.items.ids, self.users))
            self.users = {}

    # ---- durable state -------------------------------------------------------------------

    def snapshot(self, user_id: str) -> dict[str, object]:
        """A JSON-ready record of a user's state, for the changelog."""
        return self.state_of(user_id).to_record(self.catalog.items.id_of)

    def restore(self, user_id: str, record: dict[str, object]) -> None:
        """Replace a user's state with a changelog record."""
        st = UserState.from_record(record, self.catalog.ensure)
        self._drop_older((user_id,))
        self.users[user_id] = st
        for i, v in st.row.items():
            if i in self.catalog.new:
                self.catalog.note_interaction(i, self.user_idx.add(user_id), v)

    def restore_lazy(self, records: Mapping[str, bytes]) -> None:
        """Replace users' states with encoded changelog records, decoded on first use."""
        for u in records:
            self.users.pop(u, None)
        self._drop_older(records)
        self.dormant.update(records)

    def forget(self, user_ids: Iterable[str]) -> None:
        """Drop users (their partition moved to another worker)."""
        user_ids = list(user_ids)
        for u in user_ids:
            self.users.pop(u, None)
            self.dormant.pop(u, None)
        self._drop_older(user_ids)

    def _drop_older(self, user_ids: Collection[str]) -> None:
        """Drop users' states from before a swap (a restore or a revocation replaces them)."""
        if not self._older:
            return  # the usual case: no swap, or everyone moved over
        for _, states in self._older:
            for u in user_ids:
                states.pop(u, None)
        self._older = [gen for gen in self._older if gen[1]]


def seed_asof_us(model: Model) -> int | None:
    """When the model's popularity counts are as of (µs): its newest training event
    (``data_summary.event_time.max``), else its ``until``, else when it was written
    (``created_at``); None for a model without a manifest (in-process tests), whose seed
    is then as of the first event applied."""
    summary = model.manifest.get("data_summary") or {}
    candidates = [
        (summary.get("event_time") or {}).get("max"),
        summary.get("until"),
        model.manifest.get("created_at"),
    ]
    for text in candidates:
        if not text:
            continue
        try:
            at = datetime.fromisoformat(str(text))
        except ValueError:
            continue
        if at.tzinfo is None:
            at = at.replace(tzinfo=timezone.utc)
        return int(at.timestamp()) * 1_000_000 + at.microsecond
    return None


def _register(catalog: Catalog, event: VideoEvent) -> int:
    return catalog.register(
        event.video_id,
        duration_s=event.duration_seconds,
        category=event.category,
        author=event.author_id,
    )


def row_arrays(row: dict[int, float]) -> tuple[npt.NDArray[np.int64], F32]:
    """A state row as (item indices, values) arrays, zero values dropped."""
    n = len(row)
    cols = np.fromiter(row, dtype=np.int64, count=n)
    vals = np.fromiter(row.values(), dtype=np.float32, count=n)
    if 0.0 in row.values():  # a like undone by a dislike, say: no longer an interaction
        keep = vals != 0.0
        cols, vals = cols[keep], vals[keep]
    return cols, vals
