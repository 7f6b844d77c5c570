"""The ``refold`` command line: parse options, set up logging, call one function."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("refold")

# A worker heartbeat older than this fails the health probe; the loop beats at
# least every poll timeout (0.1 s) plus one batch.
_HEALTH_MAX_AGE_S = 30.0


def _kafka(args: argparse.Namespace) -> Any:
    from worker.config import KafkaSettings

    over = {}
    if getattr(args, "bootstrap_servers", None):
        over["bootstrap_servers"] = args.bootstrap_servers
    return KafkaSettings(**over)


def _topics(args: argparse.Namespace) -> Any:
    from worker.config import TopicSettings

    over = {
        name: getattr(args, f"topic_{name}")
        for name in TopicSettings.model_fields
        if getattr(args, f"topic_{name}", None)
    }
    return TopicSettings(**over)


def _add_kafka(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bootstrap-servers", help="HOST:PORT of the brokers (env REFOLD_BOOTSTRAP_SERVERS)"
    )
    from worker.config import TopicSettings

    for name, field in TopicSettings.model_fields.items():
        p.add_argument(
            f"--topic-{name}", help=f"{field.description} (env REFOLD_TOPIC_{name.upper()})"
        )


# ---- commands -----------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace) -> int:
    from worker.brokers.tansu import TansuBroker

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: done.set())
    with TansuBroker(port=args.port) as broker:
        print(f"ready {broker.bootstrap_servers}", flush=True)
        while not done.wait(0.5):
            pass
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    # Before the heavy imports: a stop signal during start-up is honoured, not fatal.
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stopping.set())
    from worker.config import WorkerSettings

    over: dict[str, Any] = {}
    for name in ("model", "group", "metrics_port", "metrics_host", "state_dir"):
        value = getattr(args, name, None)
        if value is not None:
            over[name] = value
    if args.no_durable:
        over["durable"] = False
    settings = WorkerSettings(**over)
    if args.check:
        return _health_check(settings.metrics_host, settings.metrics_port)
    from worker.loop import Worker
    from worker.storage import load_model

    model = load_model(settings.model)
    worker = Worker(
        settings=settings, kafka=_kafka(args), topics=_topics(args), model=model, stopping=stopping
    )
    worker.install_signal_handlers()
    return worker.run()


def _health_check(host: str, port: int) -> int:
    if not port:
        print("unhealthy: --metrics-port is not set", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    for line in text.splitlines():
        if line.startswith("refold_loop_heartbeat_timestamp_seconds "):
            age = time.time() - float(line.split()[1])
            if age <= _HEALTH_MAX_AGE_S:
                print(f"healthy: loop beat {age:.1f}s ago")
                return 0
            print(f"unhealthy: loop last beat {age:.1f}s ago", file=sys.stderr)
            return 1
    print("unhealthy: no heartbeat metric", file=sys.stderr)
    return 1


def cmd_send(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from worker.core.wire import RatingEvent
    from worker.producer import RatingProducer

    with RatingProducer(kafka=_kafka(args), topics=_topics(args)) as producer:
        if args.file:
            sent = 0
            for lineno, line in enumerate(Path(args.file).read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    producer.send(RatingEvent.model_validate_json(line))
                except ValidationError as exc:
                    print(f"{args.file}:{lineno}: invalid event: {exc}", file=sys.stderr)
                    return 1
                sent += 1
            producer.flush()
            print(json.dumps({"sent": sent}))
            return 0
        if not (args.user and args.video and args.action):
            print("refold send: give --user, --video and --action, or --file", file=sys.stderr)
            return 2
        try:
            event = producer.rate(
                args.user,
                args.video,
                args.action,
                watch_seconds=args.watch_seconds,
                event_id=args.event_id,
            )
        except ValidationError as exc:
            print(f"invalid event: {exc}", file=sys.stderr)
            return 1
        producer.flush()
        print(event.model_dump_json())
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from worker.kafkaio import open_topic_reader, poll_batch

    topics = _topics(args)
    topic = args.topic or topics.recommendations
    deadline = time.monotonic() + args.timeout if args.timeout else None
    reader_conf: dict[str, Any] = {"fetch.wait.max.ms": 50}
    consumer = open_topic_reader(
        _kafka(args), topic, deadline_s=args.timeout or None, **reader_conf
    )
    if consumer is None:
        return 1  # the topic did not appear in time
    try:
        printed = 0
        want = args.user.encode() if args.user else None
        while deadline is None or time.monotonic() < deadline:
            for r in poll_batch(consumer, 500, 0.2):
                if want is not None and r.key() != want:
                    continue
                print(json.dumps(_tail_doc(r)), flush=True)
                printed += 1
                if args.max_messages and printed >= args.max_messages:
                    return 0
        return 0 if printed and not args.max_messages else 1
    finally:
        consumer.close()


def _tail_doc(r: Any) -> Any:
    """A list prints as itself; a record with headers (a dead letter) prints in an envelope."""
    raw, key, headers = r.value(), r.key(), r.headers()
    try:
        value: Any = json.loads(raw)
    except (TypeError, ValueError):
        value = raw.decode("utf-8", "backslashreplace") if raw is not None else None
    if not headers:
        return value
    return {
        "topic": r.topic(),
        "partition": r.partition(),
        "offset": r.offset(),
        "key": key.decode("utf-8", "backslashreplace") if key is not None else None,
        "headers": {k: (v or b"").decode("utf-8", "backslashreplace") for k, v in headers},
        "value": value,
    }


def cmd_swap(args: argparse.Namespace) -> int:
    from worker.kafkaio import announce_model

    doc = announce_model(_kafka(args), _topics(args).control, args.model)
    print(json.dumps(doc))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from worker.data.synth import synthesize

    summary = synthesize(
        Path(args.out),
        users=args.users,
        videos=args.videos,
        events=args.events,
        seed=args.seed,
        days=args.days,
        progress=not args.quiet,
        drift=args.drift,
    )
    print(json.dumps(summary, default=str))
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from worker.data.layout import ColumnMapping
    from worker.train import bootstrap

    mapping = None
    if args.columns:
        text = Path(args.columns).read_text() if Path(args.columns).is_file() else args.columns
        mapping = ColumnMapping.model_validate_json(text)
    kw: dict[str, Any] = {}
    flags = {
        name: getattr(args, name)
        for name in ("factors", "iterations", "regularization", "alpha")
        if getattr(args, name) is not None
    }
    if args.params:
        from dataclasses import replace

        from worker.train import read_params

        params, weights = read_params(args.params)
        kw["params"] = replace(params, **flags)  # a flag overrides the file
        kw["weights"] = weights
    else:
        kw.update(flags)
    model = bootstrap(
        args.logs,
        args.videos,
        Path(args.out),
        reactions=args.reactions,
        batch_size=args.batch_size,
        threads=args.threads,
        gpu=args.gpu,
        mapping=mapping,
        duration_unit=args.duration_unit,
        version=args.model_version,
        progress=not args.quiet,
        **kw,
    )
    print(
        json.dumps(
            {"model": str(args.out), "version": model.version, **model.manifest.get("counts", {})}
        )
    )
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stopping.set())
    from worker.core.retrain import parse_duration
    from worker.retrain import RetrainOptions, run

    opts = RetrainOptions(
        logs=list(args.logs),
        videos=args.videos,
        reactions=args.reactions,
        archive=Path(args.archive),
        models=Path(args.models),
        since=args.since,
        current=Path(args.current) if args.current else None,
        params=args.params,
        keep=args.keep,
        tolerance=args.tolerance,
        holdout=args.holdout,
        metrics_file=Path(args.metrics_file) if args.metrics_file else None,
        threads=args.threads,
        corrupt_candidate=args.test_corrupt_candidate,
    )
    every = parse_duration(args.every) if args.every else None
    return run(opts, _kafka(args), _topics(args).control, every, stopping)


def cmd_archive(args: argparse.Namespace) -> int:
    # First: a stop signal during start-up is honoured, not fatal.
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stopping.set())
    from worker.config import ArchiveSettings

    over = {
        name: getattr(args, name)
        for name in ArchiveSettings.model_fields
        if getattr(args, name, None) is not None
    }
    settings = ArchiveSettings(**over)
    if args.archive_command == "summary":
        from worker.archive import summary

        print(json.dumps(summary(settings.out), indent=2))
        return 0
    from worker.archive import ArchiveRunner
    from worker.config import WorkerSettings

    runner = ArchiveRunner(
        settings=settings,
        worker=WorkerSettings(),
        kafka=_kafka(args),
        topics=_topics(args),
        stopping=stopping,
    )
    return runner.run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refold", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run the embedded Tansu broker on 127.0.0.1")
    p.add_argument("--port", type=int, default=9092)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("worker", help="run a worker (a consumer group member)")
    _add_kafka(p)
    p.add_argument("--model", type=Path, help="model directory (env REFOLD_MODEL)")
    p.add_argument("--group", help="consumer group (env REFOLD_GROUP)")
    p.add_argument("--metrics-port", type=int, help="port of /metrics (env REFOLD_METRICS_PORT)")
    p.add_argument("--metrics-host", help="bind address of /metrics (default 127.0.0.1)")
    p.add_argument("--state-dir", type=Path, help="local snapshot dir (env REFOLD_STATE_DIR)")
    p.add_argument(
        "--no-durable", action="store_true", help="no changelog (state is lost on crash)"
    )
    p.add_argument("--check", action="store_true", help="health probe of a running worker")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("send", help="send rating events")
    _add_kafka(p)
    p.add_argument("--user")
    p.add_argument("--video")
    p.add_argument("--action", choices=["like", "dislike", "neutral", "view"])
    p.add_argument("--watch-seconds", type=float)
    p.add_argument("--event-id")
    p.add_argument("--file", help="JSON lines of rating events")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("tail", help="print recommendation lists, one JSON object per line")
    _add_kafka(p)
    p.add_argument("--user")
    p.add_argument("--topic", help="topic to print (default: the recommendations topic)")
    p.add_argument("--max-messages", type=int, default=0)
    p.add_argument("--timeout", type=float, default=0.0, help="seconds; 0 waits forever")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("swap", help="announce a new model version to running workers")
    _add_kafka(p)
    p.add_argument("--model", required=True)
    p.set_defaults(func=cmd_swap)

    p = sub.add_parser("synth", help="synthesize a Rutube-style dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--videos", type=int, default=5_000)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--days", type=int, default=30)
    p.add_argument(
        "--drift",
        type=float,
        default=0.0,
        help="drifting tastes: the share of the way round the categories that every "
        "user's taste rotates over the period (0: fixed tastes)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("bootstrap", help="train the base model from Parquet logs")
    p.add_argument("--logs", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--videos", required=True)
    p.add_argument("--reactions")
    p.add_argument("--out", required=True)
    p.add_argument("--factors", type=int)
    p.add_argument("--iterations", type=int)
    p.add_argument("--regularization", type=float)
    p.add_argument("--alpha", type=float)
    p.add_argument(
        "--params",
        help="JSON file of ALS params and optional event weights (refold tune's best.json); "
        "--factors/--iterations/--regularization/--alpha override it",
    )
    p.add_argument("--batch-size", type=int, default=1_000_000)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--gpu", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--columns", help="column mapping as JSON text or a JSON file")
    p.add_argument("--duration-unit", choices=["auto", "s", "ms"], default="auto")
    p.add_argument("--model-version", help="version string (default: time-based)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bootstrap)

    _add_retrain(sub)
    _add_archive(sub)
    _add_eval_commands(sub)
    return parser


def _add_archive(sub: Any) -> None:
    def common(p: argparse.ArgumentParser, **kw: Any) -> None:
        p.add_argument("--out", type=Path, help="archive directory (env REFOLD_ARCHIVE_OUT)", **kw)

    p = sub.add_parser(
        "archive", help="write ratings and videos to Parquet (bootstrap layout), exactly once"
    )
    _add_kafka(p)
    common(p)
    p.add_argument("--group", help="consumer group (env REFOLD_ARCHIVE_GROUP)")
    p.add_argument("--roll-rows", type=int, help="rows per file at most (default 100000)")
    p.add_argument("--roll-seconds", type=float, help="seconds a row waits at most (default 60)")
    p.add_argument(
        "--keep-days", type=float, help="delete rating files older than N days (0: keep all)"
    )
    p.set_defaults(func=cmd_archive, archive_command=None)
    actions = p.add_subparsers(dest="archive_command")
    s = actions.add_parser("summary", help="rows, time range and offsets of an archive (JSON)")
    common(s, default=argparse.SUPPRESS)  # either side of "summary"


def _add_retrain(sub: Any) -> None:
    from worker.core.retrain import DEFAULT_TOLERANCE

    p = sub.add_parser(
        "retrain", help="train a candidate on base logs + archive; gate it; swap it in"
    )
    _add_kafka(p)
    p.add_argument("--logs", nargs="+", required=True, help="base logs: files, dirs or globs")
    p.add_argument("--videos", required=True, help="base video metadata")
    p.add_argument("--reactions", help="base reactions")
    p.add_argument("--archive", required=True, help="archive dir (logs/, reactions/, videos/)")
    p.add_argument("--since", help="archive events from this time or duration ago (7d) on")
    p.add_argument("--models", required=True, help="directory of model versions")
    p.add_argument("--current", help="serving model (default: newest valid one in --models)")
    p.add_argument("--params", help="JSON file of ALS params and event weights")
    p.add_argument("--keep", type=int, default=3, help="model versions to keep (default 3)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"swap if candidate NDCG@10 >= current - T (default {DEFAULT_TOLERANCE})",
    )
    p.add_argument("--holdout", help="gate slice: the archive's last DURATION (default: 10%%)")
    p.add_argument("--every", help="run every DURATION (15m, 6h, 1d); default: once")
    p.add_argument("--metrics-file", help="Prometheus textfile (default MODELS/retrain.prom)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--test-corrupt-candidate", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_retrain)


def _add_eval_commands(sub: Any) -> None:
    """Evaluation commands live in worker.eval; they register themselves here."""
    try:
        from worker.eval.cli import add_commands
    except ImportError:
        return
    add_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)
    from worker.errors import RefoldError

    try:
        return int(args.func(args))
    except RefoldError as exc:
        log.error("%s", exc)
        return 1
