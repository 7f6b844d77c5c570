"""``refold tune``'s report: ``report.json``, ``report.md`` and ``tune.png`` (validation
NDCG@10 of every trial, the running best, and the defaults' trial)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.eval.report import _figure, _fmt, _save, _table, write_json


def plot_trials(report: dict[str, Any], path: Path) -> Path | None:
    """Validation NDCG@10 per trial with the running best; the defaults are trial 0."""
    points = [(int(n), float(v)) for n, v in report.get("trials_values", []) if v is not None]
    if not points:
        return None
    fig, axes = _figure()
    ax = axes[0][0]
    xs, ys = zip(*points, strict=True)
    ax.scatter(xs, ys, s=18, label="trial", color="tab:blue")
    best, running = float("-inf"), []
    for y in ys:
        best = max(best, y)
        running.append(best)
    ax.step(xs, running, where="post", color="tab:orange", label="best so far")
    defaults = report.get("defaults_validation_ndcg_at_10")
    if defaults is not None:
        ax.axhline(defaults, color="gray", linestyle="--", label="defaults (trial 0)")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation NDCG@10 (mean over windows and seeds)")
    ax.set_title("refold tune")
    ax.legend(loc="best")
    return _save(fig, path)


def _interval(row: dict[str, Any], key: str = "ndcg_at_10_ci95") -> str:
    ci = row.get(key)
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "–"


def tune_markdown(report: dict[str, Any]) -> str:
    test, settings, best = report["test"], report["settings"], report["best"]
    lines = [
        "# refold tune",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{settings['trials']} complete trials. Each trial trains on the events before each "
        f"validation split {settings['validation']} and is scored on the events up to the "
        f"next split (the last up to the test split {settings['test_split']}), for seeds "
        f"{settings['seeds']}: the in-process prequential NDCG@10 of the core engine's "
        f"fold-in at the lists a worker polling {settings['batch']} events publishes. Trial 0 "
        "is the defaults. Nothing at or after the test split is seen while searching.",
        "",
        "## Test window",
        "",
        f"Trained on the {report['data']['test_train_events']:,} events before "
        f"{report['data']['test_split_time']} (`test-train/`), scored on the next "
        f"{report['data']['test_events']:,}. Intervals: 95% bootstrap, resampling users.",
        "",
    ]
    rows = [
        [name, test[name]["ndcg_at_10"], _interval(test[name]), test[name]["lists_scored"]]
        for name in ("best", "defaults", "popularity")
    ]
    lines += _table(["model", "NDCG@10", "95% interval", "lists scored"], rows)
    for other in ("defaults", "popularity"):
        d = test.get(f"best_minus_{other}")
        if d:
            lines += [
                "",
                f"best − {other}: {_fmt(d['ndcg_at_10'])} {_interval(d, 'ci95')} "
                "(paired at the same lists)",
            ]
    lines += [
        "",
        "## Best trial",
        "",
        f"Trial {best['trial']}, validation NDCG@10 {_fmt(best['validation_ndcg_at_10'])} "
        f"(defaults: {_fmt(report.get('defaults_validation_ndcg_at_10'))}). `best.json`:",
        "",
        "```json",
        _json(best["params"]),
        "```",
        "",
        "Rebuild the test model with it:",
        "",
        "```bash",
        report["reproduce"],
        "```",
        "",
        "Every trial, with its parameters and per-window scores: `trials.json`. Plot: `tune.png`.",
        "",
    ]
    return "\n".join(lines)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2)


def write_tune_report(report: dict[str, Any], out: Path) -> list[Path]:
    plot = plot_trials(report, out / "tune.png")
    report["plots"] = [] if plot is None else [plot.name]
    write_json(report, out / "report.json")
    (out / "report.md").write_text(tune_markdown(report))
    return [out / "report.json", out / "report.md", *([plot] if plot else [])]
