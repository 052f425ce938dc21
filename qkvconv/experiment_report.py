"""Render an experiment run (RUN_DIR/results.json, format "qkvconv.run/1") as report.md and PNG plots.

`render(run_dir)` reads only results.json, so `qkvconv report RUN_DIR` re-renders a finished, a resumed or a
still-running (partial) run the same way. What the report holds:

- one table: per model its parameters, KV-cache bytes per token (and fraction of the base model's), every main
  metric as value ± stderr, its delta to the model's reference (the control when the model was healed, the base
  otherwise) and a paired test on the documents both were scored on (qkvconv.stats: McNemar's exact test for 0/1
  metrics, the paired bootstrap otherwise), marked when p < 0.05; the other metrics in a second table;
- `quality_vs_kv.png`: each main metric against KV-cache bytes per token, one point per model, the Pareto front;
- `heal_curves.png`: held-out loss (and KL to the original model) of every healed model against tokens;
- "which should I use": the best model at or under each KV-cache budget;
- the recipe as written, versions, machine, device, and the wall time of every step.

`samples_from_lm_eval(results)` turns lm-eval's `log_samples=True` output into the contract's `samples`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qkvconv.errors import QkvconvError
from qkvconv.report import SHORT_METRIC_NAMES, format_count, format_delta, format_value
from qkvconv.stats import ALPHA, DEFAULT_ITERS, DEFAULT_SEED, PairedTest, paired_test, paired_values

FORMAT = "qkvconv.run/1"
RESULTS = "results.json"
REPORT = "report.md"
PARETO_PNG = "quality_vs_kv.png"
HEAL_PNG = "heal_curves.png"
# per task, the metrics the table and the Pareto plot lead with, in this order (the rest go to a second table); a
# task with none of these leads with its first metric. The first main metric ranks models in "which should I use".
MAIN_METRICS = ("acc", "acc_norm", "exact_match", "perplexity", "word_perplexity")


# ----------------------------------------------------------------------------- the contract


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricValue(_Strict):
    value: Optional[float]
    stderr: Optional[float] = None
    higher_is_better: Optional[bool] = None


class SampleMetric(_Strict):
    aggregation: str  # lm-eval aggregation name: mean | perplexity | weighted_perplexity | bits_per_byte | ...
    values: list[Union[float, list[float]]]  # per document, in doc_ids order


class TaskSamples(_Strict):
    doc_ids: list[int]
    metrics: dict[str, SampleMetric]


class HealPoint(_Strict):
    step: int
    tokens: int
    eval_loss: float
    kl: Optional[float] = None


class ModelResult(_Strict):
    name: str
    role: Literal["base", "control", "variant"]
    transforms: list[dict[str, Any]] = Field(default_factory=list)
    heal: Optional[dict[str, Any]] = None
    reference: Optional[Literal["base", "control"]] = None  # None only for the base model
    params: Optional[int] = None  # None while the model's conversion is pending
    kv_cache_bytes_per_token: Optional[int] = None
    metrics: dict[str, dict[str, MetricValue]] = Field(default_factory=dict)  # {} while its eval is pending
    samples: dict[str, TaskSamples] = Field(default_factory=dict)
    heal_curve: list[HealPoint] = Field(default_factory=list)
    steps: list[str] = Field(default_factory=list)


class StepRecord(_Strict):
    key: str
    kind: Literal["convert", "finetune", "eval"]
    model: str
    options: dict[str, Any] = Field(default_factory=dict)
    dir: str
    wall_s: Optional[float] = None
    device: Optional[str] = None
    cached: bool = False
    started: Optional[str] = None
    finished: Optional[str] = None


class RunResults(_Strict):
    format: Literal["qkvconv.run/1"]
    name: str
    recipe: dict[str, Any]
    recipe_text: str
    manifest: dict[str, Any]
    device: str
    wall_s: Optional[float] = None
    models: list[ModelResult]
    steps: list[StepRecord] = Field(default_factory=list)

    def model(self, name: str) -> ModelResult | None:
        return next((m for m in self.models if m.name == name), None)


def load_results(run_dir: Path) -> RunResults:
    """RUN_DIR/results.json, validated against the contract; one QkvconvError line if it is not one."""
    path = Path(run_dir) / RESULTS
    if not Path(run_dir).is_dir():
        raise QkvconvError(f"run directory {run_dir} does not exist; give the --output folder of `qkvconv run`")
    if not path.is_file():
        raise QkvconvError(f"{path} not found; the run has not written results yet (run or resume it first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QkvconvError(f"{path} is not valid JSON ({e}); re-run `qkvconv run --resume` to rewrite it") from None
    if isinstance(data, dict) and data.get("format") not in (None, FORMAT):
        raise QkvconvError(f"{path} has format {data.get('format')!r}; this qkvconv reads {FORMAT!r}")
    try:
        results = RunResults.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "top level"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise QkvconvError(f"{path} is not a {FORMAT} results file: {where}: {first['msg']}{more}") from None
    names = [m.name for m in results.models]
    if len(set(names)) != len(names):
        raise QkvconvError(f"{path}: model names must be unique, got {names}")
    for m in results.models:
        if m.reference is not None and results.model(m.reference) is None:
            raise QkvconvError(f"{path}: model '{m.name}' has reference '{m.reference}', which is not among the models")
    return results


# ----------------------------------------------------------------------------- lm-eval per-sample output


def samples_from_lm_eval(results: dict) -> dict[str, dict]:
    """lm-eval's per-document output (`simple_evaluate(..., log_samples=True)["samples"]`) as the contract's
    `samples`: task -> {"doc_ids": [...], "metrics": {metric: {"aggregation": name, "values": [...]}}}.

    Metrics are keyed as in the metrics table ("acc"; "acc,<filter>" for a filter other than "none"). The
    aggregation is the task config's (`metric_list[].aggregation`), else lm-eval's registered default for the
    metric; a metric with neither, or with non-numeric per-document values, is left out (no paired test for it).
    Documents are sorted by doc_id.
    """
    out: dict[str, dict] = {}
    for task, rows in (results.get("samples") or {}).items():
        config = (results.get("configs") or {}).get(task) or {}
        by_doc: dict[int, dict[str, Any]] = {}
        for row in rows:
            flt = row.get("filter", "none")
            for metric in row.get("metrics") or []:
                key = metric if flt == "none" else f"{metric},{flt}"
                by_doc.setdefault(int(row["doc_id"]), {})[key] = row.get(metric)
        doc_ids = sorted(by_doc)
        metrics: dict[str, dict] = {}
        keys = list(dict.fromkeys(k for d in doc_ids for k in by_doc[d]))
        for key in keys:
            aggregation = _aggregation_name(config, key.partition(",")[0])
            values = [_per_doc_value(by_doc[d].get(key)) for d in doc_ids]
            if aggregation is None or any(v is None for v in values):
                continue
            metrics[key] = {"aggregation": aggregation, "values": values}
        if metrics:
            out[task] = {"doc_ids": doc_ids, "metrics": metrics}
    return out


def _aggregation_name(config: dict, metric: str) -> str | None:
    """The task config's aggregation name for `metric`, else the name of lm-eval's registered default for it."""
    from lm_eval.api.registry import AGGREGATION_REGISTRY, METRIC_AGGREGATION_REGISTRY

    import lm_eval.api.metrics  # noqa: F401  (registers the metrics and aggregations)

    for entry in config.get("metric_list") or []:
        name = entry.get("aggregation")
        if entry.get("metric") == metric and isinstance(name, str) and name in AGGREGATION_REGISTRY:
            return name
    if metric not in METRIC_AGGREGATION_REGISTRY:
        return None
    default = METRIC_AGGREGATION_REGISTRY.get(metric)
    return next((name for name, fn in AGGREGATION_REGISTRY.items() if fn is default), None)


def _per_doc_value(v: Any) -> float | list[float] | None:
    """A JSON-ready per-document value: a finite number, or a list of them ([loglikelihood, words])."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return _per_doc_value(v.item())
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return [float(x) for x in v] if all(math.isfinite(x) for x in v) else None
    return None


# ----------------------------------------------------------------------------- what the report computes


def metric_columns(results: RunResults) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(main, other) (task, metric) pairs, in the order the models report them."""
    seen: list[tuple[str, str]] = []
    for m in results.models:
        seen += [(t, k) for t, block in m.metrics.items() for k in block if (t, k) not in seen]
    main: list[tuple[str, str]] = []
    for task in dict.fromkeys(t for t, _ in seen):
        mine = [k for t, k in seen if t == task]
        lead = sorted((k for k in mine if k in MAIN_METRICS), key=MAIN_METRICS.index) or mine[:1]
        main += [(task, k) for k in lead]
    return main, [c for c in seen if c not in main]


def _metric(m: ModelResult, task: str, metric: str) -> MetricValue | None:
    v = (m.metrics.get(task) or {}).get(metric)
    return v if v is not None and v.value is not None else None


def _higher_is_better(results: RunResults, task: str, metric: str) -> bool | None:
    for m in results.models:
        v = (m.metrics.get(task) or {}).get(metric)
        if v is not None and v.higher_is_better is not None:
            return v.higher_is_better
    return None


def compare(
    model: ModelResult, reference: ModelResult, task: str, metric: str, *, iters: int = DEFAULT_ITERS,
    seed: int = DEFAULT_SEED,
) -> PairedTest | str:
    """The paired test of `model` against `reference` on one metric, or why there is none (a short phrase)."""
    mine, theirs = model.samples.get(task), reference.samples.get(task)
    if mine is None or theirs is None or metric not in mine.metrics or metric not in theirs.metrics:
        return "no per-document values"
    sa, sb = mine.metrics[metric], theirs.metrics[metric]
    if sa.aggregation != sb.aggregation:
        return f"aggregations differ ({sa.aggregation} vs {sb.aggregation})"
    a, b = paired_values(mine.doc_ids, sa.values, theirs.doc_ids, sb.values)
    if not a:
        return "no common documents"
    return paired_test(a, b, sa.aggregation, iters=iters, seed=seed)


def paired_tests(results: RunResults, *, iters: int = DEFAULT_ITERS, seed: int = DEFAULT_SEED) -> dict:
    """(model, task, metric) -> PairedTest or a reason, for every model with a reference and a value."""
    main, other = metric_columns(results)
    out: dict[tuple[str, str, str], PairedTest | str] = {}
    for m in results.models:
        ref = results.model(m.reference) if m.reference else None
        if ref is None or ref is m:
            continue
        for task, metric in main + other:
            if _metric(m, task, metric) is not None and _metric(ref, task, metric) is not None:
                out[(m.name, task, metric)] = compare(m, ref, task, metric, iters=iters, seed=seed)
    return out


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats: KV bytes (x) lower or equal and quality (y) better or equal,
    one of them strictly. Sorted by x."""
    sign = 1 if higher_is_better else -1
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and sign * y2 >= sign * y) and (x2 < x or sign * y2 > sign * y)
            for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -sign * points[i][1]))


def recommendations(results: RunResults, tests: dict) -> list[str]:
    """One line per KV-cache budget (each model's bytes per token): the best model at or under it on the first
    main metric, and whether it differs significantly from its reference."""
    main, _ = metric_columns(results)
    if not main:
        return []
    task, metric = main[0]
    better = _higher_is_better(results, task, metric)
    scored = [m for m in results.models if _metric(m, task, metric) and m.kv_cache_bytes_per_token is not None]
    if better is None or not scored:
        return []
    base = results.models[0].kv_cache_bytes_per_token
    lines = []
    for budget in sorted({m.kv_cache_bytes_per_token for m in scored}, reverse=True):
        fits = [m for m in scored if m.kv_cache_bytes_per_token <= budget]
        best = max(fits, key=lambda m: _metric(m, task, metric).value * (1 if better else -1))
        value = _metric(best, task, metric)
        frac = f" ({budget / base:.0%} of base)" if base else ""
        note = ""
        t = tests.get((best.name, task, metric))
        if isinstance(t, PairedTest):
            verdict = "significantly" if t.significant else "not significantly"
            note = f"; {verdict} {'better' if (t.delta > 0) == better else 'worse'} than {best.reference} ({p_text(t)})"
        lines.append(f"- **≤ {budget:,} B/token**{frac}: `{best.name}`, {task} {metric} "
                     f"{format_value(value.value, value.stderr)}{note}")
    return lines


# ----------------------------------------------------------------------------- markdown


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def p_text(t: PairedTest) -> str:
    """"p 0.031"; "p ≤ 1.0e-04" when no bootstrap resample reached the observed delta (the smallest p it can give)."""
    floor = t.test == "paired bootstrap" and t.p_value <= 1 / (t.iters + 1) * (1 + 1e-9)
    return f"p {'≤ ' if floor else ''}{_p(t.p_value)}"


def _cell(results: RunResults, m: ModelResult, task: str, metric: str, tests: dict, sep: str = ", ") -> str:
    """"value ± stderr", and on a second line the delta to the reference with the paired test's p (✱ if p < 0.05)."""
    v = _metric(m, task, metric)
    if v is None:
        return "pending" if not m.metrics else "–"
    text = format_value(v.value, v.stderr)
    ref = results.model(m.reference) if m.reference else None
    rv = _metric(ref, task, metric) if ref is not None and ref is not m else None
    if rv is None:
        return text
    text += f"\nΔ {format_delta(v.value - rv.value, rv.value)}"
    t = tests.get((m.name, task, metric))
    if isinstance(t, PairedTest):
        text += f"{sep}{p_text(t)}" + (" ✱" if t.significant else "")
    elif isinstance(t, str):
        text += f" ({t})"
    return text


def _test_name(task: str, metric: str, tests: dict) -> str:
    names = {t.test for (_, tk, mt), t in tests.items() if tk == task and mt == metric and isinstance(t, PairedTest)}
    return "/".join(sorted(names))


def metrics_table(
    results: RunResults, columns: list[tuple[str, str]], tests: dict, sep: str = ", ",
) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the results table; a cell's lines are joined by "\\n", its delta and p by `sep`."""
    base = results.models[0].kv_cache_bytes_per_token if results.models else None
    header = ["model", "ref", "params", "KV B/token"]
    for task, metric in columns:
        arrow = {True: " ↑", False: " ↓"}.get(_higher_is_better(results, task, metric), "")
        test = _test_name(task, metric, tests)
        header.append(f"{task}\n{SHORT_METRIC_NAMES.get(metric, metric)}{arrow}" + (f"\n({test})" if test else ""))
    rows = []
    for m in results.models:
        kv = "pending" if m.kv_cache_bytes_per_token is None else f"{m.kv_cache_bytes_per_token:,}"
        if m.kv_cache_bytes_per_token is not None and base:
            kv += f"\n{m.kv_cache_bytes_per_token / base:.0%}"
        params = "pending" if m.params is None else format_count(m.params)
        name = m.name + ("" if m.role in ("variant", m.name) else f" ({m.role})")
        ref = m.reference if m.reference not in (None, m.name) else "–"
        rows.append([name, ref, params, kv] + [_cell(results, m, t, k, tests, sep) for t, k in columns])
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]], right_from: int = 2) -> list[str]:
    cell = lambda c: c.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("--:" if i >= right_from else "---" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def _tests_table(results: RunResults, tests: dict) -> list[str]:
    rows = [(k, t) for k, t in tests.items() if isinstance(t, PairedTest)]
    if not rows:
        return []
    conf = rows[0][1].confidence
    lines = [f"| model | vs | task | metric | docs | Δ | {conf:.0%} CI | p | test |",
             "|---|---|---|---|--:|--:|---|--:|---|"]
    for (name, task, metric), t in rows:
        ref = results.model(name).reference
        d = lambda x: format_delta(x, t.value_b)  # noqa: E731
        disc = f" ({t.discordant[0]}:{t.discordant[1]} discordant)" if t.discordant else ""
        lines.append(f"| {name} | {ref} | {task} | {metric} | {t.n} | {d(t.delta)} | [{d(t.ci_low)}, {d(t.ci_high)}] "
                     f"| {p_text(t)[2:]}{' ✱' if t.significant else ''} | {t.test}{disc} |")
    return lines


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _transforms(m: ModelResult, is_base: bool = False) -> str:
    parts = []
    for t in m.transforms:
        opts = ", ".join(f"{k}={v}" for k, v in t.items() if k != "transform" and v is not None)
        parts.append(f"{t.get('transform', '?')}({opts})")
    chain = " → ".join(parts) or "unmodified"
    if is_base:
        return chain + "; the base itself (the heal is pure distillation from the base, whose fixed point it is)"
    return chain + ("; healed" if m.heal else "; not healed")


def base_control(results: RunResults) -> ModelResult | None:
    """The control where it is the base model itself: its steps are the base's (the runner heals no control where
    the heal is pure distillation from the base, runner.self_distillation)."""
    base = next((m for m in results.models if m.role == "base"), None)
    return next((m for m in results.models if m.role == "control" and base is not None and m.steps == base.steps),
                None)


def markdown(
    results: RunResults, tests: dict, plots: dict[str, str], *, iters: int = DEFAULT_ITERS, seed: int = DEFAULT_SEED,
) -> str:
    """report.md's text: the tables, recommendations, plots (`plots`: title -> PNG file name), recipe, environment."""
    main, other = metric_columns(results)
    pending = [m.name for m in results.models if not m.metrics]
    L = [f"# {results.name}", ""]
    L.append(f"Run on **{results.device}** · wall time {_fmt_s(results.wall_s)} · "
             f"{sum(not s.cached for s in results.steps)} steps run, {sum(s.cached for s in results.steps)} cached"
             + (f" · **partial: pending {', '.join(pending)}**" if pending else ""))
    L += ["", "## Results", ""]
    same_as_base = base_control(results)
    L.append("Δ is against the model's reference (`ref`: the control, i.e. the unmodified model healed the same way, "
             "for healed models; the base model otherwise), on the same documents. "
             + ("Here the heal is pure distillation from the base, so the control is the base itself: distilling the "
                "base into itself can only keep it (running it anyway would let Adam turn rounding into drift). "
                if same_as_base is not None else "")
             + "p is a paired test on lm-eval's "
             f"per-document values: McNemar's exact test for 0/1 metrics, a paired bootstrap "
             f"({iters:,} resamples, seed {seed}, lm-eval's aggregation) otherwise; **✱** marks p < {ALPHA}. "
             "Values are ± lm-eval's stderr; Δ is between the values shown, the paired tests (CIs under *Paired "
             "tests*) use the documents both models scored. KV B/token: bytes of KV cache per token at the eval "
             "dtype, and its fraction of the base model's.")
    L += [""] + _markdown_table(*metrics_table(results, main, tests))
    if other:
        L += ["", "### Other metrics", ""] + _markdown_table(*metrics_table(results, other, tests))
    if rec := recommendations(results, tests):
        task, metric = main[0]
        L += ["", "## Which should I use", "", f"Best {task} {metric} at or under each KV-cache budget:", ""] + rec
    if tt := _tests_table(results, tests):
        L += ["", "### Paired tests", ""] + tt
    for title, png in plots.items():
        L += ["", f"## {title}", "", f"![{title}]({png})"]
    L += ["", "## Models", "", "| model | role | transforms | steps |", "|---|---|---|---|"]
    L += [f"| {m.name} | {m.role} | {_transforms(m, m is same_as_base)} | "
          f"{', '.join(k[:10] for k in m.steps) or '–'} |"
          for m in results.models]
    L += ["", "## Steps", "", "| # | kind | model | key | device | wall | cached | finished |",
          "|--:|---|---|---|---|--:|---|---|"]
    L += [f"| {i} | {s.kind} | {s.model} | `{s.key[:10]}` | {s.device or '–'} | {_fmt_s(s.wall_s)} | "
          f"{'yes' if s.cached else 'no'} | {s.finished or '–'} |" for i, s in enumerate(results.steps, 1)]
    L += ["", "## Recipe", "", "```yaml", results.recipe_text.rstrip(), "```"]
    L += ["", "## Environment", ""] + _environment(results)
    return "\n".join(L) + "\n"


def _environment(results: RunResults) -> list[str]:
    man = results.manifest
    env = man.get("environment") or {}
    lines = [f"- device: {results.device}" + (f" (environment: {env['device']})" if env.get("device") else "")]
    if machine := man.get("machine"):
        lines.append(f"- machine: {machine if isinstance(machine, str) else json.dumps(machine, sort_keys=True)}")
    versions = man.get("versions") or {}
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    for key in ("created", "seed", "seeds", "argv"):
        if key in man:
            value = man[key]
            value = " ".join(value) if key == "argv" else value if isinstance(value, str) else json.dumps(value)
            lines.append(f"- {key}: `{value}`")
    if inputs := man.get("inputs"):
        lines += ["- inputs:", "", "```json", json.dumps(inputs, indent=1, sort_keys=True), "```"]
    return lines


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _group_of(m: ModelResult) -> str:
    """A model's group in the quality/KV plot: base, control, or its chain of transforms (", healed" if healed)."""
    if m.role != "variant":
        return m.role
    chain = " → ".join(t.get("transform", "?") for t in m.transforms) or "unmodified"
    return chain + (", healed" if m.heal else "")


_MARKERS = "oDv^P<>Xph"
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _variant_groups(models: list[ModelResult]) -> dict[str, tuple[str, str, bool]]:
    """label -> (marker, colour, filled): base and control fixed, then one marker and colour per chain of
    transforms, in order of appearance; a healed chain keeps its unhealed chain's colour, hollow markers."""
    out = {"base": ("s", "black", True), "control": ("*", "tab:red", True)}
    chains: list[str] = []
    for m in models:
        label = _group_of(m)
        if label in out:
            continue
        chain = label.removesuffix(", healed")
        if chain not in chains:
            chains.append(chain)
        j = chains.index(chain)
        out[label] = (_MARKERS[j % len(_MARKERS)], _COLORS[j % len(_COLORS)], not m.heal)
    return out


def _dodged(xs: list[int], log: bool) -> list[float]:
    """Plot positions: the models that share a KV budget spread a little around it (3 % apart on a log axis, 1 % of
    the range on a linear one), so their markers and error bars do not hide each other."""
    step = (max(xs) - min(xs)) * 0.01 or 1.0
    out = []
    for i, x in enumerate(xs):
        n, k = xs.count(x), xs[:i].count(x)
        out.append(x * 1.03 ** (k - (n - 1) / 2) if log else x + step * (k - (n - 1) / 2))
    return out


def _fraction(f: float) -> str:
    """0.5 -> "1/2", 0.1667 -> "1/6", 0.4 -> "40%": a cache fraction as the budget it was chosen as."""
    if f > 0 and abs(1 / f - round(1 / f)) < 0.02 * (1 / f):
        return "1" if round(1 / f) == 1 else f"1/{round(1 / f)}"
    return f"{f:.0%}"


def plot_quality_vs_kv(results: RunResults, path: Path) -> bool:
    """One panel per main metric: metric against KV-cache bytes per token, the Pareto front drawn. False if no
    model has both a value and its KV bytes yet."""
    main, _ = metric_columns(results)
    panels = []
    for task, metric in main:
        pts = [(m, _metric(m, task, metric)) for m in results.models]
        pts = [(m, v) for m, v in pts if v is not None and m.kv_cache_bytes_per_token is not None]
        if pts:
            panels.append((task, metric, pts))
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.8), squeeze=False)
    groups = _variant_groups(results.models)
    base = results.models[0].kv_cache_bytes_per_token if results.models else None
    for ax, (task, metric, pts) in zip(axes[0], panels):
        better = _higher_is_better(results, task, metric)
        log = "perplexity" in metric and all(v.value > 0 for _, v in pts)  # perplexities span decades
        xs = sorted({m.kv_cache_bytes_per_token for m, _ in pts})
        logx = xs[0] > 0 and xs[-1] / xs[0] > 4  # budgets that halve and third the cache: even spacing on a log axis
        at = dict(zip([m.name for m, _ in pts], _dodged([m.kv_cache_bytes_per_token for m, _ in pts], logx)))
        for label, (marker, color, filled) in groups.items():
            mine = [(m, v) for m, v in pts if _group_of(m) == label]
            if not mine:
                continue
            err = [v.stderr or 0 for _, v in mine]
            low = [min(e, 0.9 * v.value) if log else e for e, (_, v) in zip(err, mine)]  # a log axis has no ≤ 0
            ax.errorbar([at[m.name] for m, _ in mine], [v.value for _, v in mine],
                        yerr=[low, err], fmt=marker, color=color, ms=11 if marker == "*" else 7,
                        mfc=color if filled else "white", mew=1.5, capsize=3, label=label, zorder=3)
        if logx:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:,}" + (f"\n{_fraction(x / base)}" if base else "") for x in xs], fontsize=7)
        span = (max(v.value for _, v in pts) - min(v.value for _, v in pts)) or 1.0
        placed: list[tuple[int, float]] = []  # labels of models at (nearly) the same point are stacked
        for m, v in pts:
            x = m.kv_cache_bytes_per_token
            k = sum(1 for x2, y2 in placed if x2 == x and abs(y2 - v.value) < 0.06 * span)
            placed.append((x, v.value))
            ax.annotate(m.name, (at[m.name], v.value), textcoords="offset points",
                        xytext=(6, 5 - 10 * k), fontsize=7)
        if better is not None and len(pts) > 1:
            xy = [(float(m.kv_cache_bytes_per_token), v.value) for m, v in pts]
            front = [xy[i] for i in pareto_front(xy, better)]
            ax.step([x for x, _ in front], [y for _, y in front], where="post", color="tab:green", alpha=0.6, lw=1.5,
                    label="Pareto front", zorder=2)
        arrow = {True: " (higher is better)", False: " (lower is better)"}.get(better, "")
        ax.set_title(f"{task}: {metric}{arrow}", fontsize=9)
        ax.set_xlabel("KV-cache bytes per token" + (" (fraction of the base model's)" if base else ""))
        ax.set_ylabel(SHORT_METRIC_NAMES.get(metric, metric) + (" (log scale)" if log else ""))
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(plt, fig, path, f"{results.name}: quality against KV-cache size")
    return True


def plot_heal_curves(results: RunResults, path: Path) -> bool:
    """Held-out loss (and KL to the original, where recorded) of every healed model against tokens; False if none."""
    healed = [m for m in results.models if m.heal_curve]
    if not healed:
        return False
    with_kl = any(p.kl is not None for m in healed for p in m.heal_curve)
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if with_kl else 1, figsize=(11 if with_kl else 6.5, 4.2), squeeze=False)
    from matplotlib.ticker import EngFormatter

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(healed):  # one colour per model in both panels; the control black and dashed
        style = dict(marker="o", ms=3, lw=2.2 if m.role == "control" else 1.3, ls="--" if m.role == "control" else "-",
                     color="black" if m.role == "control" else colors[i % len(colors)], label=m.name)
        axes[0][0].plot([p.tokens for p in m.heal_curve], [p.eval_loss for p in m.heal_curve], **style)
        kl = [(p.tokens, p.kl) for p in m.heal_curve if p.kl is not None]
        if with_kl and kl:
            axes[0][1].plot([t for t, _ in kl], [k for _, k in kl], **style)
    axes[0][0].set_ylabel("held-out loss (nats/token)")
    if with_kl:
        axes[0][1].set_ylabel("KL to the original model (nats/token)")
    for ax in axes[0]:
        ax.set_xlabel("training tokens")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(plt, fig, path, f"{results.name}: heal curves")
    return True


# ----------------------------------------------------------------------------- render


@dataclass(frozen=True)
class Rendered:
    """A rendered report: report.md's path, the validated results and the paired tests it shows."""

    path: Path
    results: RunResults
    tests: dict


def render_report(run_dir: Path, *, iters: int = DEFAULT_ITERS, seed: int = DEFAULT_SEED) -> Rendered:
    """Write RUN_DIR/report.md and its PNGs from RUN_DIR/results.json (never modified).

    Files are written to a temporary folder inside RUN_DIR and moved into place; a plot that no longer applies
    (e.g. heal curves of a run without healing) is removed."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    tests = paired_tests(results, iters=iters, seed=seed)
    with tempfile.TemporaryDirectory(prefix=".report-", dir=run_dir) as tmp:
        tmp = Path(tmp)
        plots = {}
        if plot_quality_vs_kv(results, tmp / PARETO_PNG):
            plots["Quality against KV-cache size"] = PARETO_PNG
        if plot_heal_curves(results, tmp / HEAL_PNG):
            plots["Heal curves"] = HEAL_PNG
        (tmp / REPORT).write_text(markdown(results, tests, plots, iters=iters, seed=seed), encoding="utf-8")
        for name in (PARETO_PNG, HEAL_PNG, REPORT):
            if (tmp / name).exists():
                os.replace(tmp / name, run_dir / name)
            elif (run_dir / name).exists():
                (run_dir / name).unlink()
    return Rendered(run_dir / REPORT, results, tests)


def render(run_dir: Path, *, iters: int = DEFAULT_ITERS, seed: int = DEFAULT_SEED) -> Path:
    """Write RUN_DIR/report.md and its PNGs from RUN_DIR/results.json; returns report.md's path."""
    return render_report(run_dir, iters=iters, seed=seed).path


def rich_table(rendered: Rendered):
    """The report's main table for the terminal (rich)."""
    from rich import box
    from rich.table import Table

    results, tests = rendered.results, rendered.tests
    header, rows = metrics_table(results, metric_columns(results)[0], tests, sep="\n")
    table = Table(title=f"{results.name} ({results.device})", title_justify="left", box=box.SIMPLE_HEAD,
                  show_lines=True, caption=f"Δ against ref; p: paired test on the same documents, ✱ p < {ALPHA}",
                  caption_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table
