"""Render evaluation reports: a rich table for the terminal and a plain dict for JSON. No printing here."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.table import Table

    from qkvconv.evaluate import EvalReport, Metric


def _decimals(x: float) -> int:
    """Decimals to show: 3 below 10, 2 below 100, 1 below 1000, else 0 (0.292, 56.12, 251.3, 1204)."""
    ax = abs(x)
    return 3 if ax < 10 else 2 if ax < 100 else 1 if ax < 1000 else 0


def format_value(value: float, stderr: float | None = None) -> str:
    """"0.292 ± 0.020"; the stderr gets the value's decimals."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e5:  # a perplexity of an untrained model: 3 significant digits
        return f"{value:.3g}" + (f" ± {stderr:.2g}" if stderr is not None and math.isfinite(stderr) else "")
    d = _decimals(value)
    text = f"{value:.{d}f}"
    if stderr is not None and math.isfinite(stderr):
        text += f" ± {stderr:.{d}f}"
    return text


def format_delta(delta: float, reference: float) -> str:
    """"+0.004" with the reference value's decimals."""
    if not math.isfinite(delta):
        return str(delta)
    if abs(reference) >= 1e5 or abs(delta) >= 1e5:
        return f"{delta:+.3g}"
    return f"{delta:+.{_decimals(reference)}f}"


def format_count(n: int) -> str:
    """Parameter counts as 1.24B / 134.5M / 8.1K."""
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f}B"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f}M"
    if abs(n) >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


# column headers only; JSON keeps lm-eval's names
SHORT_METRIC_NAMES = {
    "perplexity": "ppl", "word_perplexity": "word ppl", "byte_perplexity": "byte ppl", "bits_per_byte": "bits/byte",
}


def _relative(new: float, old: float) -> str:
    return f"{(new - old) / old:+.1%}" if old else "n/a"


def _style(delta: float, higher_is_better: bool | None) -> str:
    if higher_is_better is None or delta == 0 or not math.isfinite(delta):
        return "dim"
    return "green" if (delta > 0) == higher_is_better else "red"


def eval_table(report: EvalReport, *, metrics: Sequence[str] | None = None, title: str | None = None) -> Table:
    """One row per model; per (task, metric) "value ± stderr", and from the second row on a second
    line with the delta against the first row (green better, red worse). `metrics` keeps only those
    metric names (e.g. ["acc", "perplexity", "word_perplexity"])."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    columns = [(t, m) for t, m in report.columns() if metrics is None or m in metrics]
    settings = report.settings
    own = "".join(f" ({t}: {n})" for t, n in (settings.get("task_limits") or {}).items())
    caption = [f"limit {settings.get('limit') or 'none'}{own} · seed {settings.get('seed')} · "
               f"batch {settings.get('batch_size')} · {settings.get('device')}"]
    caption += [f"{task}: {source}" for task, source in report.sources.items()]
    table = Table(
        title=title or "lm-eval", caption="\n".join(caption), caption_justify="left", box=box.SIMPLE_HEAD,
        pad_edge=False, show_lines=True,  # with SIMPLE_HEAD a blank line between rows: cells have 2 lines
    )
    table.add_column("Model", overflow="fold")
    table.add_column("Params", justify="right")
    table.add_column("KV B/tok", justify="right")
    for task, metric in columns:
        table.add_column(f"{task}\n{SHORT_METRIC_NAMES.get(metric, metric)}", justify="right", overflow="fold")

    first = report.rows[0] if report.rows else None
    for i, row in enumerate(report.rows):
        name = Text(row.name, style="bold")
        if row.extra:
            name.append("\n" + ", ".join(f"{k}={v}" for k, v in row.extra.items()), style="dim")
        params = Text(format_count(row.num_parameters))
        kv = Text(f"{row.kv_cache_bytes_per_token:,}")
        if i > 0 and first is not None:
            params.append(f"\n{_relative(row.num_parameters, first.num_parameters)}", style="dim")
            kv.append(f"\n{_relative(row.kv_cache_bytes_per_token, first.kv_cache_bytes_per_token)}", style="dim")
        cells: list[Text] = []
        for task, metric in columns:
            m = row.metric(task, metric)
            if m is None:
                cells.append(Text("-", style="dim"))
                continue
            cell = Text(format_value(m.value, m.stderr))
            ref = first.metric(task, metric) if i > 0 and first is not None else None
            if ref is not None:
                delta = m.value - ref.value
                cell.append(f"\n({format_delta(delta, ref.value)})", style=_style(delta, m.higher_is_better))
            cells.append(cell)
        table.add_row(name, params, kv, *cells)
    return table


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _metric_dict(metrics: Sequence[Metric]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in metrics:
        out.setdefault(m.task, {})[m.name] = {
            "value": _finite(m.value), "stderr": _finite(m.stderr), "higher_is_better": m.higher_is_better,
        }
    return out


def format_eval_report_json(report: EvalReport) -> dict[str, Any]:
    """The report as JSON-ready data: manifest, settings, data sources, and per model its metrics,
    deltas against the first model, timings and lm-eval's full results (`lm_eval`)."""
    from qkvconv.evaluate import _jsonable

    first = report.rows[0] if report.rows else None
    models = []
    for i, (row, results) in enumerate(zip(report.rows, report.results)):
        deltas: dict[str, dict[str, float | None]] = {}
        if i > 0 and first is not None:
            for m in row.metrics:
                ref = first.metric(m.task, m.name)
                if ref is not None:
                    deltas.setdefault(m.task, {})[m.name] = _finite(m.value - ref.value)
        models.append({
            "name": row.name,
            "num_parameters": row.num_parameters,
            "kv_cache_bytes_per_token": row.kv_cache_bytes_per_token,
            "source_hash": row.source_hash,
            "extra": _jsonable(row.extra),
            "metrics": _metric_dict(row.metrics),
            "delta_vs_first": deltas,
            "load_seconds": round(row.load_seconds, 3),
            "eval_seconds": round(row.eval_seconds, 3),
            "lm_eval": results,
        })
    return {
        "manifest": _jsonable(report.manifest),
        "settings": report.settings,
        "tasks": report.tasks,
        "data_sources": report.sources,
        "models": models,
    }
