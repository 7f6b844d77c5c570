"""Synthetic Rutube-style watch logs with planted, learnable structure.

:func:`synthesize` writes three Parquet files in the seed layout:

* ``logs.parquet``: ``event_timestamp``, ``viewer_uid``, ``rutube_video_id``,
  ``total_watchtime`` (seconds), ``region``, ``ua_device_type``;
* ``video_stat.parquet``: ``video_id``, ``title``, ``category``, ``duration``
  (seconds), ``author_id``, ``v_pub_datetime``, ``v_likes``, ``v_dislikes``,
  ``v_year_views``;
* ``reactions.parquet``: ``user_id``, ``video_id``, ``action``
  (like/dislike/neutral), ``ts``.

The planted structure, which ALS should recover and popularity cannot:

* every author has a home category; every video has an author and (mostly)
  the author's category, a Zipf popularity and a log-normal duration;
* every user has a sparse Dirichlet taste over the categories, a few favourite
  authors (drawn from the user's own tastes) and a log-normal activity level;
* a view picks a user by activity, then a video: mostly from a category drawn
  from the user's taste, sometimes from a favourite author, sometimes from the
  global popularity (exploration), always weighted by popularity within the pool;
* the watched fraction grows with the user's affinity to the video (noisy), and
  some views repeat an earlier (user, video) pair;
* a fraction of views carries an explicit reaction implied by the same affinity.

Everything is vectorised numpy, generated chunk by chunk and written one row
group per chunk, so memory is bounded by the chunk size and the per-user taste
table, not by the number of events. The output is a pure function of the
arguments (``row_group_size`` included, since it is also the generation chunk).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_CATEGORY_NAMES = (
    "Music", "Gaming", "Movies", "Series", "News", "Sport", "Cars", "Cooking",
    "Travel", "Science", "Education", "Humor", "Kids", "Animals", "Beauty", "Fashion",
    "Fitness", "Health", "Tech", "Business", "Politics", "History", "Art", "DIY",
    "Gardening", "Fishing", "Hunting", "Anime", "Podcasts", "Religion", "Esports", "Vlogs",
)  # fmt: skip
_REGIONS = ("Moscow", "Saint Petersburg", "Novosibirsk", "Yekaterinburg", "Kazan", "Sochi")
_DEVICES = ("mobile", "desktop", "tablet", "smarttv")

#: Videos per category, on average; small catalogues get fewer categories.
_VIDEOS_PER_CATEGORY = 20
#: Videos per author, on average.
_VIDEOS_PER_AUTHOR = 25
#: Dirichlet concentration of user tastes: well below 1, so each user likes a few categories.
_TASTE_CONCENTRATION = 0.15
#: Favourite authors per user.
_FAVOURITE_AUTHORS = 3
#: Share of views picked from a favourite author.
_P_AUTHOR = 0.2
#: Share of views picked from global popularity, regardless of taste (exploration/noise).
_P_EXPLORE = 0.15
#: Share of views that repeat an earlier (user, video) pair.
_P_REPEAT = 0.08
#: Share of views that also carry an explicit reaction (the brief asks for ~10-15%).
_P_REACT = 0.12
#: Zipf exponent of video popularity; the +10 offset flattens the very head.
_ZIPF_EXPONENT = 0.9
_ZIPF_OFFSET = 10.0
#: Probability that a video is in its author's home category.
_P_HOME_CATEGORY = 0.85
#: Log-normal video duration: median 8 minutes, clipped to [10 s, 4 h].
_DURATION_MEDIAN_S = 480.0
_DURATION_SIGMA = 0.9
_DURATION_MIN_S, _DURATION_MAX_S = 10, 4 * 3600
#: Log-normal sigma of user activity (heavy users watch much more).
_ACTIVITY_SIGMA = 1.0
#: Watched fraction = _WATCH_MAX * sigmoid(_WATCH_SLOPE * (affinity - _WATCH_MID) + noise).
_WATCH_MAX, _WATCH_SLOPE, _WATCH_MID, _WATCH_NOISE = 1.15, 5.0, 0.45, 0.8
#: Affinity = _AFF_TASTE * (taste for the category / the user's top taste)
#: + _AFF_FAVOURITE for a favourite author, clipped to [0, 1]: a favourite author in a
#: middling category still lands in the "like" range.
_AFF_TASTE, _AFF_FAVOURITE = 0.7, 0.4
#: Reaction thresholds on affinity plus noise: above LIKE -> like, below DISLIKE -> dislike.
_REACT_LIKE, _REACT_DISLIKE, _REACT_NOISE = 0.6, 0.2, 0.15
#: First event time of the synthetic log (a fixed date keeps the output deterministic).
_START = np.datetime64("2024-06-01T00:00:00", "us")
_US_PER_DAY = 86_400 * 1_000_000


def _grouped_key(groups: I64, weights: F64, n_groups: int) -> tuple[I64, F64]:
    """Sort members by group; return (order, key) with key in (g, g+1] cumulative in group g.

    ``order[searchsorted(key, g + u, 'right')]`` for ``u`` uniform in [0, 1) samples a
    member of group ``g`` with probability proportional to its weight: one vectorised
    draw from many different discrete distributions at once.
    """
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    w = weights[order]
    cum = np.cumsum(w)
    starts = np.searchsorted(g, np.arange(n_groups), side="left")
    ends = np.searchsorted(g, np.arange(n_groups), side="right")
    before = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0.0)
    total = np.where(ends > starts, cum[np.maximum(ends - 1, 0)] - before, 1.0)
    frac = (cum - before[g]) / total[g]
    frac[ends[ends > starts] - 1] = 1.0  # exact top of every group, against rounding
    return order.astype(np.int64), g.astype(np.float64) + frac


def _draw_grouped(order: I64, key: F64, group: I64, u: F64) -> I64:
    """Vectorised draw of one member of ``group[i]`` per query (see :func:`_grouped_key`)."""
    pos = np.searchsorted(key, group.astype(np.float64) + u, side="right")
    drawn: I64 = order[np.minimum(pos, len(order) - 1)]
    return drawn


def _ids(prefix: str, n: int) -> pa.Array:
    """``prefix0 .. prefix{n-1}`` as an Arrow string array (built in C++, not in Python)."""
    nums = pc.cast(pa.array(np.arange(n, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(pa.scalar(prefix), nums, "")


class _World:
    """The planted ground truth: catalogue, authors and user tastes."""

    def __init__(self, rng: np.random.Generator, users: int, videos: int) -> None:
        self.n_categories = int(min(len(_CATEGORY_NAMES), max(2, videos // _VIDEOS_PER_CATEGORY)))
        k = self.n_categories
        self.n_authors = int(max(k, videos // _VIDEOS_PER_AUTHOR))
        a = self.n_authors
        # Authors: the first k cover every category once, the rest pick one at random.
        self.author_home = np.concatenate([np.arange(k), rng.integers(0, k, size=a - k)]).astype(
            np.int64
        )
        author_weight = 1.0 / (np.arange(a) + 1.0) ** 0.8  # prolific authors are few
        rng.shuffle(author_weight)
        # Videos: the first min(a, videos) give every author one video, the rest are Zipf.
        first = np.arange(min(a, videos))
        rest = rng.choice(a, size=videos - len(first), p=author_weight / author_weight.sum())
        self.video_author = np.concatenate([first, rest]).astype(np.int64)
        home = self.author_home[self.video_author]
        other = rng.integers(0, k, size=videos)
        keep_home = rng.random(videos) < _P_HOME_CATEGORY
        keep_home[: len(first)] = True  # so that every category has a video
        self.video_category = np.where(keep_home, home, other).astype(np.int64)
        rank = rng.permutation(videos).astype(np.float64)
        self.popularity = 1.0 / (rank + _ZIPF_OFFSET) ** _ZIPF_EXPONENT
        self.popularity /= self.popularity.sum()
        self.duration = np.clip(
            np.round(rng.lognormal(math.log(_DURATION_MEDIAN_S), _DURATION_SIGMA, videos)),
            _DURATION_MIN_S,
            _DURATION_MAX_S,
        ).astype(np.int64)
        # Pools for vectorised draws.
        self.cat_order, self.cat_key = _grouped_key(self.video_category, self.popularity, k)
        self.auth_order, self.auth_key = _grouped_key(self.video_author, self.popularity, a)
        self.global_cdf = np.cumsum(self.popularity)
        self.global_cdf[-1] = 1.0
        author_pop = np.bincount(self.video_author, weights=self.popularity, minlength=a).astype(
            np.float64
        )
        self.home_order, self.home_key = _grouped_key(self.author_home, author_pop + 1e-12, k)
        # Users: sparse tastes (as a per-user CDF over categories), activity, favourites.
        taste = rng.gamma(_TASTE_CONCENTRATION, size=(users, k)).astype(np.float32) + 1e-6
        taste /= taste.sum(axis=1, keepdims=True)
        self.taste_max: F32 = taste.max(axis=1)
        self.taste_cdf: F32 = np.cumsum(taste, axis=1, out=taste)
        self.taste_cdf[:, -1] = 1.0
        activity = rng.lognormal(0.0, _ACTIVITY_SIGMA, users)
        self.activity_cdf = np.cumsum(activity) / activity.sum()
        self.activity_cdf[-1] = 1.0
        fav_cat = self.categories_of(
            np.repeat(np.arange(users), _FAVOURITE_AUTHORS), rng.random(users * _FAVOURITE_AUTHORS)
        )
        self.favourites = _draw_grouped(
            self.home_order, self.home_key, fav_cat, rng.random(len(fav_cat))
        ).reshape(users, _FAVOURITE_AUTHORS)

    def categories_of(self, users: I64, u: F64, shift: I64 | int = 0) -> I64:
        """Draw one category per query from that user's taste (rotated by ``shift``
        categories: drifting tastes)."""
        cdf = self.taste_cdf[users]
        below = (cdf < u[:, None].astype(np.float32)).sum(axis=1)
        cats: I64 = np.minimum(below, self.n_categories - 1).astype(np.int64)
        return (cats + shift) % self.n_categories

    def affinity(self, users: I64, videos: I64, shift: I64 | int = 0) -> F64:
        """Planted affinity in [0, 1]: relative taste for the category, plus a favourite bonus."""
        cat = (self.video_category[videos] - shift) % self.n_categories
        hi = self.taste_cdf[users, cat].astype(np.float64)
        lo = np.where(cat > 0, self.taste_cdf[users, np.maximum(cat - 1, 0)], 0.0)
        rel = (hi - lo) / self.taste_max[users]
        fav = (self.favourites[users] == self.video_author[videos][:, None]).any(axis=1)
        out: F64 = np.clip(_AFF_TASTE * rel + _AFF_FAVOURITE * fav, 0.0, 1.0)
        return out


def _views(
    world: _World,
    rng: np.random.Generator,
    n: int,
    t0_us: int,
    span_us: int,
    drift: tuple[int, int, float] | None = None,
) -> dict[str, Any]:
    """One chunk of view events (arrays aligned by row, sorted by time).

    ``drift`` is ``(start_us, period_us, rate)``: an event at time ``t`` sees every
    user's taste rotated by ``floor(rate * categories * (t - start) / period)``
    categories, so by the end of the period tastes have moved ``rate`` of the way
    round. Without it the draws (and the output for a seed) are unchanged.
    """
    shift: I64 | int = 0
    if drift is not None:
        ts_early = t0_us + np.sort(rng.integers(0, span_us, size=n))
        start, period, rate = drift
        shift = np.floor(rate * world.n_categories * (ts_early - start) / period).astype(np.int64)
    users = np.searchsorted(world.activity_cdf, rng.random(n), side="right")
    users = np.minimum(users, len(world.activity_cdf) - 1).astype(np.int64)
    mode = rng.random(n)
    videos = np.empty(n, dtype=np.int64)
    by_author = mode < _P_AUTHOR
    explore = (mode >= _P_AUTHOR) & (mode < _P_AUTHOR + _P_EXPLORE)
    by_taste = ~(by_author | explore)
    fav = world.favourites[users[by_author], rng.integers(0, _FAVOURITE_AUTHORS, by_author.sum())]
    videos[by_author] = _draw_grouped(world.auth_order, world.auth_key, fav, rng.random(len(fav)))
    videos[explore] = np.minimum(
        np.searchsorted(world.global_cdf, rng.random(explore.sum()), side="right"),
        len(world.global_cdf) - 1,
    )
    shift_taste = shift[by_taste] if isinstance(shift, np.ndarray) else shift
    cats = world.categories_of(users[by_taste], rng.random(by_taste.sum()), shift_taste)
    videos[by_taste] = _draw_grouped(world.cat_order, world.cat_key, cats, rng.random(len(cats)))
    # Repeated views: copy an earlier drawn (user, video) pair.
    rep = np.flatnonzero(rng.random(n) < _P_REPEAT)
    src = rng.integers(0, n, size=len(rep))
    users[rep], videos[rep] = users[src], videos[src]
    aff = world.affinity(users, videos, shift)
    z = _WATCH_SLOPE * (aff - _WATCH_MID) + rng.normal(0.0, _WATCH_NOISE, n)
    frac = _WATCH_MAX / (1.0 + np.exp(-z))
    dur = world.duration[videos]
    watch = np.maximum(np.round(frac * dur), 1).astype(np.int64)  # a view lasts >= 1 s
    # Rows are i.i.d. draws, so sorted times keep the time order independent of content.
    ts = t0_us + np.sort(rng.integers(0, span_us, size=n)) if drift is None else ts_early
    return {
        "users": users,
        "videos": videos,
        "watch": watch,
        "aff": aff,
        "ts": ts,
        "region": rng.integers(0, len(_REGIONS), n),
        "device": rng.integers(0, len(_DEVICES), n),
    }


def _reactions(rng: np.random.Generator, views: dict[str, Any]) -> dict[str, Any]:
    """Explicit reactions for a fraction of the views, implied by the planted affinity."""
    pick = np.flatnonzero(rng.random(len(views["users"])) < _P_REACT)
    score = views["aff"][pick] + rng.normal(0.0, _REACT_NOISE, len(pick))
    action = np.where(score > _REACT_LIKE, 0, np.where(score < _REACT_DISLIKE, 1, 2))
    # The reaction comes during or right after the view.
    delay_us = (views["watch"][pick] * rng.random(len(pick)) * 1_000_000).astype(np.int64)
    return {
        "users": views["users"][pick],
        "videos": views["videos"][pick],
        "action": action,
        "ts": views["ts"][pick] + delay_us,
    }


#: The Rutube log layout written here and by the dataset converters.
LOGS_SCHEMA = pa.schema(
    [
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
        ("viewer_uid", pa.string()),
        ("rutube_video_id", pa.string()),
        ("total_watchtime", pa.int64()),
        ("region", pa.string()),
        ("ua_device_type", pa.string()),
    ]
)
REACTIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("video_id", pa.string()),
        ("action", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
    ]
)


def synthesize(
    out: Path,
    *,
    users: int,
    videos: int,
    events: int,
    seed: int,
    days: int = 30,
    row_group_size: int = 500_000,
    progress: bool = True,
    drift: float = 0.0,
) -> dict[str, Any]:
    """Write ``logs.parquet``, ``video_stat.parquet`` and ``reactions.parquet`` into ``out``.

    Memory is bounded by ``row_group_size`` (the generation chunk) and the per-user
    taste table (about ``users * 32 * 4`` bytes), not by ``events``. Returns a summary:
    paths, row counts, the planted-structure parameters and the elapsed time.
    """
    if users < 1 or videos < 1 or events < 0 or days < 1 or row_group_size < 1 or drift < 0:
        raise ValueError(
            "users, videos, days and row_group_size must be >= 1, events and drift >= 0"
        )
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seq = np.random.SeedSequence(seed)
    world_seq, video_seq, *chunk_seqs = seq.spawn(2 + max(1, -(-events // row_group_size)))
    world = _World(np.random.default_rng(world_seq), users, videos)
    user_ids = _ids("u", users)
    video_ids = _ids("video_", videos)

    logs_path = out / "logs.parquet"
    reactions_path = out / "reactions.parquet"
    span_us = days * _US_PER_DAY
    n_chunks = len(chunk_seqs)
    t_start = int(_START.astype(np.int64))
    written = reactions_written = 0
    views_per_video = np.zeros(videos, dtype=np.int64)
    bar = tqdm(total=events, unit="rows", unit_scale=True, disable=not progress, desc="synth")
    with (
        pq.ParquetWriter(logs_path, LOGS_SCHEMA) as logs_w,
        pq.ParquetWriter(reactions_path, REACTIONS_SCHEMA) as react_w,
    ):
        for i, cseq in enumerate(chunk_seqs):
            n = min(row_group_size, events - written)
            if n <= 0:
                break
            rng = np.random.default_rng(cseq)
            # Chunk i covers the i-th slice of the period, so the log is time-ordered.
            t0 = t_start + span_us * i // n_chunks
            t1 = t_start + span_us * (i + 1) // n_chunks
            v = _views(world, rng, n, t0, t1 - t0, (t_start, span_us, drift) if drift else None)
            views_per_video += np.bincount(v["videos"], minlength=videos)
            logs_w.write_table(_logs_table(v, user_ids, video_ids), row_group_size=row_group_size)
            r = _reactions(rng, v)
            react_w.write_table(
                _reactions_table(r, user_ids, video_ids), row_group_size=row_group_size
            )
            written += n
            reactions_written += len(r["users"])
            bar.update(n)
    bar.close()

    videos_path = out / "video_stat.parquet"
    _write_video_stat(videos_path, world, video_ids, views_per_video, events, video_seq, t_start)
    return {
        "logs": str(logs_path),
        "videos": str(videos_path),
        "reactions": str(reactions_path),
        "users": users,
        "n_videos": videos,
        "events": written,
        "reactions_rows": reactions_written,
        "days": days,
        "seed": seed,
        "drift": drift,
        "row_group_size": row_group_size,
        "categories": world.n_categories,
        "authors": world.n_authors,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _logs_table(v: dict[str, Any], user_ids: pa.Array, video_ids: pa.Array) -> pa.Table:
    """One chunk of views in the Rutube log layout."""
    return pa.table(
        {
            "event_timestamp": pa.array(v["ts"], pa.timestamp("us", tz="UTC")),
            "viewer_uid": user_ids.take(pa.array(v["users"])),
            "rutube_video_id": video_ids.take(pa.array(v["videos"])),
            "total_watchtime": pa.array(v["watch"], pa.int64()),
            "region": pa.array(_REGIONS).take(pa.array(v["region"])),
            "ua_device_type": pa.array(_DEVICES).take(pa.array(v["device"])),
        },
        schema=LOGS_SCHEMA,
    )


def _reactions_table(r: dict[str, Any], user_ids: pa.Array, video_ids: pa.Array) -> pa.Table:
    """One chunk of reactions in the seed's layout."""
    actions = pa.array(["like", "dislike", "neutral"])
    return pa.table(
        {
            "user_id": user_ids.take(pa.array(r["users"])),
            "video_id": video_ids.take(pa.array(r["videos"])),
            "action": actions.take(pa.array(r["action"])),
            "ts": pa.array(r["ts"], pa.timestamp("us", tz="UTC")),
        },
        schema=REACTIONS_SCHEMA,
    )


def _write_video_stat(
    videos_path: Path,
    world: _World,
    video_ids: pa.Array,
    views_per_video: npt.NDArray[np.int64],
    events: int,
    video_seq: np.random.SeedSequence,
    t_start: int,
) -> None:
    """The video metadata: durations, categories, authors and site-wide counts."""
    videos = len(video_ids)
    vrng = np.random.default_rng(video_seq)
    # Yearly views: this log's views plus a popularity-driven history.
    year_views = views_per_video + vrng.poisson(world.popularity * max(events, 1) * 10)
    like_rate = vrng.beta(8.0, 2.0, videos)  # most videos are liked more than disliked
    reactions_total = vrng.binomial(year_views, 0.05)  # ~5% of viewers react on the site
    likes = vrng.binomial(reactions_total, like_rate)
    pub_us = t_start - vrng.integers(0, 365 * _US_PER_DAY, videos)  # published in the past year
    cat_names = pa.array(_CATEGORY_NAMES[: world.n_categories])
    categories = cat_names.take(pa.array(world.video_category))
    titles = pc.binary_join_element_wise(
        pa.scalar("Video "), pc.cast(pa.array(np.arange(videos)), pa.string()),
        pa.scalar(" about "), categories, "",
    )  # fmt: skip
    pq.write_table(
        pa.table(
            {
                "video_id": video_ids,
                "title": titles,
                "category": categories,
                "duration": pa.array(world.duration, pa.int64()),
                "author_id": pa.array(world.video_author, pa.int64()),
                "v_pub_datetime": pa.array(pub_us, pa.timestamp("us", tz="UTC")),
                "v_likes": pa.array(likes, pa.int64()),
                "v_dislikes": pa.array(reactions_total - likes, pa.int64()),
                "v_year_views": pa.array(year_views, pa.int64()),
            }
        ),
        videos_path,
    )
