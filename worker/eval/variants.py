"""The in-process variants: prequential ground truth (:class:`Relevance`), the baselines
(time-aware popularity, static and retrained factor models) and :func:`run_in_process`,
which answers every request point with what each variant knew at that point."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from tqdm import tqdm

from worker.core.als import F32, I32, I64, ItemIndex, top_k
from worker.core.engine import Recommender
from worker.core.model import Model
from worker.core.scoring import Weights
from worker.core.wire import (
    TOP_K,
    RatingEvent,
)
from worker.eval.events import (
    _FLUSH_USERS,
    _MAX_DECAY_EXPONENT,
    _POPULARITY_REFRESHES,
    _US,
    ACTIONS,
    FOLDIN_INPROCESS,
    POPULARITY,
    RETRAIN,
    RETRAIN_NOFOLDIN,
    STATIC,
    VIEW,
    EventTable,
    PositiveChanges,
    Request,
    _dt,
    _event_id,
    video_event,
)

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]


# ---- prequential ground truth ----------------------------------------------------------------


@dataclass
class Relevance:
    """Per user, the videos they interact with after the split, for prequential scoring.

    A *unit* is one (user, video) pair first met after the split and not seen
    before it: its first replay index and time, and whether it is positive at the
    end of the window (:class:`worker.core.scoring.PairState`: last reaction
    ``like``; with no reaction, a view of >= ``positive_fraction``).
    """

    user: I32  # units sorted by (user, first index)
    first_idx: I64
    first_ts: I64
    video: I32
    positive: npt.NDArray[np.bool_]
    starts: I64  # starts[u]..starts[u+1] are user u's units
    horizon_events: int
    horizon_us: int | None

    @classmethod
    def build(
        cls,
        table: EventTable,
        split: int,
        end: int,
        *,
        positive_fraction: float,
        default_duration_s: float,
        horizon_events: int,
        horizon_seconds: float | None,
    ) -> Relevance:
        nv = np.int64(table.n_videos)
        pre_keys = np.unique(table.user[:split].astype(np.int64) * nv + table.video[:split])
        keys = table.user[split:end].astype(np.int64) * nv + table.video[split:end]
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        # Positive at the end of the window: the pair's changes in it sum to +1.
        changes = table.positive_changes(positive_fraction, default_duration_s, split, end)
        net = np.zeros(len(uniq), dtype=np.int64)
        np.add.at(net, inverse[changes.idx - split], changes.sign)
        positive = net > 0
        fresh = ~np.isin(uniq, pre_keys)
        users = (uniq // nv).astype(np.int32)[fresh]
        order = np.lexsort((first[fresh], users))
        users = users[order]
        first_idx = first[fresh][order].astype(np.int64)
        return cls(
            user=users,
            first_idx=first_idx,
            first_ts=table.ts[split + first_idx],
            video=(uniq % nv).astype(np.int32)[fresh][order],
            positive=positive[fresh][order],
            starts=np.searchsorted(users, np.arange(table.n_users + 1)).astype(np.int64),
            horizon_events=horizon_events,
            horizon_us=None if horizon_seconds is None else int(horizon_seconds * _US),
        )

    def relevant(self, user: int, idx: int, ts: int) -> set[int]:
        """Video codes relevant to a list for ``user`` reflecting replay event ``idx`` at ``ts``."""
        lo, hi = int(self.starts[user]), int(self.starts[user + 1])
        j = lo + int(np.searchsorted(self.first_idx[lo:hi], idx, side="right"))
        stop = min(hi, j + self.horizon_events)
        if self.horizon_us is not None:
            stop = j + int(np.searchsorted(self.first_ts[j:stop], ts + self.horizon_us, "right"))
        sel = slice(j, stop)
        return set(self.video[sel][self.positive[sel]].tolist())


# ---- baselines -------------------------------------------------------------------------------


class Popularity:
    """Time-aware popularity: each positive (user, video) pair counts once,
    ``2 ** ((t - t0) / half_life)`` with ``t`` the time it became positive
    (:class:`worker.core.scoring.PairState`), until a later reaction makes it negative.

    Weighting by a growing factor instead of decaying every count gives the same
    ranking as an exponential decay of age, with O(1) work per event.
    """

    def __init__(self, n_videos: int, *, t0_us: int, half_life_us: float) -> None:
        self.t0 = t0_us
        self.half_life = max(1.0, half_life_us)
        self.counts = np.zeros(n_videos, dtype=np.float64)
        self.active = np.zeros(n_videos, dtype=np.int64)  # positive pairs per video
        self.order: I64 = np.zeros(0, dtype=np.int64)

    def weight(self, ts_us: I64 | int) -> F64:
        x = (np.asarray(ts_us, dtype=np.float64) - self.t0) / self.half_life
        return np.exp2(np.clip(x, -_MAX_DECAY_EXPONENT, _MAX_DECAY_EXPONENT))

    def add_many(self, videos: I32, ts_us: I64, sign: npt.NDArray[np.int8] | None = None) -> None:
        """Count positive pairs (``sign`` +1) or take them back (-1, ``ts_us`` the time
        they became positive)."""
        s = np.ones(len(videos), dtype=np.int64) if sign is None else sign.astype(np.int64)
        np.add.at(self.counts, videos, s * self.weight(ts_us))
        np.add.at(self.active, videos, s)

    def add(self, video: int, ts_us: int, sign: int = 1) -> None:
        self.counts[video] += sign * float(self.weight(ts_us))
        self.active[video] += sign

    def add_changes(self, table: EventTable, changes: PositiveChanges, upto: int) -> None:
        """Every change before event ``upto``."""
        n = int(np.searchsorted(changes.idx, upto))
        self.add_many(table.video[changes.idx[:n]], changes.since_ts[:n], changes.sign[:n])

    def refresh(self) -> None:
        """Re-sort the ranking (only videos with a positive pair now are eligible)."""
        eligible = np.flatnonzero(self.active > 0)
        self.order = eligible[np.argsort(-self.counts[eligible], kind="stable")]

    def top(self, seen: set[int], k: int) -> list[int]:
        """The ``k`` most popular videos not in ``seen``, from the last refreshed ranking."""
        return first_unseen(self.order, seen, k)


@dataclass
class FactorModel:
    """User and item factors over the event table's codes, with eligible items and a fallback."""

    user_factors: F32  # (n_users_in_table, f); rows of unknown users are unused
    known_user: npt.NDArray[np.bool_]
    eligible: I64  # video codes that can be recommended
    index: ItemIndex
    pos_of: I64  # video code -> position in ``eligible`` or -1
    popular: I64  # fallback ranking (video codes), for users without factors

    @classmethod
    def build(
        cls,
        user_factors: F32,
        known_user: npt.NDArray[np.bool_],
        item_factors: F32,
        eligible: I64,
        popular: I64,
        n_videos: int,
    ) -> FactorModel:
        pos_of = np.full(n_videos, -1, dtype=np.int64)
        pos_of[eligible] = np.arange(len(eligible))
        return cls(
            user_factors=user_factors,
            known_user=known_user,
            eligible=eligible,
            index=ItemIndex.build(np.ascontiguousarray(item_factors[eligible])),
            pos_of=pos_of,
            popular=popular,
        )

    def recommend(self, users: Sequence[int], seen: Sequence[set[int]], k: int) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in users]
        personal = [j for j, u in enumerate(users) if self.known_user[u]]
        if personal:
            x = self.user_factors[[users[j] for j in personal]]
            exclude = []
            for j in personal:
                p = self.pos_of[np.fromiter(seen[j], dtype=np.int64, count=len(seen[j]))]
                exclude.append(p[p >= 0])
            items, _ = top_k(self.index, x, exclude, k)
            for row, j in enumerate(personal):
                out[j] = self.eligible[items[row][items[row] >= 0]].tolist()
        for j, u in enumerate(users):
            if not self.known_user[u]:
                out[j] = first_unseen(self.popular, seen[j], k)
        return out


def first_unseen(order: I64, seen: set[int], k: int) -> list[int]:
    """The first ``k`` entries of ``order`` that are not in ``seen``."""
    out: list[int] = []
    for v in order:
        iv = int(v)
        if iv not in seen:
            out.append(iv)
            if len(out) >= k:
                break
    return out


def static_factor_model(model: Model, table: EventTable) -> FactorModel:
    """The bootstrap model, re-indexed by the event table's codes."""
    code_of_user = {u: i for i, u in enumerate(table.user_ids)}
    code_of_video = {v: i for i, v in enumerate(table.video_ids)}
    f = model.item_factors.shape[1]
    uf = np.zeros((table.n_users, f), dtype=np.float32)
    known = np.zeros(table.n_users, dtype=bool)
    for row, uid in enumerate(model.users.ids):
        c = code_of_user.get(uid)
        if c is not None:
            uf[c] = model.user_factors[row]
            known[c] = True
    item_f = np.zeros((table.n_videos, f), dtype=np.float32)
    rows, codes = [], []
    for row, vid in enumerate(model.items.ids):
        c = code_of_video.get(vid)
        if c is not None:
            rows.append(row)
            codes.append(c)
    item_f[codes] = model.item_factors[rows]
    eligible = np.array(codes, dtype=np.int64)
    pop = model.videos.popularity[rows]
    popular = eligible[np.argsort(-pop, kind="stable")]
    return FactorModel.build(uf, known, item_f, eligible, popular, table.n_videos)


@dataclass
class Retrained:
    """A full retrain: as a refold :class:`Model` (for fold-in) and as a :class:`FactorModel`."""

    model: Model
    factors: FactorModel


def fit_factor_model(
    table: EventTable,
    end: int,
    values: F32,
    base: Model,
    *,
    seed: int,
    threads: int,
) -> Retrained:
    """Full ALS retrain on events ``[0, end)`` with the bootstrap model's hyper-parameters.

    The rows are the worker's: every event's value (:meth:`EventTable.values`)
    summed per (user, video). Videos keep the bootstrap model's metadata where it
    has them (for content priors), and the popularity of the retrained data.
    """
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from worker.core.ids import IdMap
    from worker.core.model import VideoMeta
    from worker.train import implicit_input

    mat = sp.coo_matrix(
        (values[:end], (table.user[:end], table.video[:end])),
        shape=(table.n_users, table.n_videos),
        dtype=np.float32,
    ).tocsr()  # duplicates are summed, as the worker sums a user's events per video
    p = base.params
    times = None
    if p.decay != "none":
        # each (user, video)'s latest event time, in the CSR's (row, column) order
        key = table.user[:end].astype(np.int64) * table.n_videos + table.video[:end]
        order = np.argsort(key, kind="stable")
        skey = key[order]
        starts = np.flatnonzero(np.r_[True, skey[1:] != skey[:-1]])
        times = np.maximum.reduceat(table.ts[:end][order], starts)[mat.data != 0]
    mat.eliminate_zeros()
    users = np.flatnonzero(mat.getnnz(axis=1) > 0)
    items = np.flatnonzero(mat.getnnz(axis=0) > 0).astype(np.int64)
    sub = mat[users][:, items].tocsr()
    sub.sort_indices()
    if times is not None:
        where = sp.csr_matrix(
            (np.arange(1, mat.nnz + 1, dtype=np.int64), mat.indices, mat.indptr), shape=mat.shape
        )[users][:, items].tocsr()
        where.sort_indices()
        times = times[where.data - 1]
    # decay and the confidence mode as bootstrap applies them (worker.train.implicit_input)
    fit_matrix, fit_alpha = implicit_input(sub, p, times)
    als = AlternatingLeastSquares(
        factors=p.factors,
        regularization=p.regularization,
        alpha=fit_alpha,
        iterations=p.iterations,
        random_state=seed,
        num_threads=threads,
    )
    with threadpool_limits(1, "blas"):  # implicit parallelises itself; BLAS threads fight it
        als.fit(fit_matrix, show_progress=False)
    user_f = np.asarray(als.user_factors, dtype=np.float32)
    item_f = np.asarray(als.item_factors, dtype=np.float32)
    positive = np.asarray((sub > 0).sum(axis=0)).ravel().astype(np.float32)
    category = np.full(len(items), -1, dtype=np.int32)
    author = np.full(len(items), -1, dtype=np.int32)
    for j, code in enumerate(items.tolist()):
        row = base.items.get(table.video_ids[code])
        if row is not None:
            category[j] = base.videos.category[row]
            author[j] = base.videos.author[row]
    model = Model(
        version=f"{base.version}+retrain@{end}",
        params=p,
        user_factors=user_f,
        item_factors=item_f,
        users=IdMap(table.user_ids[u] for u in users.tolist()),
        items=IdMap(table.video_ids[v] for v in items.tolist()),
        user_rows=sub,
        user_row_times=times,
        videos=VideoMeta(
            duration_s=table.duration_s[items].astype(np.float32),
            category=category,
            author=author,
            popularity=positive,
            categories=list(base.videos.categories),
            authors=list(base.videos.authors),
        ),
    )
    full_users = np.zeros((table.n_users, user_f.shape[1]), dtype=np.float32)
    full_users[users] = user_f
    full_items = np.zeros((table.n_videos, item_f.shape[1]), dtype=np.float32)
    full_items[items] = item_f
    known = np.zeros(table.n_users, dtype=bool)
    known[users] = True
    popular = items[np.argsort(-positive, kind="stable")]
    return Retrained(
        model=model,
        factors=FactorModel.build(full_users, known, full_items, items, popular, table.n_videos),
    )


# ---- in-process variants ---------------------------------------------------------------------


@dataclass
class InProcessOptions:
    """Knobs of the in-process variants."""

    k: int = TOP_K
    retrain_every: int = 0  # events between retrains; 0: never (retrain == static)
    half_life_us: float = 0.0
    positive_fraction: float = 0.5
    weights: Weights = field(default_factory=Weights)
    foldin: bool = True
    #: The in-process fold-in answers every n-th request only (1: all); it is a check.
    check_every: int = 1
    seed: int = 0
    threads: int = 0
    #: False: popularity and the in-process fold-in only (what ``refold tune`` scores).
    baselines: bool = True


def run_in_process(
    table: EventTable,
    split: int,
    end: int,
    model: Model,
    requests: Sequence[Request],
    opts: InProcessOptions,
    *,
    progress: bool,
) -> tuple[dict[str, list[list[int]]], dict[str, Any]]:
    """Answer every request with every in-process variant, replaying the events once.

    Popularity answers at once. The model variants collect pending requests and
    answer them in one batch; a batch is answered before any event that could
    change a pending answer: an event of a pending user, an event on a video
    new to the model (its factors are refit from its interactions), or a retrain.

    When the requests carry the live worker's batches (``batch_end``), the core
    engine's check mirrors them instead: at the end of each live batch it lists
    every user of that batch, as the worker did. Videos without training
    interactions are refit from the interactions seen so far whenever a list
    is made for a user who touched them, and those refits change the item
    gramian every fold-in uses, so only the same batch ends give the same lists.
    """
    run = _InProcessRun(table, split, end, model, requests, opts)
    bar = tqdm(total=end - split, desc="baselines (in-process)", unit="ev", disable=not progress)
    for j in range(end - split):
        run.step(j)
        bar.update(1)
    run.flush()
    bar.close()
    return run.answers, run.timings


class _InProcessRun:
    """The state of :func:`run_in_process`: every variant, replayed one event at a time."""

    def __init__(
        self,
        table: EventTable,
        split: int,
        end: int,
        model: Model,
        requests: Sequence[Request],
        opts: InProcessOptions,
    ) -> None:
        self.table, self.split, self.model, self.requests, self.opts = (
            table, split, model, requests, opts
        )  # fmt: skip
        n = end - split
        self.values = table.values(opts.weights)
        changes = table.positive_changes(
            opts.positive_fraction, opts.weights.default_duration_s, 0, end
        )
        self.change_sign = np.zeros(end, dtype=np.int8)  # at most one change per event
        self.change_sign[changes.idx] = changes.sign
        self.change_since = np.zeros(end, dtype=np.int64)
        self.change_since[changes.idx] = changes.since_ts
        self.seen: dict[int, set[int]] = {}  # only users who appear in the replay need one
        history = np.flatnonzero(np.isin(table.user[:split], np.unique(table.user[split:end])))
        for u, v in zip(table.user[history].tolist(), table.video[history].tolist(), strict=True):
            self.seen.setdefault(u, set()).add(v)
        self.pop = Popularity(
            table.n_videos, t0_us=int(table.ts[split]), half_life_us=opts.half_life_us
        )
        self.pop.add_changes(table, changes, split)
        self.pop.refresh()
        self.refresh_every = max(1, n // _POPULARITY_REFRESHES)
        every = opts.retrain_every
        self.retrain_at = set(range(every, n, every)) if every > 0 else set()
        self.factor_models: dict[str, FactorModel] = {}
        self.engines: dict[str, Recommender] = {}
        if opts.baselines:
            self.factor_models[STATIC] = static_factor_model(model, table)
            self.factor_models[RETRAIN_NOFOLDIN] = self.factor_models[STATIC]
            self.engines[RETRAIN] = self._engine(model)
        if opts.foldin:
            self.engines[FOLDIN_INPROCESS] = self._engine(model)
        self.registered: dict[str, set[str]] = {name: set() for name in self.engines}
        names = [POPULARITY, *self.factor_models, *self.engines]
        self.answers: dict[str, list[list[int]]] = {name: [[] for _ in requests] for name in names}
        self.pending: dict[int, int] = {}  # user code -> request index
        # The live worker's batches, for the core engine's check: batch end -> requests.
        self.mirrored: dict[int, list[int]] = {}
        if FOLDIN_INPROCESS in self.engines and any(r.batch_end is not None for r in requests):
            for q, r in enumerate(requests):
                key = r.idx if r.batch_end is None else r.batch_end
                self.mirrored.setdefault(key, []).append(q)
        self.timings: dict[str, Any] = {
            "retrain_s": 0.0, "retrains": 0, "foldin_s": 0.0, "factor_s": 0.0
        }  # fmt: skip
        self.req_i = 0

    def _engine(self, model: Model) -> Recommender:
        """An engine whose live popularity decays as the popularity baseline's does (the
        replay's workers get the same half-life), so cold-start lists and the popularity
        blend use the time-aware popularity the baseline is scored with."""
        if not self.opts.half_life_us:
            return Recommender(model, weights=self.opts.weights)
        half_life_s = self.opts.half_life_us / 1e6
        return Recommender(model, weights=self.opts.weights, popularity_half_life_s=half_life_s)

    def flush(self) -> None:
        """Answer every pending request of the model variants in one batch."""
        if not self.pending:
            return
        users = list(self.pending)
        seen_sets = [self.seen.get(u, set()) for u in users]
        t0 = time.monotonic()
        for name, fm in self.factor_models.items():
            lists = fm.recommend(users, seen_sets, self.opts.k)
            for u_list, r in zip(lists, self.pending.values(), strict=True):
                self.answers[name][r] = u_list
        self.timings["factor_s"] += time.monotonic() - t0
        t0 = time.monotonic()
        for name, engine in self.engines.items():
            if name == FOLDIN_INPROCESS and self.mirrored:
                continue  # answered at the live batch ends
            picked = [
                (u, r)
                for u, r in self.pending.items()
                if name != FOLDIN_INPROCESS or r % self.opts.check_every == 0
            ]
            ids = [self.table.user_ids[u] for u, _ in picked]
            for ul, (_, r) in zip(engine.recommend(ids), picked, strict=True):
                self.answers[name][r] = [self.table.code_of(v) for v in ul.video_ids]
        self.timings["foldin_s"] += time.monotonic() - t0
        self.pending.clear()

    def _retrain(self, i: int) -> None:
        self.flush()
        t0 = time.monotonic()
        retrained = fit_factor_model(
            self.table, i, self.values, self.model, seed=self.opts.seed, threads=self.opts.threads
        )
        if RETRAIN in self.engines:
            self.factor_models[RETRAIN_NOFOLDIN] = retrained.factors
            self.engines[RETRAIN].swap_model(retrained.model)
        self.timings["retrain_s"] += time.monotonic() - t0
        self.timings["retrains"] += 1

    def step(self, j: int) -> None:
        """Replay event ``split + j`` into every variant, then answer its request points."""
        table, i = self.table, self.split + j
        u, v = int(table.user[i]), int(table.video[i])
        vid = table.video_ids[v]
        if j in self.retrain_at:
            self._retrain(i)
        new_to = [name for name, e in self.engines.items() if _is_new(e, vid)]
        if u in self.pending or (new_to and self.pending):
            self.flush()  # refits of a new video's factors would change pending answers
        self.seen.setdefault(u, set()).add(v)
        if self.change_sign[i]:
            self.pop.add(v, int(self.change_since[i]), int(self.change_sign[i]))
        if j % self.refresh_every == 0:
            self.pop.refresh()
        self._apply(j, i, vid, new_to)
        if j in self.mirrored:
            self._answer_mirrored(self.mirrored[j])
        while self.req_i < len(self.requests) and self.requests[self.req_i].idx == j:
            r = self.requests[self.req_i]
            self.answers[POPULARITY][self.req_i] = self.pop.top(
                self.seen.get(r.user, set()), self.opts.k
            )
            self.pending[r.user] = self.req_i
            self.req_i += 1
        if len(self.pending) >= _FLUSH_USERS:
            self.flush()

    def _apply(self, j: int, i: int, vid: str, new_to: list[str]) -> None:
        """The event to the engines, registering a video new to an engine first."""
        table = self.table
        a = int(table.action[i])
        event = RatingEvent.model_construct(  # validated when the table was loaded
            event_id=_event_id(j),
            user_id=table.user_ids[int(table.user[i])],
            video_id=vid,
            action=ACTIONS[a],
            watch_seconds=float(table.watch[i]) if a == VIEW else None,
            ts=_dt(int(table.ts[i])),
        )
        for name, engine in self.engines.items():
            if name in new_to and vid not in self.registered[name]:
                self.registered[name].add(vid)
                ev = video_event(vid, table.videos.get(vid), int(table.ts[i]))
                if ev is not None:
                    engine.register_video(ev)
            engine.apply(event)

    def _answer_mirrored(self, qs: list[int]) -> None:
        """The core engine's check, at the end of a live worker batch."""
        t0 = time.monotonic()
        engine = self.engines[FOLDIN_INPROCESS]
        users = [self.table.user_ids[self.requests[q].user] for q in qs]
        for ul, q in zip(engine.recommend(users), qs, strict=True):
            if q % self.opts.check_every == 0:
                self.answers[FOLDIN_INPROCESS][q] = [self.table.code_of(v) for v in ul.video_ids]
        self.timings["foldin_s"] += time.monotonic() - t0


def _is_new(engine: Recommender, video_id: str) -> bool:
    """True when ``video_id`` is unknown to the engine's model (so its factors are refit)."""
    idx = engine.catalog.items.get(video_id)
    return idx is None or idx in engine.catalog.new
