"""Evaluate loaded models with lm-evaluation-harness, in-process and offline when data is local.

lm-eval runs on the model object already in memory (`HFLM(pretrained=model)`), so a converted
checkpoint is scored with the attention variant qkvconv built, never re-loaded by lm-eval.

Offline tasks: with a data dir (`--data-dir`, or env QKVCONV_DATA_DIR), the tasks that lm-eval would
download and that qkvconv ships copies of (`LOCAL_TASKS`: lambada_openai, wikitext) are generated
from `qkvconv/tasks/*.yaml` into a temporary directory, with the absolute data file paths filled
in, and given to lm-eval's TaskManager as an include path. lm-eval 0.4.13 indexes include paths
after its own tasks and lets a later task of the same name replace an earlier one, so the local copy
keeps the name the user typed (`lambada_openai`) and results are keyed by it. Each result records
its data source (`local:<file>` or `hub:<dataset>`), read back from the task config lm-eval used.
Every other task name, and user include paths, go to lm-eval unchanged.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from qkvconv.compat import task_yaml_path
from qkvconv.errors import QkvconvError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from rich.console import Console

log = logging.getLogger(__name__)

DATA_DIR_ENV = "QKVCONV_DATA_DIR"
DEFAULT_SEED = 1234
DEFAULT_BOOTSTRAP_ITERS = 100_000  # lm-eval's default; perplexity stderr is bootstrapped
TASK_TEMPLATES = Path(__file__).parent / "tasks"
_GENERATED_PREFIX = "qkvconv-tasks-"


@dataclass(frozen=True)
class LocalTask:
    """An lm-eval task whose data qkvconv can read from a data dir instead of the hub."""

    template: str  # YAML under qkvconv/tasks/
    files: dict[str, str]  # split -> path relative to the data dir
    required: tuple[str, ...] = ("test",)  # splits that must exist for the local copy to be used


LOCAL_TASKS: dict[str, LocalTask] = {
    "lambada_openai": LocalTask("lambada_openai.yaml", {"test": "lambada_openai/lambada_test.jsonl"}),
    "gutenberg_en": LocalTask("gutenberg_en.yaml", {"test": "gutenberg_en/gutenberg_en_valid.txt"}),
    "wikitext": LocalTask(
        "wikitext.yaml",
        {
            "test": "wikitext-2-raw-v1/wiki.test.raw",
            "validation": "wikitext-2-raw-v1/wiki.valid.raw",
            "train": "wikitext-2-raw-v1/wiki.train.raw",
        },
    ),
}


# ----------------------------------------------------------------------------- task resolution


def default_data_dir() -> Path | None:
    """The data dir named by env QKVCONV_DATA_DIR, if set."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None


def local_data_files(task: str, data_dir: Path | None) -> dict[str, Path] | None:
    """split -> absolute file of `task`'s local copy under `data_dir`; None if it has no complete copy."""
    spec = LOCAL_TASKS.get(task)
    if spec is None or data_dir is None:
        return None
    files = {split: (Path(data_dir) / rel).resolve() for split, rel in spec.files.items()}
    if not all(files[split].is_file() for split in spec.required):
        return None
    return {split: path for split, path in files.items() if path.is_file()}


def write_local_task(task: str, files: dict[str, Path], directory: Path) -> Path:
    """Write the task YAML for `task`'s template with `files` as its data; returns its path."""
    template = (TASK_TEMPLATES / LOCAL_TASKS[task].template).read_text(encoding="utf-8")
    # JSON is YAML flow syntax: quoting and escaping of any path are then correct
    data = json.dumps({"data_files": {split: str(path) for split, path in files.items()}})
    path = directory / LOCAL_TASKS[task].template
    path.write_text(f"{template.rstrip()}\ndataset_kwargs: {data}\n", encoding="utf-8")
    return path


def resolve_tasks(tasks: Sequence[str], data_dir: Path | None, include_path: Sequence[Path] = ()):
    """A TaskManager that knows every requested task, and the task names to give lm-eval.

    Names may be comma-separated, lm-eval groups/tags, glob patterns (expanded here) or task YAML
    paths. Local copies of `LOCAL_TASKS` are used when `data_dir` holds their files; user
    `include_path` YAMLs come last, so a user's own task of the same name wins. Returns
    `(task_manager, names)`; the generated YAMLs live as long as the task manager.
    """
    import lm_eval.tasks as lm_eval_tasks
    from lm_eval.tasks import TaskManager

    names = [n.strip() for spec in tasks for n in str(spec).split(",") if n.strip()]
    if not names:
        raise QkvconvError("no tasks given; name lm-eval tasks, e.g. --tasks lambada_openai,wikitext")
    include = [Path(p) for p in include_path or ()]
    for p in include:
        if not p.is_dir():
            raise QkvconvError(f"task include path {p} is not a directory; pass a folder of lm-eval task YAMLs")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise QkvconvError(f"data dir {data_dir} does not exist; point --data-dir (or ${DATA_DIR_ENV}) at it")

    generated = None
    paths: list[Path] = []
    local = {t: f for t in LOCAL_TASKS if (f := local_data_files(t, data_dir))}
    if local:
        generated = tempfile.TemporaryDirectory(prefix=_GENERATED_PREFIX)
        for task, files in local.items():
            write_local_task(task, files, Path(generated.name))
        paths.append(Path(generated.name))
    for task in LOCAL_TASKS:
        if data_dir is not None and task not in local and task in names:
            log.warning("%s: no local copy under %s; lm-eval will fetch it from the hub", task, data_dir)

    with _quiet_lm_eval():
        manager = TaskManager(include_path=[str(p) for p in paths + include] or None)
    manager._qkvconv_generated = generated  # removed when the manager is garbage-collected
    builtin = Path(lm_eval_tasks.__file__).parent
    for task in local:
        entry = manager.task_index.get(task)
        where = task_yaml_path(entry)
        if where is None or Path(where).resolve().is_relative_to(builtin.resolve()):
            raise QkvconvError(
                f"this lm-eval version did not let the local copy of '{task}' replace its own task; "
                "install lm-eval>=0.4.13 or leave out --data-dir"
            )

    return manager, expand_task_names(manager, names)


def expand_task_names(manager, names: Sequence[str]) -> list[str]:
    """`names` checked against `manager`'s index, globs expanded, duplicates dropped; QkvconvError if unknown."""
    resolved: list[str] = []
    for name in names:
        if name in manager.all_tasks:
            found = [name]
        elif any(c in name for c in "*?["):
            found = sorted(manager.match_tasks([name]))
        elif name.endswith((".yaml", ".yml")) and Path(name).is_file():
            found = [str(Path(name).resolve())]
        else:
            found = []
        if not found:
            raise QkvconvError(_unknown_task_message(name, manager.all_tasks))
        resolved += [f for f in found if f not in resolved]
    return resolved


def _unknown_task_message(name: str, known: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (
        f"unknown lm-eval task '{name}'{hint}; list tasks with `lm-eval ls tasks`, "
        "or pass --include-path DIR holding its YAML"
    )


def task_sources(results: dict) -> dict[str, str]:
    """task -> where lm-eval read its data: `local:<file>` or `hub:<dataset>[ (<config>)]`."""
    out = {}
    for task, cfg in (results.get("configs") or {}).items():
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict) and files:
            split = next((s for s in (cfg.get("test_split"), cfg.get("validation_split")) if s in files), None)
            out[task] = f"local:{files[split] if split else next(iter(files.values()))}"
        elif isinstance(files, (str, list)) and files:
            out[task] = f"local:{files if isinstance(files, str) else ', '.join(map(str, files))}"
        else:
            name = cfg.get("dataset_name")
            out[task] = f"hub:{cfg.get('dataset_path')}" + (f" ({name})" if name else "")
    return out


def _data_files(results: dict) -> list[str]:
    files: list[str] = []
    for cfg in (results.get("configs") or {}).values():
        data = (cfg.get("dataset_kwargs") or {}).get("data_files")
        values = data.values() if isinstance(data, dict) else [data] if isinstance(data, str) else data or []
        files += [str(v) for v in values if str(v) not in files]
    return files


# ----------------------------------------------------------------------------- running lm-eval


class _DropExpected(logging.Filter):
    """Drops lm-eval log lines that are expected when qkvconv drives it (in-memory model, local tasks)."""

    NOISE = (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
        "Custom kwargs can be passed to `--metadata`",
        _GENERATED_PREFIX,  # "Task 'x' from <generated dir> overrides existing task": the local copy, on purpose
        "is defined, but aggregation is not. using default",  # lm-eval's own wikitext YAML relies on defaults
        "is defined, but higher_is_better is not. using default",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.NOISE)


_LM_EVAL_LOGGERS = ("lm_eval.models.huggingface", "lm_eval.api.task", "lm_eval.tasks._index", "lm_eval.evaluator")


VERBOSE_ENV = "QKVCONV_VERBOSE"  # set (by `qkvconv --verbose`): third-party bars and lines are left alone


@contextlib.contextmanager
def _quiet_third_party() -> Iterator[None]:
    """Inside, no third-party progress bar is drawn (tqdm: lm-eval's "Running loglikelihood requests",
    "bootstrapping for stddev", datasets' and transformers' bars) and lm-eval does not run `git describe`
    (whose "fatal: not a git repository" goes straight to the terminal); qkvconv's own rich display is the only
    progress. Nothing changes with QKVCONV_VERBOSE set."""
    if os.environ.get(VERBOSE_ENV):
        yield
        return
    import tqdm.std

    init = tqdm.std.tqdm.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    patches = [(tqdm.std.tqdm, "__init__", quiet_init)]
    try:
        import lm_eval.evaluator as evaluator

        if hasattr(evaluator, "get_git_commit_hash"):  # lm-eval 0.4.12, 0.4.13
            patches.append((evaluator, "get_git_commit_hash", lambda: None))
    except ImportError:  # pragma: no cover
        pass
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval at WARNING, its expected warnings dropped, its print()s discarded (to stderr with --verbose), its
    bars and git lookup silenced (_quiet_third_party)."""
    root = logging.getLogger("lm_eval")
    level = root.level
    if root.getEffectiveLevel() < logging.WARNING:
        root.setLevel(logging.WARNING)
    drop = _DropExpected()
    loggers = [logging.getLogger(n) for n in _LM_EVAL_LOGGERS]
    for lg in loggers:
        lg.addFilter(drop)
    # lm-eval print()s ("bootstrapping for stddev: perplexity") go nowhere, or to stderr with --verbose
    sink = sys.stderr if os.environ.get(VERBOSE_ENV) else io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), _quiet_third_party():
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)
        root.setLevel(level)


def pick_device(device: str | None) -> str:
    """`device`, or cuda when available and cpu otherwise for None / "auto"."""
    if device and device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _jsonable(obj: Any) -> Any:
    """lm-eval's results as plain JSON: torch dtypes, paths, numpy scalars -> str/float; inf/nan -> None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _jsonable(obj.item())  # numpy / torch scalar
    return str(obj)


def _evaluate_loaded(
    model, tokenizer, task_manager, names: list[str], *, limit: int | None, batch_size: int, device: str,
    seed: int, bootstrap_iters: int, task_limits: dict[str, int] | None = None, log_samples: bool = False,
) -> dict:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise QkvconvError(f"batch size must be a positive integer, got {batch_size!r}")
    task_limits = task_limits or {}
    for what, value in [("limit", limit)] + [(f"limit of {t}", v) for t, v in task_limits.items()]:
        if value is not None and value <= 0:
            raise QkvconvError(f"{what} must be positive (or omitted for the full task), got {value!r}")
    if getattr(model, "hf_device_map", None) is None:  # models dispatched by accelerate stay where they are
        model = model.to(device)
    model.eval()
    groups: dict[int | None, list[str]] = {}
    for name in names:  # tasks with their own limit run in their own lm-eval call, merged below
        groups.setdefault(task_limits.get(name, limit), []).append(name)
    merged: dict | None = None
    for group_limit, group in groups.items():
        results = _simple_evaluate(model, tokenizer, task_manager, group, limit=group_limit, batch_size=batch_size,
                                   device=device, seed=seed, bootstrap_iters=bootstrap_iters, log_samples=log_samples)
        if log_samples:  # lm-eval's per-document records, reduced to what a paired test needs
            results["samples"] = extract_samples(results)
        merged = results if merged is None else _merge_results(merged, results)
    merged["data_sources"] = task_sources(merged)
    return merged


def _merge_results(a: dict, b: dict) -> dict:
    """lm-eval results of two calls on disjoint tasks as one: per-task tables joined, the first call's config."""
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "config":
            out[key] = {**out[key], **value}
        else:
            out.setdefault(key, value)
    return out


def _simple_evaluate(model, tokenizer, task_manager, names, *, limit, batch_size, device, seed, bootstrap_iters,
                     log_samples: bool = False) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with _quiet_lm_eval():
        # a model object is used as is: HFLM ignores `device` and `dtype` for it, but `batch_size` is
        # what its loglikelihood and loglikelihood_rolling loops batch requests by
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=batch_size)
        assert lm.batch_size == batch_size
        results = simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=task_manager,
            limit=limit,
            batch_size=batch_size,  # recorded in results["config"]; the LM object already has it
            device=device,
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if results is None:  # only non-zero distributed ranks get None
        raise QkvconvError("lm-eval returned no results (non-zero rank of a distributed run)")
    return dict(results)


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | None,
    batch_size: int,
    device: str | None,
    data_dir: Path | None,
    include_path: Sequence[Path] = (),
    seed: int = DEFAULT_SEED,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
    log_samples: bool = False,
) -> dict:
    """Run lm-eval on an already-loaded transformers model (moved to `device`); its results dict, as JSON.

    The dict is lm-eval's (`results`, `versions`, `configs`, `n-samples`, `config`, ...) with
    non-JSON values converted, plus `data_sources`: task -> `local:<file>` / `hub:<dataset>`, and with
    `log_samples` the per-document scores (`samples`, see extract_samples).
    """
    task_manager, names = resolve_tasks(tasks, data_dir, include_path)
    results = _evaluate_loaded(
        model, tokenizer, task_manager, names, limit=limit, batch_size=batch_size, device=pick_device(device),
        seed=seed, bootstrap_iters=bootstrap_iters, log_samples=log_samples,
    )
    return _jsonable(results)


# ----------------------------------------------------------------------------- reports


@dataclass
class EvalEntry:
    """One model to evaluate. `load` is called once; the model is freed after its evaluation."""

    name: str
    load: Callable[[], tuple[Any, Any]]  # () -> (model, tokenizer)
    num_parameters: int
    kv_cache_bytes_per_token: int
    source_hash: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """One lm-eval metric of one task, e.g. task "lambada_openai", name "acc" (filter "none" left out)."""

    task: str
    name: str
    value: float
    stderr: float | None
    higher_is_better: bool | None


@dataclass
class EvalRow:
    name: str
    num_parameters: int
    kv_cache_bytes_per_token: int
    source_hash: str | None
    extra: dict[str, Any]
    metrics: list[Metric]
    load_seconds: float
    eval_seconds: float

    def metric(self, task: str, name: str) -> Metric | None:
        return next((m for m in self.metrics if m.task == task and m.name == name), None)


@dataclass
class EvalReport:
    """Rows in entry order (deltas are against rows[0]); `results[i]` is lm-eval's full dict for rows[i]."""

    rows: list[EvalRow]
    tasks: list[str]
    sources: dict[str, str]
    settings: dict[str, Any]
    manifest: dict[str, Any]
    results: list[dict]

    def columns(self) -> list[tuple[str, str]]:
        """(task, metric) pairs present in any row, in lm-eval's order."""
        seen: list[tuple[str, str]] = []
        for row in self.rows:
            seen += [(m.task, m.name) for m in row.metrics if (m.task, m.name) not in seen]
        return seen


def extract_metrics(results: dict) -> list[Metric]:
    """Every metric lm-eval reported, paired with its stderr ("acc,none" + "acc_stderr,none")."""
    out = []
    for task, block in (results.get("results") or {}).items():
        better = (results.get("higher_is_better") or {}).get(task) or {}
        for key, value in block.items():
            metric, sep, flt = key.partition(",")
            if not sep or metric.endswith("_stderr") or not _is_number(value):
                continue  # "alias", "sample_len", stderrs, "N/A"
            stderr = block.get(f"{metric}_stderr,{flt}")
            out.append(
                Metric(
                    task=task,
                    name=metric if flt == "none" else key,
                    value=float(value),
                    stderr=float(stderr) if _is_number(stderr) else None,
                    higher_is_better=better.get(metric),
                )
            )
    return out


def extract_samples(results: dict) -> dict:
    """lm-eval's `log_samples` records reduced to what a paired test needs (qkvconv.run/1's `samples`); the
    reduction is experiment_report.samples_from_lm_eval, the one place that knows the contract."""
    from qkvconv.experiment_report import samples_from_lm_eval

    return samples_from_lm_eval(results)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _release_memory() -> None:
    """Collect the evaluated model (its last reference just dropped) and return cached GPU memory."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def evaluate_models(
    entries: Sequence[EvalEntry],
    *,
    tasks: Sequence[str],
    limit: int | None,
    batch_size: int,
    device: str | None,
    data_dir: Path | None,
    include_path: Sequence[Path] = (),
    output: Path | None = None,
    seed: int = DEFAULT_SEED,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
    console: Console | None = None,
    task_limits: dict[str, int] | None = None,
    log_samples: bool = False,
    resolved: tuple[Any, list[str]] | None = None,
) -> EvalReport:
    """Evaluate each entry on `tasks` (one load each, freed after); write JSON to `output` if given.

    log_samples: each entry's results also hold `samples`, its per-document scores (extract_samples).
    resolved: resolve_tasks' (task manager, names) for these tasks, reused across calls (indexing lm-eval's tasks
    takes seconds)."""
    from rich.console import Console

    from qkvconv.manifest import hash_path, manifest
    from qkvconv.report import format_eval_report_json

    if not entries:
        raise QkvconvError("no models to evaluate")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise QkvconvError(f"model names must be unique in one evaluation, got {names}")
    console = console or Console(stderr=True)
    device = pick_device(device)
    task_manager, task_names = resolved or resolve_tasks(tasks, data_dir, include_path)
    task_limits = dict(task_limits or {})
    if unknown := sorted(set(task_limits) - set(task_names)):
        raise QkvconvError(f"--task-limit names {', '.join(unknown)}, not among the tasks ({', '.join(task_names)})")

    rows: list[EvalRow] = []
    all_results: list[dict] = []
    for i, entry in enumerate(entries, 1):
        tag = f"[bold]\\[{i}/{len(entries)}] {entry.name}[/]"
        console.print(f"{tag}: loading")
        t0 = time.perf_counter()
        model, tokenizer = entry.load()
        t1 = time.perf_counter()
        console.print(
            f"{tag}: loaded in {t1 - t0:.1f} s; lm-eval {', '.join(task_names)} "
            f"(limit {limit if limit is not None else 'none'}"
            f"{''.join(f', {t} {n}' for t, n in task_limits.items())}, batch {batch_size}, {device})"
        )
        try:
            results = _evaluate_loaded(
                model, tokenizer, task_manager, task_names, limit=limit, batch_size=batch_size, device=device,
                seed=seed, bootstrap_iters=bootstrap_iters, task_limits=task_limits, log_samples=log_samples,
            )
        finally:
            del model, tokenizer
            _release_memory()
        t2 = time.perf_counter()
        metrics = extract_metrics(results)
        rows.append(
            EvalRow(
                name=entry.name, num_parameters=entry.num_parameters,
                kv_cache_bytes_per_token=entry.kv_cache_bytes_per_token, source_hash=entry.source_hash,
                extra=dict(entry.extra), metrics=metrics, load_seconds=t1 - t0, eval_seconds=t2 - t1,
            )
        )
        all_results.append(_jsonable(results))
        summary = ", ".join(f"{m.task} {m.name} {m.value:.4g}" for m in metrics[:4])
        console.print(f"{tag}: done in {t2 - t1:.1f} s: {summary}")

    sources: dict[str, str] = {}
    versions: dict[str, Any] = {}
    data_files: list[str] = []
    for res in all_results:
        sources.update(res.get("data_sources") or {})
        versions.update(res.get("versions") or {})
        data_files += [f for f in _data_files(res) if f not in data_files]
    settings = {
        "tasks": task_names, "limit": limit, "task_limits": task_limits, "seed": seed, "batch_size": batch_size, "device": device,
        "bootstrap_iters": bootstrap_iters, "data_dir": str(data_dir) if data_dir is not None else None,
        "include_path": [str(p) for p in include_path or ()],
    }
    report = EvalReport(
        rows=rows,
        tasks=task_names,
        sources=sources,
        settings=settings,
        manifest=manifest(
            command="evaluate",
            **settings,
            task_versions=versions,
            data_sources=sources,
            inputs={
                "models": {e.name: e.source_hash for e in entries},
                "data": {f: hash_path(f) for f in data_files if Path(f).is_file()},
            },
        ),
        results=all_results,
    )
    if output is not None:
        write_json(Path(output), format_eval_report_json(report))
        console.print(f"wrote {output}")
    return report


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` atomically (temp file + rename), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
