"""The seed's feedback loop, made honest: simulated users answer from held-out ground truth.

The seed notebook's ``presicion_colab`` showed a user 10 videos, collected
like / dislike / neutral, folded the answers in, and repeated; precision was
likes over shown. Its simulated user answered at random (like:dislike:neutral =
4:1:2), so its precision was about 4/7 whatever the model did.

Here a simulated user stands for a real user of the data after the split:

* their **held-out truth** is what they did after the split: per video, their
  last reaction (like / dislike / neutral), or, for a view without a reaction,
  ``like`` when they watched at least ``positive_fraction`` of it and
  ``neutral`` otherwise;
* they **start** from their first ``initial`` post-split videos, rated as in the
  truth (those videos leave the truth, so the model is never asked to find
  them), under a fresh user id: the simulation is a cold start;
* each **round** shows the top ``k``; every shown video is answered with
  :func:`worker.notebook.answer_for`: the held-out reaction when there is one,
  else ``unknown_answer`` (``not_watched`` by default: an impression, which adds
  no signal but keeps the video out of later lists; or ``neutral``);
* with ``answers="random"`` the seed's 4:1:2 draw is used instead, which
  **measures nothing about the model**; the report says so.

Only users with at least ``min_likes`` held-out likes are simulated (a user
with none can only score 0 whatever is shown). Variants, on the same users:

* ``refold``: the live worker through Kafka, all users at once, one round
  trip per round;
* ``refold_inprocess``: the seed-compatible API
  (:func:`worker.notebook.simulate_session`), in-process;
* ``popularity``: the time-aware popularity ranking at the split.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from worker.core.engine import Recommender
from worker.core.wire import TOP_K, RatingEvent, Recommendations
from worker.eval.events import DISLIKE, LIKE, NEUTRAL, VIEW, command_line, iso_time
from worker.eval.live import LiveWorker, live_batch_ends
from worker.eval.prepare import Prepared, ReplayOptions, keep_model, prepare
from worker.eval.variants import Popularity, first_unseen
from worker.notebook import NOT_WATCHED, Session, answer_for, simulate_session

AnswerPolicy = Literal["truth", "random"]

#: Variant names, in report order.
REFOLD, REFOLD_INPROCESS, POPULARITY = "refold", "refold_inprocess", "popularity"
VARIANT_DESCRIPTIONS = {
    REFOLD: "refold's live worker through Kafka (exact fold-in after every round)",
    REFOLD_INPROCESS: "refold in-process through the seed-compatible API (simulate_session)",
    POPULARITY: "time-aware popularity at the split, minus what the user has seen",
}
RANDOM_NOTE = (
    "Answers are the seed's random draw (like:dislike:neutral = 4:1:2, whatever is shown): "
    "precision is about 4/7 for any recommender, so these numbers measure nothing about the "
    "model. Use --answers truth to measure it."
)
_ANSWER_OF_ACTION = {LIKE: "like", NEUTRAL: "neutral", DISLIKE: "dislike"}


@dataclass
class SimulateOptions:
    """Knobs of the simulation (see the module docstring)."""

    users: int = 100  # simulated users, sampled among those with enough held-out likes
    rounds: int = 15  # the seed's notebook ran 15 feedback rounds
    k: int = TOP_K
    initial: int = 3  # the seed's example started from three rated videos
    answers: AnswerPolicy = "truth"
    unknown_answer: str = NOT_WATCHED
    min_likes: int = 3  # fewer held-out likes make a user's precision mostly noise
    positive_fraction: float = 0.5
    bootstrap_servers: str | None = None
    live: bool = True
    in_process: bool = True
    seed: int = 0
    progress: bool = True
    log_path: Path | None = None
    timeout_s: float = 120.0


@dataclass
class SimUser:
    """One simulated user: a fresh id, initial ratings and held-out truth."""

    sim_id: str
    source_user: str
    initial: list[tuple[str, str]]
    truth: dict[str, str]


@dataclass
class RoundLog:
    """Per round: likes and shown videos summed over users, and how many users took part."""

    likes: list[int] = field(default_factory=list)
    shown: list[int] = field(default_factory=list)
    users: list[int] = field(default_factory=list)

    def add(self, r: int, answers: dict[str, str]) -> None:
        while len(self.likes) <= r:
            self.likes.append(0)
            self.shown.append(0)
            self.users.append(0)
        self.likes[r] += sum(1 for a in answers.values() if a == "like")
        self.shown[r] += len(answers)
        self.users[r] += 1

    def summary(self, held_out_likes: int) -> dict[str, Any]:
        shown = sum(self.shown)
        return {
            "recall": sum(self.likes) / held_out_likes if held_out_likes else None,
            "precision_per_round": [
                lk / sh if sh else 0.0 for lk, sh in zip(self.likes, self.shown, strict=True)
            ],
            "precision": sum(self.likes) / shown if shown else 0.0,
            "likes": sum(self.likes),
            "shown": shown,
            "users_per_round": list(self.users),
        }


def held_out_users(prep: Prepared, opts: SimulateOptions) -> list[SimUser]:
    """Pick the simulated users and build their initial ratings and truth (see module doc)."""
    table, split, end = prep.table, prep.split, prep.end
    frac = np.nan_to_num(table.fractions(prep.weights.default_duration_s), nan=0.0)
    per_user: dict[int, dict[int, list[float]]] = {}  # user -> video -> [first, frac, reaction]
    for i in range(split, end):
        u, v, a = int(table.user[i]), int(table.video[i]), int(table.action[i])
        unit = per_user.setdefault(u, {}).setdefault(v, [float(i), 0.0, -1.0])
        if a == VIEW:
            unit[1] = max(unit[1], float(frac[i]))
        else:
            unit[2] = float(a)  # the last reaction wins
    candidates: list[SimUser] = []
    for u, units in per_user.items():
        answers: list[tuple[str, str]] = []
        for v, (_, best, reaction) in sorted(units.items(), key=lambda kv: kv[1][0]):
            if reaction >= 0:
                ans = _ANSWER_OF_ACTION[int(reaction)]
            else:
                ans = "like" if best >= opts.positive_fraction else "neutral"
            answers.append((table.video_ids[v], ans))
        initial, rest = answers[: opts.initial], answers[opts.initial :]
        if sum(1 for _, a in rest if a == "like") < opts.min_likes:
            continue
        uid = table.user_ids[u]
        candidates.append(SimUser(f"sim-{uid}", uid, initial, dict(rest)))
    rng = np.random.default_rng(opts.seed)
    if len(candidates) > opts.users:
        picked = sorted(rng.choice(len(candidates), size=opts.users, replace=False).tolist())
        candidates = [candidates[i] for i in picked]
    return candidates


def _answer(video: str, user: SimUser, opts: SimulateOptions, rng: np.random.Generator) -> str:
    ans = answer_for(video, user.truth, opts.answers, rng)
    if ans == NOT_WATCHED and opts.answers == "truth":
        return opts.unknown_answer
    return ans


def _events(user: SimUser, answers: Sequence[tuple[str, str]], tag: str) -> list[RatingEvent]:
    """Answers as rating events; ``not_watched`` is a 0-second view (an impression)."""
    now = datetime.now(timezone.utc)
    out = []
    for j, (video, ans) in enumerate(answers):
        watched = ans == NOT_WATCHED
        out.append(
            RatingEvent(
                event_id=f"{tag}-{j}",
                user_id=user.sim_id,
                video_id=video,
                action="view" if watched else ans,  # type: ignore[arg-type]
                watch_seconds=0.0 if watched else None,
                ts=now,
            )
        )
    return out


@dataclass
class LiveRun:
    """What the live simulation showed, and what went through Kafka for the core check."""

    log: RoundLog
    shown: dict[str, list[list[str]]]
    sent: list[RatingEvent]  # in the order they were produced (one ratings partition)
    lists: list[Recommendations]  # every list the worker published, in arrival order


def simulate_live(prep: Prepared, users: Sequence[SimUser], opts: SimulateOptions) -> LiveRun:
    """All users at once through Kafka against a live worker; one round trip per round."""
    log = RoundLog()
    sent: list[RatingEvent] = []
    shown: dict[str, list[list[str]]] = {u.sim_id: [] for u in users}
    rngs = {u.sim_id: np.random.default_rng([opts.seed, i]) for i, u in enumerate(users)}
    with LiveWorker(
        model_dir=prep.model_dir,
        probe_video=prep.model.items.id_of(0),
        bootstrap_servers=opts.bootstrap_servers,
        log_path=opts.log_path,
    ) as live:
        # Event ids are short (user index, round, position): wire ids have a length limit.
        tag = {u.sim_id: f"s{i}" for i, u in enumerate(users)}
        outgoing = {u.sim_id: _events(u, u.initial, f"{tag[u.sim_id]}-r0") for u in users}
        active = [u for u in users if outgoing[u.sim_id]]
        for r in tqdm(range(opts.rounds), desc="simulate (kafka)", disable=not opts.progress):
            for u in active:
                for ev in outgoing[u.sim_id]:
                    live.send(ev)
                    sent.append(ev)
            live.flush()
            lists = live.wait_for_events(
                [outgoing[u.sim_id][-1].event_id for u in active], timeout_s=opts.timeout_s
            )
            still = []
            for u, lst in zip(active, lists, strict=True):
                videos = [it.video_id for it in lst.recs.items][: opts.k]
                if not videos:
                    continue
                answers = {v: _answer(v, u, opts, rngs[u.sim_id]) for v in videos}
                log.add(r, answers)
                shown[u.sim_id].append(videos)
                outgoing[u.sim_id] = _events(u, list(answers.items()), f"{tag[u.sim_id]}-r{r + 1}")
                still.append(u)
            active = still
        published = [lst.recs for lst in live.lists]
    return LiveRun(log, shown, sent, published)


def live_vs_core(
    prep: Prepared, sent: Sequence[RatingEvent], lists: Sequence[Recommendations]
) -> dict[str, int]:
    """Recompute every live list in-process, at the live worker's batch ends.

    The lists of one worker batch share their ``generated_at``; the batch ends at
    the last sent event any of them reflects (the ratings topic has one partition,
    so the worker read the events in the order they were sent). A fresh core
    engine applies the sent events in that order and, at each batch end, lists
    every user of the batch, as the worker did: a video without training
    interactions is refit whenever a list is made for a user who touched it, and
    those refits move the item gramian every fold-in uses, so only the same batch
    ends give the same lists. Returns how many lists were checked and how many
    are identical (the same videos in the same order).
    """
    index = {ev.event_id: j for j, ev in enumerate(sent)}
    ends = live_batch_ends(lists, index.get)
    at_end: dict[int, list[Recommendations]] = {}
    for recs in lists:
        if recs.generated_at in ends and any(e in index for e in recs.event_ids):
            at_end.setdefault(ends[recs.generated_at], []).append(recs)
    engine = Recommender(prep.model, weights=prep.weights)
    checked = identical = 0
    for j, ev in enumerate(sent):
        engine.apply(ev)
        batch = at_end.get(j)
        if not batch:
            continue
        for recs, ul in zip(batch, engine.recommend([r.user_id for r in batch]), strict=True):
            checked += 1
            identical += [it.video_id for it in recs.items] == list(ul.video_ids)
    return {"lists_checked": checked, "lists_identical": identical}


def simulate_in_process(
    prep: Prepared, users: Sequence[SimUser], opts: SimulateOptions
) -> tuple[RoundLog, dict[str, list[list[str]]]]:
    """Each user through the seed-compatible API, :func:`worker.notebook.simulate_session`."""
    session = Session(prep.model, weights=prep.weights, k=opts.k)
    log = RoundLog()
    shown: dict[str, list[list[str]]] = {}
    for i, u in enumerate(tqdm(users, desc="simulate (in-process)", disable=not opts.progress)):
        initial = [(v, a) for v, a in u.initial]
        truth = dict(u.truth)
        if opts.answers == "truth" and opts.unknown_answer != NOT_WATCHED:
            # answer_for says not_watched for a video outside the truth; this mapping
            # answers the configured default for those instead.
            truth = _DefaultTruth(truth, opts.unknown_answer)
        res = simulate_session(
            session,
            u.sim_id,
            truth,
            rounds=opts.rounds,
            k=opts.k,
            initial=initial,
            answer=opts.answers,
            seed=opts.seed * 1_000_003 + i,  # a distinct, reproducible stream per user
        )
        for r, answers in enumerate(res.answers):
            log.add(r, answers)
        shown[u.sim_id] = res.shown
        session.reset(u.sim_id)
    return log, shown


class _DefaultTruth(dict[str, str]):
    """A truth mapping that answers ``default`` for any video it does not hold."""

    def __init__(self, data: dict[str, str], default: str) -> None:
        super().__init__(data)
        self.default = default

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key, self.default)


def simulate_popularity(
    prep: Prepared, users: Sequence[SimUser], opts: SimulateOptions
) -> RoundLog:
    """The same users against the time-aware popularity ranking at the split."""
    table, split = prep.table, prep.split
    pop = Popularity(table.n_videos, t0_us=int(table.ts[split]), half_life_us=prep.half_life_us)
    changes = table.positive_changes(
        opts.positive_fraction, prep.weights.default_duration_s, 0, split
    )
    pop.add_changes(table, changes, split)
    pop.refresh()
    code_of = {v: i for i, v in enumerate(table.video_ids)}
    log = RoundLog()
    for i, u in enumerate(users):
        rng = np.random.default_rng([opts.seed, i])
        seen = {code_of[v] for v, _ in u.initial if v in code_of}
        for r in range(opts.rounds):
            videos = [table.video_ids[c] for c in first_unseen(pop.order, seen, opts.k)]
            if not videos:
                break
            answers = {v: _answer(v, u, opts, rng) for v in videos}
            log.add(r, answers)
            seen.update(code_of[v] for v in videos)
    return log


def run_simulation(prep: Prepared, opts: SimulateOptions) -> dict[str, Any]:
    """Every variant on the same simulated users; a JSON-ready result."""
    t0 = time.monotonic()
    users = held_out_users(prep, opts)
    held_likes = sum(1 for u in users for a in u.truth.values() if a == "like")
    variants: dict[str, dict[str, Any]] = {}
    checks: dict[str, Any] = {}
    timings: dict[str, float] = {"select_s": time.monotonic() - t0}
    live_shown: dict[str, list[list[str]]] | None = None
    if users and opts.live:
        t0 = time.monotonic()
        run = simulate_live(prep, users, opts)
        live_shown = run.shown
        variants[REFOLD] = run.log.summary(held_likes)
        timings["live_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        core = live_vs_core(prep, run.sent, run.lists)
        checks["live_vs_core_lists_checked"] = core["lists_checked"]
        checks["live_vs_core_identical"] = (
            core["lists_identical"] / core["lists_checked"] if core["lists_checked"] else None
        )
        timings["core_check_s"] = time.monotonic() - t0
    if users and (opts.in_process or not opts.live):
        t0 = time.monotonic()
        ip_log, ip_shown = simulate_in_process(prep, users, opts)
        variants[REFOLD_INPROCESS if opts.live else REFOLD] = ip_log.summary(held_likes)
        timings["in_process_s"] = time.monotonic() - t0
        if live_shown is not None and opts.answers == "truth":
            same = [
                a == b
                for u in users
                for a, b in zip(live_shown[u.sim_id], ip_shown[u.sim_id], strict=False)
            ]
            checks["live_vs_inprocess_identical_rounds"] = sum(same) / len(same) if same else None
    if users:
        t0 = time.monotonic()
        variants[POPULARITY] = simulate_popularity(prep, users, opts).summary(held_likes)
        timings["popularity_s"] = time.monotonic() - t0
    for name, row in variants.items():
        row["description"] = VARIANT_DESCRIPTIONS[name]
    out: dict[str, Any] = {
        "answers": opts.answers,
        "rounds": opts.rounds,
        "k": opts.k,
        "initial_ratings": opts.initial,
        "unknown_answer": opts.unknown_answer,
        "min_held_out_likes": opts.min_likes,
        "users": len(users),
        "users_requested": opts.users,
        "held_out_likes": held_likes,
        "held_out_likes_per_user_median": (
            float(np.median([sum(a == "like" for a in u.truth.values()) for u in users]))
            if users
            else None
        ),
        "variants": variants,
        "checks": checks,
        "timings_s": timings,
        "definitions": {
            "precision": "likes / shown videos, summed over users (per round, or over all "
            "rounds): the seed's presicion_colab. It is bounded by the held-out likes: a user "
            f"with L of them can reach at most L / ({opts.rounds} x {opts.k}) over all rounds.",
            "recall": "likes over all rounds / held-out likes of the simulated users: the share "
            "of what they went on to like that the loop surfaced.",
            "truth": "per video, the user's last post-split reaction; a post-split view "
            "without a reaction is a like when it covered at least "
            f"{opts.positive_fraction:g} of the video, else neutral. A shown video outside "
            f"the truth is answered '{opts.unknown_answer}'.",
            "live_vs_core_identical": "share of the live worker's lists that the core "
            "engine, fed the same events in the same order in-process, lists identically "
            "when asked at the live worker's batch ends (it should be 1: Kafka adds "
            "transport, not different maths).",
            "live_vs_inprocess_identical_rounds": "share of rounds in which refold_inprocess "
            "showed a user what the live worker showed. refold_inprocess runs one user at a "
            "time, the live worker all users in each round, so videos without training "
            "interactions are refit at other moments (each refit moves the item gramian "
            "every fold-in uses); below 1 when such videos are rated.",
            "users": f"users with at least {opts.min_likes} held-out likes after their first "
            f"{opts.initial} post-split videos (the initial ratings), under fresh ids.",
        },
    }
    if opts.answers == "random":
        out["note"] = RANDOM_NOTE
    if not users:
        out["note"] = "no user has enough held-out likes after the split; nothing simulated"
    return out


def run_simulate_command(data: ReplayOptions, opts: SimulateOptions) -> dict[str, Any]:
    """``refold simulate``: prepare data and model, simulate, write the report in ``data.out``."""
    import tempfile

    from worker.eval.report import write_simulation_report

    t_begin = time.monotonic()
    data.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data.out, prefix=".work-") as tmp:
        prep = prepare(data, Path(tmp))
        sim = run_simulation(prep, opts)
        model_path = keep_model(prep, data.out) if data.keep_model else None
    table = prep.table
    report: dict[str, Any] = {
        "kind": "simulation",
        "command": data.command or command_line(),
        "created_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        "data": {
            **table.summary,
            "split_index": prep.split,
            "split_time": iso_time(int(table.ts[prep.split])),
            "train_events": prep.split,
            "held_out_events": prep.end - prep.split,
        },
        "model": {
            "version": prep.model.version,
            "trained_here": prep.trained,
            "path": model_path if prep.trained else str(prep.model_dir),
            "users": prep.model.n_users,
            "videos": prep.model.n_items,
            "factors": prep.model.params.factors,
        },
        "simulation": sim,
        "timings_s": {**prep.timings, "total_s": time.monotonic() - t_begin},
    }
    write_simulation_report(report, data.out)
    return report
