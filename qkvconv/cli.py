"""The `qkvconv` command line: parse, call the library, render with rich. No tensor code here."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from qkvconv.errors import QkvconvError, interrupted_by
from qkvconv.options import (AbsorbQueryOptions, AttachPreprojOptions, AttachQueryMlpOptions, EvalOptions,
                             FinetuneOptions, LatentKvOptions, ShareKvOptions)

app = typer.Typer(
    name="qkvconv",
    help="Rewrite the attention projections of transformer checkpoints, prove the rewrite, evaluate it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)
_state = {"debug": False}

# ------------------------------------------------------------------------------ shared option types
Model = Annotated[str, typer.Argument(help="HF model directory, .gguf file, or hub id.", show_default=False)]
Output = Annotated[Path, typer.Option("--output", "-o", help="Directory to write (refused if it exists).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickled .bin weights (they can run code).")]
Calib = Annotated[
    Optional[Path],
    typer.Option("--calib", help="Calibration text file; default: qkvconv's shipped public-domain text; "
                 "'sample': sequences sampled from the original model."),
]
Seed = Annotated[int, typer.Option("--seed", help="Seed for calibration sampling and evaluation.")]
DataDir = Annotated[
    Optional[Path],
    typer.Option("--data-dir", envvar="QKVCONV_DATA_DIR", help="Offline data folder (lambada_openai/, wikitext-2-raw-v1/, ...)."),
]
Dtype = Annotated[str, typer.Option("--dtype", help="float32 | float64 | bfloat16 | float16.")]
OutDtype = Annotated[str, typer.Option("--dtype", help="Output dtype: auto (the checkpoint's own) | float32 | float64 | bfloat16 | float16.")]
Verify = Annotated[bool, typer.Option("--verify/--no-verify", help="Verify on calibration text while streaming (--no-verify: only convert and write).")]
DecodeCheck = Annotated[str, typer.Option("--decode-check", help="auto (when both models fit in a quarter of free memory) | always | never.")]
ConvDevice = Annotated[str, typer.Option("--device", help="Where calibration, fits and verification run: cpu | cuda | cuda:N.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Check the input and show what would change, the memory, disk and time it needs; write nothing.")]


def _calib(calib: Path | None) -> str | None:
    return None if calib is None else str(calib)


def uses(options: type, *, invocation: tuple[str, ...] = (), renamed: dict[str, str] | None = None):
    """Declare the options model a command builds from its flags: every parameter is a field of `options`
    (under its `renamed` name), except the `invocation` ones (where it reads and writes). tests/test_recipe.py
    checks this, so a flag and a recipe key cannot drift apart."""

    def mark(fn):
        fn.qkvconv_options = (options, frozenset(invocation), dict(renamed or {}))
        return fn

    return mark


def _options(cls: type, **values):
    """cls(**values); a value pydantic refuses becomes one QkvconvError line naming the flag."""
    import pydantic

    from qkvconv.options import error_message

    try:
        return cls(**values)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else ""
        raise QkvconvError(f"{flag} {values.get(first['loc'][0]) if first['loc'] else ''}: {error_message(first)}"
                           if flag else error_message(first)) from None


CONVERT_INVOCATION = ("model", "output", "force", "allow_pickle", "dry_run")


def _conversion(options, model: str, output: Path, *, dry_run: bool, force: bool, allow_pickle: bool):
    """Run a conversion from its options under a status line that follows its progress; returns its report."""
    if dry_run:
        return options.convert(model, output, force=force, allow_pickle=allow_pickle, dry_run=True)
    with err.status("starting") as status:
        return options.convert(model, output, force=force, allow_pickle=allow_pickle,
                               progress=lambda step: status.update(f"{step}…"))


def dry_run_table(d) -> Table:
    gb = 1e9
    t = Table(title=f"{d.transform} --dry-run: {d.source} (nothing written)", title_justify="left", show_header=False)
    t.add_column(justify="left")
    t.add_column(justify="left")
    removed = ", ".join(d.removed) or "none"
    added = ", ".join(d.added) or "none"
    t.add_row("layers", f"{d.layers}, output dtype {d.dtype}")
    t.add_row("tensors removed per layer", removed)
    t.add_row("tensors added or rewritten per layer", added)
    t.add_row("parameters", f"{d.params_before:,} → {d.params_after:,} ({d.params_after - d.params_before:+,})")
    kb, ka = d.kv_cache_bytes_per_token
    t.add_row("KV cache per token", f"{kb:,} → {ka:,} bytes ({ka / kb:.1%})" if kb else f"{kb:,} → {ka:,} bytes")
    t.add_row("checkpoint / output on disk", f"{d.checkpoint_bytes / gb:.2f} GB / {d.output_bytes / gb:.2f} GB "
              f"({d.disk_free_bytes / gb:.1f} GB free)")
    t.add_row("estimated peak memory", f"{d.peak_memory_bytes / gb:.2f} GB")
    t.add_row("plain copy (estimate)", f"{d.copy_seconds:.1f} s (read measured at {d.read_bytes_per_s / gb:.2f} GB/s "
              "on layer 0, write assumed as fast)")
    t.caption = "; ".join(d.notes)
    t.caption_justify = "left"
    return t


def _print_report(report, table) -> None:
    from qkvconv.convert import DryRun

    if isinstance(report, DryRun):
        out.print(dry_run_table(report))
        return
    out.print(table(report))
    if report.output is not None:
        out.print(f"wrote [bold]{report.output}[/]")


def _dtype(name: str):
    from qkvconv.options import torch_dtype

    return torch_dtype(name)


def _quiet_libraries() -> None:
    """Third-party bars and log lines off, so qkvconv's rich output is all there is (unless --verbose).

    datasets' bars are turned off by its environment variable, which it reads when it is first imported: importing it
    here (for disable_progress_bars) brought in pandas and pyarrow, 0.5 s and 83 MB of RSS (43 MB anonymous) in every
    command, conversions included, that never read a dataset. A value the user set is kept, as datasets itself
    gives it priority over its function."""
    import sys

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if _state.get("verbose"):
        return
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # imported already (qkvconv used as a library): its own switch
        sys.modules["datasets"].disable_progress_bars()


def command(fn):
    """Turn QkvconvError into one red line and exit 1 (full traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        interrupted_by.clear()
        try:
            _quiet_libraries()
            return fn(*args, **kwargs)
        except QkvconvError as e:
            if _state["debug"]:
                raise
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(e, "exit_code", 1)) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]: nothing was written")
            raise typer.Exit(130) from None
        except Exception:
            if not interrupted_by or _state["debug"]:
                raise
            err.print("[bold red]interrupted[/]: nothing was written")  # the interrupt, wrapped by a library
            raise typer.Exit(130) from None

    return wrapper


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Let third-party progress bars and log lines through.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print versions, device and tested ranges (= qkvconv env).")] = False,
) -> None:
    from qkvconv.compat import warn_if_untested

    _state["debug"] = debug
    _state["verbose"] = verbose
    if verbose:
        from qkvconv.evaluate import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    if version:
        env(as_json=False)
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())
        raise typer.Exit(0)
    if ctx.invoked_subcommand != "env":
        warn_if_untested()


# ---------------------------------------------------------------------------------------------- env
@app.command()
def env(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """Versions of qkvconv, torch, transformers, lm-eval, accelerate…, the device, and which are in the tested range."""
    from qkvconv.compat import environment

    info = environment()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    t = Table(title="qkvconv env", title_justify="left")
    for col in ("package", "version", "tested range", "in range"):
        t.add_column(col)
    for name, p in info["packages"].items():
        tested = " … ".join(p["tested"]) if "tested" in p else "-"
        verdict = {True: "[green]yes[/]", False: "[bold red]NO[/]", None: "-"}[p.get("in_range")]
        t.add_row(name, p["version"] or "[red]not installed[/]", tested, verdict)
    t.caption = f"python {info['python']}; device: {info['device']}"
    t.caption_justify = "left"
    out.print(t)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


# ------------------------------------------------------------------------------------------ inspect
@app.command()
@command
def inspect(
    model: Model,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Architecture, sizes, parameter counts, KV-cache bytes/token, W_Q conditioning, applicable transforms."""
    from qkvconv.checkpoint import load
    from qkvconv.describe import describe

    with err.status("loading model"):
        info = describe(load(model, allow_pickle=allow_pickle))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    t = Table(title=f"qkvconv inspect: {Path(info['source']).name}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for key in ("architecture", "family", "num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "norm", "positional", "rotary_dim", "attention_bias", "qk_norm", "parallel_residual",
                "tied_embeddings", "dtype", "kv_cache_bytes_per_token"):
        t.add_row(key, _fmt(info[key]))
    n = info["num_parameters"]
    t.add_row("parameters", f"{n['total']:,} total, {n['non_embedding']:,} non-embedding, {n['attention']:,} attention")
    c = info["wq_condition"]
    if c["min"] is not None:
        t.add_row("cond(W_Q)", f"min {c['min']:.3g}  median {c['median']:.3g}  max {c['max']:.3g}")
    if info["qkvconv_layers"]:
        kinds = sorted({json.dumps(x, sort_keys=True) for x in info["qkvconv_layers"]})
        t.add_row("qkvconv layers", "; ".join(kinds))
    if info.get("attached_parameters"):
        t.add_row("attached modules", ", ".join(f"{k} {v:,}" for k, v in info["attached_parameters"].items()))
    for name, verdict in info["transforms"].items():
        mark = "[green]yes[/]" if verdict["applies"] else "[red]no[/]"
        t.add_row(name, f"{mark}: {verdict['why']}")
    out.print(t)


# ------------------------------------------------------------------------------------- absorb-query
@app.command("absorb-query")
@command
@uses(AbsorbQueryOptions, invocation=CONVERT_INVOCATION)
def absorb_query(
    model: Model,
    output: Output,
    mode: Annotated[str, typer.Option("--mode", help="exact (basis change, lossless) or drop (remove W_Q, lossy).")] = "exact",
    calib: Calib = None,
    num_seqs: Annotated[Optional[int], typer.Option("--num-seqs", help="Calibration sequences (default 1 for exact, 8 for drop).")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Calibration sequence length.")] = 128,
    atol: Annotated[Optional[float], typer.Option("--atol", help="exact: also fail if max |Δlogit| exceeds this (an extra absolute bound).")] = None,
    dtype: OutDtype = "auto",
    folded_dtype: Annotated[str, typer.Option("--folded-dtype", help="exact: precision of the folded maps (norm affine, W_Q⁻¹W_K, W_Q⁻¹W_V): float64, float32, or output (the --dtype).")] = "float64",
    seed: Seed = 0,
    force: Force = False,
    allow_pickle: AllowPickle = False,
    verify: Verify = True,
    decode_check: DecodeCheck = "auto",
    device: ConvDevice = "cpu",
    dry_run: DryRun = False,
) -> None:
    """Make the query projection the identity (METHODS.md §1), verify against the original, write OUTPUT."""
    options = _options(AbsorbQueryOptions, mode=mode, calib=_calib(calib), num_seqs=num_seqs, seq_len=seq_len,
                       atol=atol, dtype=dtype, folded_dtype=folded_dtype, seed=seed, verify=verify,
                       decode_check=decode_check, device=device)
    report = _conversion(options, model, output, dry_run=dry_run, force=force, allow_pickle=allow_pickle)
    _print_report(report, verification_table)


# --------------------------------------------------------------------------------------------- eval
def eval_entry(model: str, *, dtype, allow_pickle: bool, trust_remote_code: bool, name: str | None = None):
    """An EvalEntry for a checkpoint; its size figures are filled in when the model is loaded."""
    from qkvconv.checkpoint import load, resolve_source
    from qkvconv.describe import kv_cache_bytes_per_token, parameter_counts
    from qkvconv.evaluate import EvalEntry
    from qkvconv.manifest import hash_path

    source = resolve_source(model, allow_pickle=allow_pickle)

    def _load():
        loaded = load(source, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        entry.num_parameters = parameter_counts(loaded.model, loaded.spec)["total"]
        entry.kv_cache_bytes_per_token = kv_cache_bytes_per_token(loaded.config, loaded.spec, dtype)
        return loaded.model, loaded.tokenizer

    entry = EvalEntry(name=name or source.label, load=_load, num_parameters=0, kv_cache_bytes_per_token=0,
                      source_hash=hash_path(source.path))
    return entry


Tasks = Annotated[str, typer.Option("--tasks", help="Comma-separated lm-eval task names.")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Evaluate only the first N documents of each task.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="lm-eval batch size.")]
Device = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available).")]


@app.command("eval")
@command
@uses(EvalOptions, invocation=("models", "output", "allow_pickle", "trust_remote_code"), renamed={"task_limit": "task_limits"})
def eval_(
    models: Annotated[list[str], typer.Argument(help="Checkpoints to compare; deltas are against the first.")],
    tasks: Tasks = "lambada_openai",
    limit: Limit = None,
    task_limit: Annotated[Optional[list[str]], typer.Option(
        "--task-limit", help="TASK=N: a task's own limit (repeatable), e.g. wikitext=10 next to --limit 500.")] = None,
    batch_size: BatchSize = 16,
    device: Device = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write results + manifest as JSON.")] = None,
    include_path: Annotated[Optional[list[Path]], typer.Option("--include-path", help="Folder of extra lm-eval task YAMLs.")] = None,
    data_dir: DataDir = None,
    dtype: Dtype = "float32",
    seed: Seed = 1234,
    allow_pickle: AllowPickle = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow a checkpoint's own modeling code.")] = False,
) -> None:
    """Run lm-evaluation-harness on each model and print one before/after table."""
    from qkvconv.report import eval_table

    options = _options(EvalOptions, tasks=tasks, limit=limit, task_limits=_task_limits(task_limit or []),
                       batch_size=batch_size, device=device, include_path=[str(p) for p in include_path or []],
                       data_dir=str(data_dir) if data_dir else None, dtype=dtype, seed=seed)
    entries = [eval_entry(m, dtype=_dtype(dtype), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
               for m in models]
    _dedupe_names(entries)
    report = options.evaluate(entries, output=output, console=err)
    out.print(eval_table(report))


def _task_limits(specs: list[str]) -> dict[str, int]:
    """["wikitext=10", ...] -> {"wikitext": 10}; QkvconvError on anything else."""
    limits = {}
    for spec in specs:
        task, _, n = spec.partition("=")
        if not task.strip() or not n.strip().isdigit() or int(n) < 1:
            raise QkvconvError(f"--task-limit {spec!r}: expected TASK=N with N a positive integer, e.g. wikitext=10")
        limits[task.strip()] = int(n)
    return limits


def _dedupe_names(entries) -> None:
    seen: dict[str, int] = {}
    for e in entries:
        seen[e.name] = seen.get(e.name, 0) + 1
        if seen[e.name] > 1:
            e.name = f"{e.name} ({seen[e.name]})"


# --------------------------------------------------------------------------------------------- demo
@app.command()
@command
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the converted checkpoint and results go.")] = Path("out/demo"),
    limit: Limit = 500,
    batch_size: BatchSize = 16,
    data_dir: DataDir = None,
) -> None:
    """The main job on the default real checkpoint (SmolLM2-135M-Instruct GGUF): absorb-query --mode exact,
    then LAMBADA on the original and the converted model, one table. Replaces its own earlier output."""
    from qkvconv.convert import absorb_query_checkpoint
    from qkvconv.defaults import default_checkpoint
    from qkvconv.evaluate import evaluate_models
    from qkvconv.report import eval_table

    src = default_checkpoint()
    converted = workdir / "smollm2-135m-noq"
    with err.status("absorb-query --mode exact") as status:
        report = absorb_query_checkpoint(src, converted, force=True, progress=lambda s: status.update(f"absorb-query: {s}…"))
    out.print(verification_table(report))
    entries = [eval_entry(str(src), dtype=_dtype("float32"), allow_pickle=False, trust_remote_code=False, name="SmolLM2-135M (GGUF)"),
               eval_entry(str(converted), dtype=_dtype("float32"), allow_pickle=False, trust_remote_code=False, name="absorb-query exact")]
    results = evaluate_models(entries, tasks=["lambada_openai"], limit=limit, batch_size=batch_size, device=None,
                              data_dir=data_dir, output=workdir / "results.json", console=err)
    out.print(eval_table(results))


def _unverified_table(report) -> Table:
    t = Table(title=f"{report.transform}: not verified (--no-verify)", title_justify="left")
    t.add_column("output")
    t.add_column("timings")
    t.add_row(f"{report.output_bytes / 1e9:.2f} GB", ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items()
                                                             if isinstance(v, (int, float))))
    return t


def _timings_line(timings: dict) -> str:
    return ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if isinstance(v, (int, float)))


def verification_table(report) -> Table:
    import statistics

    if report.error is None:
        return _unverified_table(report)
    e, cond = report.error, [c for c in report.wq_condition if c == c]
    how = (f"--mode {report.options['mode']}" if "mode" in report.options
           else f"--kv-rank {report.options['kv_rank']}" if "kv_rank" in report.options else "")
    t = Table(title=f"{report.transform} {how}: verification", title_justify="left")
    for col in ("max |Δlogit|", "mean |Δlogit|", "max rel", "KL (nats/token)", "top-1 agree", "cond(W_Q) min/med/max"):
        t.add_column(col, justify="right")
    t.add_row(f"{e.max_abs:.3g}", f"{e.mean_abs:.3g}", f"{e.max_rel:.3g}", f"{e.kl:.3g}", f"{100 * e.top1_agreement:.2f}%",
              f"{min(cond):.3g} / {statistics.median(cond):.3g} / {max(cond):.3g}" if cond else "n/a")
    verdict = exactness_line(report.exactness) if report.exactness is not None else "lossy by design: finetune to heal"
    t.caption = (f"on {e.tokens} tokens, {e.source}; {_timings_line(report.timings)}\n{verdict}\n"
                 f"{decoding_line(report.decoding, report.decode_skipped)}")
    t.caption_justify = "left"
    return t


def exactness_line(x) -> str:
    """Algebra and rounding of an exact conversion, with the bounds it passed."""
    on = f" on {x.algebra_tokens} tokens" if x.algebra_tokens and x.algebra_tokens != x.tokens else ""
    return (f"exact: float64 algebra{on} max |Δlogit| {x.algebraic_max_abs:.2g} = {x.algebraic_rel:.2g} of max |logit| "
            f"(bound {x.algebraic_bound:g}); {x.dtype} rounding {x.rounding_ratio:.2f}× the original's own on average, "
            f"{x.rounding_max_ratio:.2f}× at the max (bounds {x.ratio_bound:g}×, {x.max_ratio_bound:g}×): passed")


def decoding_line(d, skipped: str | None = None) -> str:
    """The decode check in one line: cached vs uncached greedy decoding, and agreement with the original."""
    if d is None:
        return f"decoding: not checked ({skipped})" if skipped else "decoding: not checked"
    return (f"decoding ({d.prompts} prompts × {d.new_tokens} greedy tokens): cached = uncached on "
            f"{100 * d.cached_vs_uncached:.1f}% (max |Δlogit| {d.max_abs_gap:.2g}, original's own {d.original_gap:.2g}; "
            f"{d.mismatches} beyond ties: passed), cache holds {d.cache_tokens}/{d.expected_cache_tokens} tokens; "
            f"original's choice on {100 * d.vs_original:.1f}%, {d.identical_to_original}/{d.prompts} continuations identical")


# -------------------------------------------------- attach-query-mlp, attach-preproj, finetune (issue #4)
CalibSeqs = Annotated[int, typer.Option("--num-seqs", help="Calibration sequences to verify on.")]
CalibLen = Annotated[int, typer.Option("--seq-len", help="Length of the verification sequences.")]
AttachAtol = Annotated[Optional[float], typer.Option("--atol", help="Also fail if max |Δlogit| at step 0 exceeds this (an extra absolute bound).")]


def _attach_table(report) -> Table:
    if report.error is None:
        return _unverified_table(report)
    e = report.error
    t = Table(title=f"{report.transform}: verification at step 0", title_justify="left")
    for col in ("max |Δlogit|", "mean |Δlogit|", "KL (nats/token)", "top-1 agree", "added parameters"):
        t.add_column(col, justify="right")
    added = ", ".join(f"{k} {v:,}" for k, v in report.added.items())
    t.add_row(f"{e.max_abs:.3g}", f"{e.mean_abs:.3g}", f"{e.kl:.3g}", f"{100 * e.top1_agreement:.2f}%", added)
    t.caption = (f"on {e.tokens} tokens, {e.source}; {_timings_line(report.timings)}\n"
                 f"{exactness_line(report.exactness)}\n{decoding_line(report.decoding, report.decode_skipped)}")
    t.caption_justify = "left"
    return t


@app.command("attach-query-mlp")
@command
@uses(AttachQueryMlpOptions, invocation=CONVERT_INVOCATION)
def attach_query_mlp(
    model: Model,
    output: Output,
    rank: Annotated[Optional[int], typer.Option("--rank", help="Hidden width R of f (default: query size / 2).")] = None,
    act: Annotated[str, typer.Option("--act", help="Activation inside f: gelu | silu | relu.")] = "gelu",
    calib: Calib = None,
    num_seqs: CalibSeqs = 4,
    seq_len: CalibLen = 64,
    atol: AttachAtol = None,
    dtype: OutDtype = "auto",
    seed: Seed = 0,
    force: Force = False,
    allow_pickle: AllowPickle = False,
    verify: Verify = True,
    decode_check: DecodeCheck = "auto",
    device: ConvDevice = "cpu",
    dry_run: DryRun = False,
) -> None:
    """Add a zero-started nonlinear residual query q = X + f(X) (METHODS.md §2), verify, write OUTPUT."""
    options = _options(AttachQueryMlpOptions, rank=rank, act=act, calib=_calib(calib), num_seqs=num_seqs,
                       seq_len=seq_len, atol=atol, dtype=dtype, seed=seed, verify=verify, decode_check=decode_check,
                       device=device)
    report = _conversion(options, model, output, dry_run=dry_run, force=force, allow_pickle=allow_pickle)
    _print_report(report, _attach_table)


@app.command("attach-preproj")
@command
@uses(AttachPreprojOptions, invocation=CONVERT_INVOCATION)
def attach_preproj(
    model: Model,
    output: Output,
    expansion: Annotated[float, typer.Option("--expansion", help="Hidden width of the pre-projection MLP / hidden size.")] = 1.25,
    skip: Annotated[bool, typer.Option("--skip/--no-skip", help="Add the content skip W_skip·x̃ to the attention output.")] = True,
    calib: Calib = None,
    num_seqs: CalibSeqs = 4,
    seq_len: CalibLen = 64,
    atol: AttachAtol = None,
    dtype: OutDtype = "auto",
    seed: Seed = 0,
    force: Force = False,
    allow_pickle: AllowPickle = False,
    verify: Verify = True,
    decode_check: DecodeCheck = "auto",
    device: ConvDevice = "cpu",
    dry_run: DryRun = False,
) -> None:
    """Add a zero-started pre-projection MLP (+ content skip) before Q/K/V (METHODS.md §5), verify, write OUTPUT."""
    options = _options(AttachPreprojOptions, expansion=expansion, skip=skip, calib=_calib(calib), num_seqs=num_seqs,
                       seq_len=seq_len, atol=atol, dtype=dtype, seed=seed, verify=verify, decode_check=decode_check,
                       device=device)
    report = _conversion(options, model, output, dry_run=dry_run, force=force, allow_pickle=allow_pickle)
    _print_report(report, _attach_table)


@app.command("finetune")
@command
@uses(FinetuneOptions, invocation=("model", "output", "run_dir", "resume", "control", "force", "allow_pickle"))
def finetune_cmd(
    model: Model,
    output: Output,
    data: Annotated[str, typer.Option("--data", help="Text/JSONL file (field \"text\"), a folder of them, or an HF dataset name.")],
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="Held-out text (default: the first --eval-seqs windows of --data).")] = None,
    train: Annotated[str, typer.Option("--train", help="new (only modules qkvconv added) | attention | all.")] = "new",
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps.")] = None,
    tokens: Annotated[Optional[int], typer.Option("--tokens", help="Training tokens (instead of --steps).")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per packed window.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per micro-batch (per process).")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW; linear warmup, cosine decay to 0).")] = 1e-4,
    lr_new: Annotated[Optional[float], typer.Option("--lr-new", help="Peak learning rate of the modules qkvconv added (latent projections, query MLP, ...; default --lr).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps", help="Warmup steps (default 5% of steps).")] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Clip the gradient norm (0: off).")] = 1.0,
    precision: Annotated[str, typer.Option("--precision", help="fp32 | bf16 (fp32 master weights, bf16 autocast).")] = "fp32",
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate the held-out loss every N steps.")] = 50,
    eval_seqs: Annotated[int, typer.Option("--eval-seqs", help="Held-out windows.")] = 16,
    save_every: Annotated[int, typer.Option("--save-every", help="Save a resumable state every N steps (0: never).")] = 100,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="State, logs and plot (default OUTPUT.run).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run from its last saved state.")] = False,
    control: Annotated[bool, typer.Option("--control", help="Finetune the model MODEL was converted from instead (a fair control).")] = False,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed for initialisation order, data order and dropout.")] = 0,
    distill: Annotated[float, typer.Option("--distill", help="Weight α of KL(teacher ‖ model) in the loss: (1−α)·CE + α·KL (0: plain LM loss, 1: pure distillation).")] = 0.0,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="Teacher for --distill (default: the checkpoint MODEL was converted from).")] = None,
    eval_kl: Annotated[bool, typer.Option("--eval-kl", help="Also log the held-out KL to the original (or --teacher) at every eval, without distilling.")] = False,
    hf_split: Annotated[str, typer.Option("--hf-split", help="Split of an HF dataset --data.")] = "train",
    lora: Annotated[Optional[int], typer.Option("--lora", help="Train rank-R LoRA adapters (PEFT) on the --train selection's projections instead of their weights; merged into the output.")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", help="LoRA scale α: the update is (α/R)·B·A (default 2R).")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute each decoder layer's activations in the backward (less memory, ~1/3 more compute).")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Read, tokenize and pack --data on the fly (data larger than memory); resumes at the same token.")] = False,
    shuffle_buffer: Annotated[int, typer.Option("--shuffle-buffer", help="Windows in the --stream shuffle buffer.")] = 256,
    force: Force = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Finetune a (converted) checkpoint on text; write a qkvconv checkpoint, loss curves and a plot.

    Several processes (GPUs, or CPU processes with gloo): accelerate launch [--use_fsdp ...] -m qkvconv.cli
    finetune ..., or torchrun --nproc-per-node N -m qkvconv.cli finetune ...
    """
    from qkvconv.finetune import finetune

    options = _options(
        FinetuneOptions, data=data, eval_data=eval_data, train=train, steps=steps, tokens=tokens, seq_len=seq_len,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, lr_new=lr_new, warmup_steps=warmup_steps,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed, precision=precision, eval_every=eval_every, eval_seqs=eval_seqs,
        save_every=save_every, distill=distill, teacher=teacher, eval_kl=eval_kl, hf_split=hf_split, lora=lora,
        lora_alpha=lora_alpha, gradient_checkpointing=gradient_checkpointing, stream=stream,
        shuffle_buffer=shuffle_buffer, device=device,
    )
    result = finetune(model, output, options.config(), run_dir=run_dir, resume=resume, control=control,
                      device=options.device, force=force, allow_pickle=allow_pickle, show_progress=True)
    t = Table(title=f"finetune --train {train}: held-out loss", title_justify="left")
    with_kl = bool(distill or eval_kl)
    cols = ("step", "tokens", "loss", "ppl") + (("KL to teacher",) if with_kl else ())
    for col in cols:
        t.add_column(col, justify="right")
    for row in result.eval_curve:
        kl = (f"{row['kl']:.4f}",) if with_kl else ()
        t.add_row(str(row["step"]), f"{row['tokens']:,}", f"{row['loss']:.4f}", f"{row['ppl']:.3g}", *kl)
    memory = result.peak_memory_bytes if result.peak_memory_bytes is not None else result.peak_rss_bytes
    mfu = "" if result.mfu is None else f", MFU {100 * result.mfu:.1f}%"
    t.caption = (f"{result.trainable_parameters:,} trainable parameters; {result.strategy}; "
                 f"{result.tokens_per_s:,.0f} tokens/s{mfu}; peak {'GPU' if result.peak_memory_bytes is not None else 'RSS'} "
                 f"{(memory or 0) / 2**30:.2f} GiB; curves: {result.run_dir / 'curves.png'}")
    t.caption_justify = "left"
    out.print(t)
    if result.output is not None:
        out.print(f"wrote [bold]{result.output}[/]")


# ----------------------------------------------------------------------------------- share-kv (issue #3)
@app.command("share-kv")
@command
@uses(ShareKvOptions, invocation=CONVERT_INVOCATION)
def share_kv(
    model: Model,
    output: Output,
    mode: Annotated[Optional[str], typer.Option("--mode", help="k=v | q=k | q=k=v (one shared projection).")] = None,
    kv_heads: Annotated[Optional[int], typer.Option("--kv-heads", help="Pool key/value heads to N (N divides the query heads).")] = None,
    init: Annotated[str, typer.Option("--init", help="key | value | mean (data-free) or calibrated (data-aware).")] = "key",
    export: Annotated[Optional[str], typer.Option("--export", help="stock: the plain architecture, no remote code (no K=V cache saving).")] = None,
    pos2d: Annotated[Optional[int], typer.Option("--pos2d", help="q=k: add the learned asymmetric 2D positional term with P channels (multiple of 4), zero-started.")] = None,
    calib: Calib = None,
    num_seqs: Annotated[Optional[int], typer.Option("--num-seqs", help="Calibration sequences (default 16; 40 for --init calibrated, 1 in 5 held out).")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Calibration sequence length (default 128; 256 for --init calibrated).")] = None,
    dtype: OutDtype = "auto",
    seed: Seed = 0,
    force: Force = False,
    allow_pickle: AllowPickle = False,
    verify: Verify = True,
    decode_check: DecodeCheck = "auto",
    device: ConvDevice = "cpu",
    dry_run: DryRun = False,
) -> None:
    """Share projections (K=V, Q=K, Q=K=V) and/or pool KV heads (METHODS.md §3), report the damage, write OUTPUT."""
    options = _options(ShareKvOptions, mode=mode, kv_heads=kv_heads, init=init, export=export, pos2d=pos2d,
                       calib=_calib(calib), num_seqs=num_seqs, seq_len=seq_len, dtype=dtype, seed=seed, verify=verify,
                       decode_check=decode_check, device=device)
    report = _conversion(options, model, output, dry_run=dry_run, force=force, allow_pickle=allow_pickle)
    if dry_run:
        out.print(dry_run_table(report))
        return
    out.print(verification_table(report))
    _print_kv_cache(report)
    if export == "stock" and report.options["mode"] in ("k=v", "q=k=v"):
        out.print("[yellow]--export stock duplicates the shared weights: the stock cache stores K and V, "
                  "so there is no K=V cache saving[/]")
    out.print(f"wrote [bold]{report.output}[/]")


# ---------------------------------------------------------------------------------------- latent-kv (issue #16)
@app.command("latent-kv")
@command
@uses(LatentKvOptions, invocation=CONVERT_INVOCATION)
def latent_kv(
    model: Model,
    output: Output,
    kv_rank: Annotated[int, typer.Option("--kv-rank", help="Average latent size per layer (the cache holds it instead of 2 × KV heads × head_dim).", show_default=False)],
    groups: Annotated[int, typer.Option("--groups", help="One latent per group of KV heads (divides the KV heads).")] = 1,
    rank_allocation: Annotated[str, typer.Option("--rank-allocation", help="uniform (every layer --kv-rank) | greedy (by each layer's whitened K/V spectrum; measured worse than uniform on SmolLM2) | kl (by measured sensitivity: the model's KL to the original with only one layer compressed, per layer and per rank of 0.5-2 × --kv-rank, on --kl-probe-seqs fitting sequences; then the least summed KL at mean --kv-rank. Streamed, but costs a forward of the probe tokens per layer and rank. On SmolLM2 at rank 128 it lowered the held-out KL by 31 % but LAMBADA accuracy fell from 0.200 to 0.136).")] = "uniform",
    kl_probe_seqs: Annotated[Optional[int], typer.Option("--kl-probe-seqs", help="--rank-allocation kl: fitting sequences (× --seq-len tokens) the per-layer KL is measured on (default 4).", show_default=False)] = None,
    rope_pairs: Annotated[Optional[int], typer.Option("--rope-pairs", help="MHA2MLA: keep RoPE on the P frequency pairs per KV head with the largest 2-norm contribution, cached as keys beside a RoPE-free latent (--kv-rank) of the other key dims and the values; absorbed at decode. Cache: kv-rank + 2·P·KV heads values per layer.", show_default=False)] = None,
    fit: Annotated[str, typer.Option("--fit", help="kv (fit the latent to K and V themselves) | attention (weight each value error by W_O and each key error by the queries, averaged over the RoPE rotations of a --seq-len window, times the spread of the value outputs; exact at full rank; refused with per-head QK-norms. On SmolLM2 it cut the held-out KL by 40-60 %, LAMBADA acc at rank 128 0.200 → 0.226 (λ 0.3) / 0.246 (λ 0.1), but at rank 192 0.286 → 0.272).")] = "kv",
    key_weight: Annotated[Optional[float], typer.Option("--key-weight", help="--fit attention: λ, the weight of key errors against value errors (default 0.3: the least held-out KL of 0.1, 0.3, 1 on SmolLM2).", show_default=False)] = None,
    calib: Calib = None,
    num_seqs: Annotated[Optional[int], typer.Option("--num-seqs", help="Calibration sequences (default 40, 1 in 5 held out).")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Calibration sequence length (default 256).")] = None,
    dtype: OutDtype = "auto",
    seed: Seed = 0,
    force: Force = False,
    allow_pickle: AllowPickle = False,
    verify: Verify = True,
    decode_check: DecodeCheck = "auto",
    device: ConvDevice = "cpu",
    dry_run: DryRun = False,
) -> None:
    """Replace each layer's keys and values by one low-rank latent, the only thing cached (METHODS.md §6); write OUTPUT."""
    options = _options(LatentKvOptions, kv_rank=kv_rank, groups=groups, rank_allocation=rank_allocation,
                       rope_pairs=rope_pairs, kl_probe_seqs=kl_probe_seqs, fit=fit, key_weight=key_weight, calib=_calib(calib), num_seqs=num_seqs, seq_len=seq_len, dtype=dtype,
                       seed=seed, verify=verify, decode_check=decode_check, device=device)
    report = _conversion(options, model, output, dry_run=dry_run, force=force, allow_pickle=allow_pickle)
    if dry_run:
        out.print(dry_run_table(report))
        return
    out.print(verification_table(report))
    ranks = report.options["kv_ranks"]
    out.print(f"ranks per layer ({report.options['rank_allocation']}, mean {sum(ranks) / len(ranks):g}): "
              f"{' '.join(map(str, ranks))}")
    if report.options["fit"] == "attention":
        out.print(f"fit: attention (key weight {report.options['key_weight']:g})")
    if report.kl_sensitivity:
        kl = report.kl_sensitivity
        out.print(f"measured per-layer KL ({kl['probe']}), summed: {kl['summed']['chosen']:.4f} at these ranks, "
                  f"{kl['summed']['uniform']:.4f} at --kv-rank everywhere")
    if report.options.get("rope_pairs") is not None:
        kept = [sum(x["rope_score_kept"]) / len(x["rope_score_kept"]) for x in report.fit]
        out.print(f"RoPE pairs kept per KV head: {report.options['rope_pairs']}; share of the pairs' 2-norm score they "
                  f"hold, per layer (mean over KV heads): {' '.join(f'{k:.2f}' for k in kept)}")
    _print_kv_cache(report)
    out.print(f"wrote [bold]{report.output}[/]")


def _print_kv_cache(report) -> None:
    kv = report.options["kv_cache_bytes_per_token"]
    out.print(f"KV cache: {kv['before']:,} → {kv['after']:,} bytes/token ({kv['after'] / kv['before']:.1%})")


# ------------------------------------------------------------------------------------------- run (issue #12)
class RunDisplay:
    """One rich display for a whole run: step i of n with elapsed and remaining time, and the current step's own
    progress (a heal's optimizer steps, a conversion's phase, an evaluation's tasks)."""

    def __init__(self, console: Console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.console = console
        self.progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[what]}"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.run_task = self.step_task = None

    def __call__(self, event: str, **info) -> None:
        p = self.progress
        if event == "start":
            p.start()
            self.run_task = p.add_task("run", total=info["total"], what=f"{info['cached']} cached")
        elif event == "cached":
            p.advance(self.run_task)
            p.update(self.run_task, what=f"step {info['index']}/{info['total']}: {info['step'].title} (cached)")
        elif event == "begin":
            p.update(self.run_task, what=f"step {info['index']}/{info['total']}: {info['step'].title}")
            if self.step_task is not None:
                p.remove_task(self.step_task)
            self.step_task = p.add_task(info["step"].kind, total=None, what="")
        elif event == "progress" and self.step_task is not None:
            p.update(self.step_task, what=info.get("text", ""), **({"total": info["total"]} if "total" in info else {}))
        elif event == "advance" and self.step_task is not None:
            p.update(self.step_task, completed=info["completed"], what="training")
        elif event == "end":
            p.advance(self.run_task)
            if self.step_task is not None:
                p.remove_task(self.step_task)
                self.step_task = None
            r = info["record"]
            p.console.print(f"[green]✓[/] {info['index']}/{info['total']} {info['step'].title} "
                            f"({r['wall_s']:.1f} s) → {r['dir']}")
        elif event == "done":
            p.stop()
            self.console.print(f"wrote [bold]{info['path']}[/]")
        elif event == "note":
            self.console.print(info["text"])

    def close(self) -> None:
        self.progress.stop()


def plan_table(plan, runner) -> Table:
    cached = runner.cached()
    t = Table(title=f"qkvconv run {plan.recipe.name} --dry-run: {len(plan.steps)} steps, "
                    f"{sum(cached.values())} cached", title_justify="left")
    for col in ("#", "step", "model", "key", "status"):
        t.add_column(col)
    for i, s in enumerate(plan.steps, 1):
        t.add_row(str(i), s.title, s.model, s.key, "[green]cached[/]" if cached[s.key] else "[yellow]runs[/]")
    t.caption = f"run dir {runner.run_dir}; base {plan.base}"
    t.caption_justify = "left"
    return t


@app.command("run")
@command
def run_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run directory (default runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an existing run dir: finished steps whose options did not change are kept.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (which steps run, which are cached); run nothing.")] = False,
) -> None:
    """Run a recipe: convert every variant, heal it and the control identically, evaluate all; write results.json."""
    from qkvconv.runner import run_recipe

    if dry_run:
        plan, runner, _ = run_recipe(recipe, output, resume=resume, dry_run=True)
        out.print(plan_table(plan, runner))
        return
    display = RunDisplay(err)
    try:
        run_recipe(recipe, output, resume=resume, display=display)
    finally:
        display.close()


# ----------------------------------------------------------------------------------- report (issue #12)
@app.command("report")
@command
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (the --output of `qkvconv run`).", show_default=False)],
    iters: Annotated[int, typer.Option("--iters", help="Paired-bootstrap resamples per comparison.")] = 10_000,
) -> None:
    """Re-render RUN_DIR/report.md and its plots from the stored results.json; print the results table."""
    from qkvconv.experiment_report import render_report, rich_table

    with err.status("paired tests and plots…"):
        rendered = render_report(run_dir, iters=iters)
    out.print(rich_table(rendered))
    out.print(f"wrote [bold]{rendered.path}[/]")

if __name__ == "__main__":  # pragma: no cover
    app()
