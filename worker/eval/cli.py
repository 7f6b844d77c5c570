"""CLI commands of the evaluation package: ``replay``, ``simulate``, ``convert`` and ``tune``.

:func:`worker.cli.build_parser` calls :func:`add_commands` with its subparsers.
Each command parses options, builds an options object and calls one function.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: Default replay cap: the first 100,000 events after the split (two to three minutes of
#: Kafka replay on two cores at the default window); 0 replays them all.
DEFAULT_MAX_EVENTS = 100_000


def _add_data(p: argparse.ArgumentParser) -> None:
    """Options shared by replay and simulate: data, split, model, output."""
    p.add_argument("--logs", nargs="+", required=True, help="watch logs: files, dirs or globs")
    p.add_argument("--videos", required=True, help="video metadata Parquet (video_stat)")
    p.add_argument("--reactions", help="reactions Parquet (user_id, video_id, action, ts)")
    split = p.add_mutually_exclusive_group(required=True)
    split.add_argument("--split-at", help="split time: ISO-8601 (UTC if no offset) or epoch s")
    split.add_argument(
        "--split-frac", type=float, help="split at this fraction of the events, by time"
    )
    p.add_argument("--report", required=True, type=Path, help="directory for the report")
    p.add_argument(
        "--model", type=Path, help="use this model instead of training one before the split"
    )
    p.add_argument("--bootstrap-servers", help="HOST:PORT of a broker (default: embedded Tansu)")
    p.add_argument(
        "--no-kafka",
        action="store_true",
        help="in-process only (no broker, no worker); fold-in is then the core engine",
    )
    p.add_argument(
        "--max-events",
        type=int,
        default=DEFAULT_MAX_EVENTS,
        help=f"replay at most this many events after the split (default {DEFAULT_MAX_EVENTS}; "
        "0: all)",
    )
    p.add_argument(
        "--positive-fraction",
        type=float,
        default=0.5,
        help="a view without a reaction is positive from this watched fraction (0.5)",
    )
    p.add_argument(
        "--duration-unit", choices=["auto", "s", "ms"], default="auto", help="video durations"
    )
    p.add_argument("--columns", help="column mapping as JSON text or a JSON file (as bootstrap)")
    p.add_argument("--factors", type=int, help="ALS factors of the bootstrap model")
    p.add_argument("--iterations", type=int, help="ALS iterations of the bootstrap model")
    p.add_argument("--regularization", type=float, help="ALS regularization")
    p.add_argument("--alpha", type=float, help="ALS confidence scale")
    p.add_argument(
        "--params",
        help="JSON file of ALS params and event weights (as bootstrap --params); the flags "
        "above override it",
    )
    p.add_argument("--keep-model", action="store_true", help="keep the trained model in DIR/model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_simulation(p: argparse.ArgumentParser, *, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}rounds", type=int, default=15, help="feedback rounds (15)")
    p.add_argument(f"--{prefix}initial", type=int, default=3, help="initial ratings per user (3)")
    p.add_argument(
        f"--{prefix}answers",
        choices=["truth", "random"],
        default="truth",
        help="truth: held-out ground truth; random: the seed's 4:1:2 draw (measures nothing)",
    )
    p.add_argument(
        f"--{prefix}unknown-answer",
        choices=["not_watched", "neutral"],
        default="not_watched",
        help="answer for a shown video outside the held-out truth",
    )
    p.add_argument(
        f"--{prefix}min-likes", type=int, default=3, help="held-out likes a simulated user needs"
    )


def _data_options(args: argparse.Namespace) -> Any:
    from worker.eval.events import command_line
    from worker.eval.prepare import ReplayOptions

    mapping = None
    if args.columns:
        from worker.data.layout import ColumnMapping

        text = Path(args.columns).read_text() if Path(args.columns).is_file() else args.columns
        mapping = ColumnMapping.model_validate_json(text)
    params = weights = None
    if args.params:
        from worker.train import read_params

        params, weights = read_params(args.params)
    return ReplayOptions(
        params=params,
        weights=weights,
        columns=mapping,
        logs=list(args.logs),
        videos=args.videos,
        reactions=args.reactions,
        out=args.report,
        split_at=args.split_at,
        split_frac=args.split_frac,
        model=args.model,
        bootstrap_servers=args.bootstrap_servers,
        live=not args.no_kafka,
        max_events=args.max_events,
        positive_fraction=args.positive_fraction,
        duration_unit=args.duration_unit,
        factors=args.factors,
        iterations=args.iterations,
        regularization=args.regularization,
        alpha=args.alpha,
        keep_model=args.keep_model,
        seed=args.seed,
        progress=not args.quiet,
        command=command_line(),
    )


def _simulate_options(args: argparse.Namespace, users: int, prefix: str = "") -> Any:
    from worker.eval.simulate import SimulateOptions

    def get(name: str) -> Any:
        return getattr(args, prefix.replace("-", "_") + name)

    return SimulateOptions(
        users=users,
        rounds=get("rounds"),
        initial=get("initial"),
        answers=get("answers"),
        unknown_answer=get("unknown_answer"),
        min_likes=get("min_likes"),
        positive_fraction=args.positive_fraction,
        bootstrap_servers=args.bootstrap_servers,
        live=not args.no_kafka,
        seed=args.seed,
        progress=not args.quiet,
        log_path=args.report / "worker-simulate.log",
    )


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, row in (report.get("variants") or {}).items():
        out[name] = {
            "ndcg_at_10": row.get("ndcg_at_10"),
            "precision_at_10": row.get("precision_at_10"),
        }
    if "foldin_vs_retrain" in report:
        out["foldin_ndcg_fraction_of_retrain"] = report["foldin_vs_retrain"]["ndcg_fraction"]
    if "latency_ms" in report:
        out["latency_ms"] = {k: report["latency_ms"][k] for k in ("p50", "p95", "p99")}
    sim = report.get("simulation")
    if sim:
        out["simulation_precision"] = {n: r["precision"] for n, r in sim["variants"].items()}
    return out


def cmd_replay(args: argparse.Namespace) -> int:
    from worker.eval.replay import run_replay

    opts = _data_options(args)
    opts.horizon_events = args.horizon_events
    opts.horizon_seconds = args.horizon_seconds
    opts.retrain_every = args.retrain_every
    opts.popularity_half_life = args.popularity_half_life
    opts.max_in_flight = args.max_in_flight
    opts.rate = args.rate
    opts.batch = args.batch
    opts.foldin_inprocess = not args.no_inprocess_check
    opts.check_every = args.check_every
    opts.durable = args.durable
    opts.workers = args.workers
    opts.partitions = args.partitions
    opts.threads = args.threads
    if args.simulate_users > 0:
        opts.simulation = _simulate_options(args, args.simulate_users, prefix="sim-")
    report = run_replay(opts)
    print(json.dumps({"report": str(args.report), **_summary(report)}, default=str))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from worker.eval.simulate import run_simulate_command

    data = _data_options(args)
    report = run_simulate_command(data, _simulate_options(args, args.users))
    print(json.dumps({"report": str(args.report), **_summary(report)}, default=str))
    return 0


def cmd_convert_movielens(args: argparse.Namespace) -> int:
    from worker.eval.convert import convert_movielens

    summary = convert_movielens(Path(args.path), Path(args.out))
    print(json.dumps(summary, default=str))
    return 0


def cmd_convert_interactions(args: argparse.Namespace) -> int:
    from worker.errors import DataError
    from worker.eval.convert import convert_interactions
    from worker.eval.event_map import UnknownEventTypeError, parse_event_map

    event_map = parse_event_map(args.event_map) if args.event_map else None
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    try:
        summary = convert_interactions(
            Path(args.path),
            Path(args.out),
            user_col=args.user,
            item_col=args.item,
            time_col=args.time,
            value_col=args.value,
            category_col=args.category,
            event_map=event_map,
            names=names,
        )
    except UnknownEventTypeError as exc:
        example = ",".join(f"{t}=0.5" for t in exc.types[:3])
        raise DataError(
            f"{args.path}: unknown event types in --value {args.value!r}: {exc.types[:10]}; "
            f"say what each means with --event-map TYPE=FRACTION[:REACTION],... "
            f"(for example --event-map {example}; REACTION is like, neutral or dislike) "
            "or --event-map @map.json"
        ) from None
    print(json.dumps(summary, default=str))
    return 0


def add_commands(sub: Any) -> None:
    """Register ``replay``, ``simulate`` and ``convert`` on the ``refold`` subparsers."""
    p = sub.add_parser(
        "replay",
        help="prequential replay through Kafka against a live worker, with baselines and a report",
    )
    _add_data(p)
    p.add_argument(
        "--horizon-events",
        type=int,
        default=20,
        help="relevant = liked among the user's next N new videos (20)",
    )
    p.add_argument(
        "--horizon-seconds", type=float, help="and only those first met within this many seconds"
    )
    p.add_argument(
        "--retrain-every",
        type=float,
        default=0.1,
        help="period of the retrain baselines: a fraction of the replay (<1) or a number of "
        "events (default 0.1); 0 = never, so retrain equals fold-in and retrain_nofoldin "
        "equals static",
    )
    p.add_argument(
        "--popularity-half-life",
        type=float,
        help="seconds (default: a tenth of the replay's time span)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=50,
        help="events sent but not yet reflected by a list (50)",
    )
    p.add_argument("--rate", type=float, default=0.0, help="events per second; 0 = no pacing")
    p.add_argument(
        "--batch",
        type=int,
        default=200,
        help="with --no-kafka: events per simulated worker poll (200)",
    )
    p.add_argument(
        "--no-inprocess-check",
        action="store_true",
        help="skip the check of live lists against the in-process engine",
    )
    p.add_argument(
        "--check-every",
        type=int,
        default=10,
        help="check every n-th live list against the in-process engine (10)",
    )
    p.add_argument("--durable", action="store_true", help="run the worker with its changelog")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes in one consumer group (1); events are sent once the group is "
        "stable, every worker owning a partition",
    )
    p.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="partitions of the replay's topics (default: one per worker)",
    )
    p.add_argument("--threads", type=int, default=0, help="ALS threads of the retrains (0: all)")
    p.add_argument(
        "--simulate-users",
        type=int,
        default=0,
        help="also run the feedback-loop simulation for this many users",
    )
    _add_simulation(p, prefix="sim-")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "simulate",
        help="feedback-loop simulation (the seed's precision over rounds) from held-out truth",
    )
    _add_data(p)
    p.add_argument("--users", type=int, default=200, help="simulated users (200)")
    _add_simulation(p)
    p.set_defaults(func=cmd_simulate)
    _add_convert(sub)
    _add_tune(sub)


def _fractions(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _add_tune(sub: Any) -> None:
    """``refold tune``: the hyper-parameter search (worker.eval.tune)."""
    p = sub.add_parser(
        "tune", help="hyper-parameter search scored by prequential NDCG@10 before the test split"
    )
    p.add_argument("--logs", nargs="+", required=True, help="watch logs: files, dirs or globs")
    p.add_argument("--videos", required=True, help="video metadata Parquet (video_stat)")
    p.add_argument("--reactions", help="reactions Parquet (user_id, video_id, action, ts)")
    p.add_argument("--out", required=True, type=Path, help="study, best.json and report")
    p.add_argument("--trials", type=int, default=20, help="complete trials to reach (20)")
    p.add_argument("--test-split", type=float, default=0.8, help="test split fraction (0.8)")
    p.add_argument(
        "--validation",
        type=_fractions,
        default=(0.5, 0.6, 0.7),
        help="validation split fractions, each scored up to the next (0.5,0.6,0.7)",
    )
    p.add_argument(
        "--seeds", type=_fractions, default=(0.0,), help="seeds of the ALS initial factors (0)"
    )
    p.add_argument(
        "--max-events",
        type=int,
        default=0,
        help="score at most this many events per window (0: all)",
    )
    p.add_argument("--batch", type=int, default=200, help="events per worker poll (200)")
    p.add_argument("--positive-fraction", type=float, default=0.5)
    p.add_argument(
        "--duration-unit", choices=["auto", "s", "ms"], default="auto", help="video durations"
    )
    p.add_argument("--threads", type=int, default=0, help="implicit's threads (0: every core)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and intervals")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from worker.eval.events import command_line
    from worker.eval.tune import TuneOptions, run_tune

    report = run_tune(
        TuneOptions(
            logs=list(args.logs),
            videos=args.videos,
            reactions=args.reactions,
            out=args.out,
            trials=args.trials,
            test_split=args.test_split,
            validation=args.validation,
            seeds=tuple(int(s) for s in args.seeds),
            max_events=args.max_events,
            batch=args.batch,
            positive_fraction=args.positive_fraction,
            duration_unit=args.duration_unit,
            threads=args.threads,
            seed=args.seed,
            progress=not args.quiet,
            command=command_line(),
        )
    )
    test = report["test"]
    summary = {name: test[name]["ndcg_at_10"] for name in ("best", "defaults", "popularity")}
    print(json.dumps({"out": str(args.out), "best": str(args.out / "best.json"), **summary}))
    return 0


def _add_convert(sub: Any) -> None:
    """``refold convert movielens|interactions``."""
    p = sub.add_parser("convert", help="convert public datasets to the Rutube layout")
    conv = p.add_subparsers(dest="source", required=True)
    c = conv.add_parser("movielens", help="MovieLens ratings (ml-latest-small, ml-1m, ml-25m...)")
    c.add_argument("path", help="the unpacked MovieLens directory")
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_convert_movielens)
    c = conv.add_parser("interactions", help="any CSV/Parquet with user, item and time columns")
    c.add_argument("path")
    c.add_argument("--out", required=True)
    c.add_argument("--user", required=True, help="user id column")
    c.add_argument("--item", required=True, help="item id column")
    c.add_argument("--time", required=True, help="timestamp column")
    c.add_argument("--value", help="value or event-type column (optional)")
    c.add_argument("--category", help="item category column (optional)")
    c.add_argument(
        "--names",
        help="comma-separated column names of a CSV without a header row "
        "(Taobao UserBehavior.csv: user,item,category,behavior,time)",
    )
    c.add_argument(
        "--event-map",
        metavar="TYPE=FRACTION[:REACTION],...|@FILE.json",
        help="what each event type of --value means: the watched fraction in [0, 1] and an "
        "optional reaction (like, neutral, dislike); extends the built-in map, which knows "
        "Taobao (pv, cart, fav, buy) and RetailRocket (view, addtocart, transaction). "
        '@FILE.json: {"TYPE": [FRACTION, REACTION or null], ...}',
    )
    c.set_defaults(func=cmd_convert_interactions)
