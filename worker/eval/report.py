"""Reports: ``report.json`` (every number), ``report.md`` (tables, definitions) and PNG plots.

Plots use matplotlib's object API on the Agg canvas (no pyplot, no display),
so they render headless and never touch global matplotlib state.

Files written into the report directory:

* ``report.json``: the report dict, with NaN written as ``null`` and the list
  of plot files under ``plots``;
* ``report.md``: the same numbers as tables, with every metric defined;
* ``metrics_over_time.png``: each ranking metric over replay time, per variant;
* ``variants.png``: each metric per variant, side by side;
* ``latency.png``: the distribution of event-to-list latency (live replays);
* ``precision_per_round.png``: the simulation's precision per round, per variant.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

METRICS = ("ndcg_at_10", "precision_at_10", "recall_at_10", "map_at_10", "hit_rate_at_10")
LABELS = {
    "ndcg_at_10": "NDCG@10",
    "precision_at_10": "precision@10",
    "recall_at_10": "recall@10",
    "map_at_10": "MAP@10",
    "hit_rate_at_10": "hit-rate@10",
    "coverage": "coverage",
}
#: Figure size of single plots, in inches (about 900 × 500 px at the DPI below).
_FIGSIZE = (9.0, 5.0)
_DPI = 100
#: Histogram bins of the latency plot.
_LATENCY_BINS = 60


# ---- JSON ------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON-ready: numpy scalars and arrays to Python, NaN/inf to None, paths to text."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_clean(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def write_json(report: dict[str, Any], path: Path) -> None:
    """Strict JSON (no NaN), indented, keys in insertion order."""
    path.write_text(json.dumps(_clean(report), indent=2, allow_nan=False) + "\n")


# ---- plots -----------------------------------------------------------------------------------


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = _FIGSIZE) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def plot_metrics_over_time(series: dict[str, Any], path: Path) -> Path | None:
    """One panel per metric: its mean per time bin, one line per variant."""
    if not series.get("time"):
        return None
    import matplotlib.dates as mdates

    times = [datetime.fromisoformat(t.replace("Z", "+00:00")) for t in series["time"]]
    fig, axes = _figure(2, 3, size=(15.0, 8.0))
    flat = axes.ravel()
    for ax, metric in zip(flat, METRICS, strict=False):
        for name, values in series["variants"].items():
            check = name.endswith("_inprocess")  # drawn dashed: it overlays the live line
            ax.plot(
                times,
                values[metric],
                marker="" if check else "o",
                markersize=3,
                linestyle="--" if check else "-",
                label=name,
            )
        ax.set_title(f"{LABELS[metric]} over replay time")
        ax.set_ylabel(LABELS[metric])
        ax.grid(alpha=0.3)
        locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    legend_ax = flat[len(METRICS)]
    handles, labels = flat[0].get_legend_handles_labels()
    legend_ax.legend(handles, labels, loc="center", title="variant")
    legend_ax.axis("off")
    fig.suptitle(
        f"Prequential metrics per time bin ({len(times)} bins of equally many scored lists)"
    )
    return _save(fig, path)


def plot_variants(variants: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Grouped bars: each metric (and coverage) per variant."""
    if not variants:
        return None
    fig, axes = _figure(size=(12.0, 5.0))
    ax = axes[0, 0]
    names = list(variants)
    keys = [*METRICS, "coverage"]
    width = 0.8 / len(names)
    x = np.arange(len(keys))
    for j, name in enumerate(names):
        vals = [variants[name].get(k) or 0.0 for k in keys]
        ax.bar(x + j * width - 0.4 + width / 2, vals, width, label=name)
    ax.set_xticks(x, [LABELS[k] for k in keys])
    ax.set_ylabel("mean over scored lists")
    ax.set_title("Replay metrics per variant")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_latency(samples_ms: npt.NDArray[np.float64], pct: dict[str, Any], path: Path) -> Path:
    """Histogram of per-event latency on a log axis, with p50 / p95 / p99 marked."""
    fig, axes = _figure()
    ax = axes[0, 0]
    pos = samples_ms[samples_ms > 0]
    if pos.size:
        lo, hi = max(float(pos.min()), 0.01), float(pos.max())
        bins = np.geomspace(lo, max(hi, lo * 1.01), _LATENCY_BINS)
        ax.hist(pos, bins=bins, color="#4477aa", alpha=0.8)
        ax.set_xscale("log")
    for label, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        value = pct.get(label)
        if value:
            ax.axvline(value, color="black", linestyle=style, label=f"{label} = {value:.1f} ms")
    ax.set_xlabel("event-to-list latency (ms, log scale)")
    ax.set_ylabel("events")
    ax.set_title(f"Event-to-list latency, {samples_ms.size} events")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_precision_per_round(sim: dict[str, Any], path: Path) -> Path | None:
    """The simulation's precision (likes / shown) per round, one line per variant."""
    variants = sim.get("variants") or {}
    if not variants:
        return None
    fig, axes = _figure()
    ax = axes[0, 0]
    for name, row in variants.items():
        per_round = row["precision_per_round"]
        check = name.endswith("_inprocess")  # drawn dashed: it overlays the live line
        ax.plot(
            range(1, len(per_round) + 1),
            per_round,
            marker="" if check else "o",
            linestyle="--" if check else "-",
            label=name,
        )
    ax.set_xlabel("round")
    ax.set_ylabel("precision = likes / shown")
    ax.set_title(
        f"Feedback-loop simulation: {sim.get('users')} users, answers = {sim.get('answers')}"
    )
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


# ---- markdown --------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return out


def _ci(row: dict[str, Any]) -> str:
    ci = row.get("ndcg_at_10_ci95")
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "–"


def _variant_rows(variants: dict[str, dict[str, Any]], *, with_ci: bool = False) -> list[list[Any]]:
    return [
        [
            f"`{name}`",
            *(row.get(k) for k in (*METRICS, "coverage")),
            *([_ci(row)] if with_ci else []),
            row.get("lists_scored"),
        ]
        for name, row in variants.items()
    ]


def _simulation_md(sim: dict[str, Any]) -> list[str]:
    lines = ["## Feedback-loop simulation", ""]
    if sim.get("note"):
        lines += [f"> **Note.** {sim['note']}", ""]
    lines += [
        f"{sim.get('users')} simulated users (of {sim.get('users_requested')} requested), "
        f"{sim.get('rounds')} rounds of {sim.get('k')} videos, "
        f"{sim.get('initial_ratings')} initial ratings, answers: **{sim.get('answers')}**, "
        f"median held-out likes per user: {_fmt(sim.get('held_out_likes_per_user_median'), 1)}.",
        "",
    ]
    variants = sim.get("variants") or {}
    if variants:
        rounds = max(len(v["precision_per_round"]) for v in variants.values())
        header = ["variant", "precision (all rounds)", "recall of held-out likes",
                  *(f"r{r + 1}" for r in range(rounds))]  # fmt: skip
        rows = [
            [f"`{name}`", row["precision"], row.get("recall"), *row["precision_per_round"]]
            for name, row in variants.items()
        ]
        lines += [*_table(header, rows), ""]
        lines += [f"- `{name}`: {row['description']}" for name, row in variants.items()]
        lines += [""]
    for key, text in (sim.get("checks") or {}).items():
        lines += [f"- check `{key}`: {_fmt(text)}"]
    for key, text in (sim.get("definitions") or {}).items():
        lines += [f"- **{key}**: {text}"]
    lines += ["", "![precision per round](precision_per_round.png)", ""]
    return lines


def _data_md(report: dict[str, Any]) -> list[str]:
    data = report.get("data", {})
    keys = [
        "events",
        "views",
        "reactions_events",
        "users",
        "videos_in_events",
        "first_event",
        "last_event",
        "split_time",
        "train_events",
        "replay_events",
        "replay_events_available",
        "replay_users",
        "replay_users_known_to_model",
        "replay_videos_new_to_model",
        "catalog_size",
        "held_out_events",
    ]
    rows = [[k, data[k]] for k in keys if k in data]
    files = [f"- logs: `{', '.join(data.get('logs', []))}`", f"- videos: `{data.get('videos')}`"]
    if data.get("reactions"):
        files.append(f"- reactions: `{data['reactions']}`")
    model = report.get("model", {})
    mrows = [[k, v] for k, v in model.items() if k != "path"]
    return [
        "## Data",
        "",
        *files,
        "",
        *_table(["", "value"], rows),
        "",
        "## Model",
        "",
        *_table(["", "value"], mrows),
        "",
    ]


def replay_markdown(report: dict[str, Any]) -> str:
    """``report.md`` of a replay."""
    lines = ["# refold replay report", "", "Reproduce with:", "", "```", report["command"], "```"]
    lines += ["", *_data_md(report)]
    settings = report.get("settings", {})
    lines += ["## Settings", ""]
    lines += _table(["", "value"], [[k, v] for k, v in settings.items() if k != "weights"])
    lines += ["", "## Results", ""]
    lists = report.get("lists", {})
    lines += [
        f"{lists.get('total')} list-request points (one per list the worker published), "
        f"{lists.get('scored')} scored; {lists.get('unscored_no_relevant')} had no relevant "
        "video in the horizon and are not scored. All variants answer the same points.",
        "",
    ]
    header = ["variant", *(LABELS[k] for k in (*METRICS, "coverage")), "lists scored"]
    ci_header = [*header[:-1], "NDCG@10 95% interval", header[-1]]
    lines += [*_table(ci_header, _variant_rows(report["variants"], with_ci=True)), ""]
    lines += [f"- `{n}`: {r['description']}" for n, r in report["variants"].items()] + [""]
    ratio = report.get("foldin_vs_retrain")
    if ratio:
        lines += [
            f"**Fold-in's NDCG@10 is {_fmt(ratio['ndcg_fraction'], 3)} of the retrain's** "
            f"({ratio['definition']}; the retrain runs every "
            f"{settings.get('retrain_every_events')} replayed events).",
            "",
        ]
    vs = report.get("foldin_vs_baselines")
    if vs:
        lines += [
            "Fold-in NDCG@10 relative to: "
            + ", ".join(f"{k} {_fmt(v, 3)}×" for k, v in vs.items()),
            "",
        ]
    diff = report.get("foldin_ndcg_difference")
    if diff:
        rows = [
            [f"`{k}`", d["difference"], f"[{_fmt(d['ci95'][0])}, {_fmt(d['ci95'][1])}]"]
            for k, d in diff.items()
            if isinstance(d, dict)
        ]
        lines += [
            *_table(["fold-in minus", "NDCG@10 difference", "95% interval (users resampled)"],
                    rows),
            "",
            f"({diff.get('definition', '')})",
            "",
        ]  # fmt: skip
    lines += ["![metrics per variant](variants.png)", ""]
    for seg, variants in (report.get("segments") or {}).items():
        lines += [f"### Segment: {seg.replace('_', ' ')}", ""]
        lines += [*_table(header, _variant_rows(variants)), ""]
    lines += ["### Over replay time", "", "![metrics over time](metrics_over_time.png)", ""]
    lat = report.get("latency_ms")
    if lat:
        pub = report.get("latency_publish_ms", {})
        live = report.get("live", {})
        lines += ["## Latency", ""]

        def ms(row: dict[str, Any], q: str) -> str:
            return _fmt(row.get(q), 1)

        lines += _table(
            ["", "p50", "p95", "p99", "events"],
            [
                ["event → list received (ms)", *(ms(lat, q) for q in ("p50", "p95", "p99")),
                 lat["events"]],
                ["event → list published (ms)", *(ms(pub, q) for q in ("p50", "p95", "p99")),
                 pub.get("events")],
            ],
        )  # fmt: skip
        lines += [
            "",
            f"Throughput: {_fmt(live.get('events_per_s'), 0)} events/s over "
            f"{_fmt(live.get('wall_s'), 1)} s, with at most {settings.get('max_in_flight')} "
            f"events in flight (sent, not yet in a list); broker: {live.get('broker')}; "
            f"{live.get('lists_popular')} of {live.get('lists')} lists were popularity "
            "fallbacks (users without positive signal yet).",
            "",
            "![latency](latency.png)",
            "",
        ]
    checks = report.get("checks")
    if checks:
        lines += ["## Checks", ""]
        lines += [f"- `{k}`: {_fmt(v)}" for k, v in checks.items() if k != "definition"]
        if checks.get("definition"):
            lines += [f"  ({checks['definition']})"]
        lines += [""]
    if report.get("simulation"):
        lines += _simulation_md(report["simulation"])
    lines += ["## Definitions", ""]
    lines += [f"- **{k}**: {v}" for k, v in (report.get("definitions") or {}).items()]
    lines += ["", "## Timings (s)", ""]
    lines += _table(["", "seconds"], [[k, v] for k, v in (report.get("timings_s") or {}).items()])
    return "\n".join(lines) + "\n"


def simulation_markdown(report: dict[str, Any]) -> str:
    """``report.md`` of a standalone simulation."""
    lines = ["# refold simulate report", "", "Reproduce with:", "", "```", report["command"], "```"]
    lines += ["", *_data_md(report), *_simulation_md(report["simulation"])]
    lines += ["## Timings (s)", ""]
    lines += _table(["", "seconds"], [[k, v] for k, v in (report.get("timings_s") or {}).items()])
    return "\n".join(lines) + "\n"


# ---- writers ---------------------------------------------------------------------------------


def write_replay_report(
    report: dict[str, Any],
    out: Path,
    *,
    latency_samples_ms: npt.NDArray[np.float64] | None = None,
) -> list[Path]:
    """Write the JSON, the Markdown and the plots of a replay; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    plots = [
        plot_metrics_over_time(report.get("timeseries") or {}, out / "metrics_over_time.png"),
        plot_variants(report.get("variants") or {}, out / "variants.png"),
    ]
    if latency_samples_ms is not None and report.get("latency_ms"):
        plots.append(plot_latency(latency_samples_ms, report["latency_ms"], out / "latency.png"))
    if report.get("simulation"):
        plots.append(
            plot_precision_per_round(report["simulation"], out / "precision_per_round.png")
        )
    written = [p for p in plots if p is not None]
    report["plots"] = [p.name for p in written]
    write_json(report, out / "report.json")
    (out / "report.md").write_text(replay_markdown(_clean(report)))
    return [out / "report.json", out / "report.md", *written]


def write_simulation_report(report: dict[str, Any], out: Path) -> list[Path]:
    """Write the JSON, the Markdown and the plot of a standalone simulation."""
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_precision_per_round(report["simulation"], out / "precision_per_round.png")
    written = [plot] if plot is not None else []
    report["plots"] = [p.name for p in written]
    write_json(report, out / "report.json")
    (out / "report.md").write_text(simulation_markdown(_clean(report)))
    return [out / "report.json", out / "report.md", *written]
