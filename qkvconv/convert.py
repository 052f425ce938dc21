"""The conversion pipeline shared by every transform: open, calibrate, stream (transform + verify + write), check.

Every converting command is one call of `_pipeline` with the transform's per-layer function: the checkpoint is
streamed layer by layer (qkvconv.stream) into a temporary directory next to the output, verified on the way, its
decoding checked where the model fits in memory, and renamed into place only when every check passed.
"""

from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from qkvconv.archs import ArchSpec, dims_of, rope_inv_freq, spec_for
from qkvconv.checkpoint import check_output, history_record, load, qkvconv_block, resolve_source, write_metadata
from qkvconv.compat import no_init_weights
from qkvconv.errors import QkvconvError, TransformError, VerificationError, first_line
from qkvconv.modeling import FORMAT
from qkvconv.modeling.modeling_qkvconv import restore_folded, to_dtype_keeping_folded
from qkvconv.transforms.absorb_query import absorb_query_layer
from qkvconv.transforms.attach import attach_preproj_layer, attach_query_mlp_layer, stock_layers
from qkvconv.transforms.latent_kv import latent_kv_layer
from qkvconv.transforms.share_kv import share_kv_layer
from qkvconv.stream import folded_dtypes
from qkvconv.verify import DecodeCheck, Exactness, LogitError, calibration_ids, decode_check



@dataclass
class Report:
    """What a conversion did and how close it stayed to the original."""

    output: Path | None
    transform: str
    options: dict
    error: LogitError | None  # None with verify=False
    wq_condition: list[float]
    timings: dict[str, float] = field(default_factory=dict)
    atol: float | None = None
    added: dict[str, int] = field(default_factory=dict)  # new parameters by module kind (attach-*)
    decoding: DecodeCheck | None = None  # greedy decoding: cached vs uncached vs the original
    exactness: Exactness | None = None  # exact transforms: algebraic error and rounding ratio
    fit: list[dict] = field(default_factory=list)  # share-kv --init calibrated: the chosen candidate per layer
    decode_skipped: str | None = None  # why the decode check did not run
    output_bytes: int = 0
    kl_sensitivity: dict | None = None  # latent-kv --rank-allocation kl: the measured per-layer KL table


def check_exactness(name: str, exact: Exactness, error: LogitError, atol: float | None, cond: list[float]) -> None:
    """Refuse an exact conversion whose algebra is off, whose rounding is worse than the original's own beyond the
    stated multiple, or whose |Δlogit| exceeds the user's --atol; nothing is written."""
    if not exact.algebra_ok:
        raise VerificationError(
            f"{name} is not exact: in float64 max |Δlogit| is {exact.algebraic_rel:.3g} of max |logit| "
            f"(bound {exact.algebraic_bound:g}); nothing written"
        )
    if not exact.rounding_ok:
        hint = ""
        if cond:
            hint = (f"; cond(W_Q) up to {max(cond):.3g} amplifies the rounding of the folded maps: keep them in float64 "
                    "(--folded-dtype float64)")
        raise VerificationError(
            f"{name} makes the {exact.dtype} model noisier than the original: rounding error {exact.rounding_ratio:.3g}× "
            f"the original's own on average (bound {exact.ratio_bound:g}×), {exact.rounding_max_ratio:.3g}× at the "
            f"maximum (bound {exact.max_ratio_bound:g}×){hint}; nothing written"
        )
    if atol is not None and not error.max_abs <= atol:
        raise VerificationError(f"{name}: max |Δlogit| {error.max_abs:.3g} exceeds --atol {atol:g}; nothing written")


def verify_decoding(original, converted, ids: torch.Tensor, name: str) -> DecodeCheck:
    """The decode check of every conversion: a converted model whose cached greedy decoding differs from its
    uncached decoding (or whose cache does not hold the decoded tokens) fails, and nothing is written."""
    from qkvconv.stream import float32_linears

    try:
        with float32_linears(original), float32_linears(converted):  # a bf16 model on a CPU without bf16 GEMMs
            check = decode_check(original, converted, ids)
    except RuntimeError as e:  # e.g. the shipped modeling code refusing to decode without its cache
        first = first_line(e)
        if next(converted.parameters()).dtype == torch.float64 and "Double" in first:
            # transformers' kernels without a float64 path (gpt_oss's experts run grouped_mm): say so, not the kernel
            raise VerificationError(
                f"{name}: this {converted.config.model_type} model cannot run in float64 in transformers ({first}), so "
                "its decoding cannot be checked; convert with --dtype float32 (the algebra is float64 either way); "
                "nothing written") from e
        raise VerificationError(f"{name}: decoding with the KV cache failed: {first}; nothing written") from e
    if not check.passed:
        raise VerificationError(
            f"{name}: cached decoding differs from uncached decoding: {check.mismatches} of "
            f"{check.prompts * check.new_tokens} greedy tokens beyond the tie tolerance {check.tie_tolerance:.2g} "
            f"(max |Δlogit| {check.max_abs_gap:.3g}), cache holds {check.cache_tokens} of "
            f"{check.expected_cache_tokens} tokens; nothing written"
        )
    return check


Progress = Callable[[str], None]


@contextmanager
def _timed(timings: dict, name: str, progress: Progress | None):
    if progress:
        progress(name)
    t = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t, 3)


def converted_config(config, spec: ArchSpec, base_class: str, layers: list[dict]):
    """A copy of `config` whose qkvconv block tells the loader which modules to swap."""
    new = copy.deepcopy(config)
    new.qkvconv = {
        "format": FORMAT,
        "model_type": config.model_type,
        "base_class": base_class,
        "paths": {
            "layers": spec.layers,
            "attn_norm": spec.attn_norm,
            "q_proj": spec.q_proj,
            "k_proj": spec.k_proj,
            "v_proj": spec.v_proj,
            "fused_qkv": spec.fused_qkv,
            "qkv_layout": spec.qkv_layout,
            "attn": spec.o_proj.rsplit(".", 1)[0],  # the attention block, relative to a layer
            "o_proj": spec.o_proj,
            "qk_norm": spec.qk_norm,
            "qk_norm_scope": spec.qk_norm_scope,
            "norm_gain_offset": spec.norm_gain_offset,
            "rope_table": spec.rope_table,
        },
        "layers": layers,
    }
    new.auto_map = {"AutoModelForCausalLM": f"modeling_qkvconv.Qkvconv{base_class}"}
    new.architectures = [f"Qkvconv{base_class}"]
    return new


def build_converted(config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype):
    """Instantiate the converted architecture and load `state_dict` into it (strict)."""
    from qkvconv.modeling import modeling_qkvconv

    cls = getattr(modeling_qkvconv, f"Qkvconv{config.qkvconv['base_class']}")
    with no_init_weights():  # every weight is overwritten below; skip the random init
        model = cls(config).to(dtype)
    restore_folded(model)  # folded maps stay at their own precision
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m.endswith(("lm_head.weight", "embed_out.weight")))]
    if missing or unexpected:
        raise TransformError(f"internal: converted weights do not fit the layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    return model.eval()



def base_class_of(loaded) -> str:
    """The transformers class name a converted checkpoint's Qkvconv class derives from."""
    return _base_class(loaded.config)


def _base_class(config) -> str:
    from qkvconv.stream import model_class

    block = qkvconv_block(config)
    return block["base_class"] if block else model_class(config).__name__


def _refuse_absorbed(config, source) -> None:
    block = qkvconv_block(config)
    if block and any(layer["query"] == "identity" for layer in block["layers"]):
        raise TransformError(f"{source.path} already has an identity query; nothing to absorb")


def _refuse_converted(config, source) -> None:
    if qkvconv_block(config):
        raise TransformError(f"{source.path} is already a qkvconv-converted checkpoint; share-kv needs a stock one")


DECODE_MODES = ("auto", "always", "never")
DECODE_AUTO_FRACTION = 0.25  # auto: the decode check loads both models when they take ≤ this share of free memory


def _available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return 8 << 30


def _decode_skip_reason(decode: str, verify: bool, model_bytes: int) -> str | None:
    if decode not in DECODE_MODES:
        raise QkvconvError(f"--decode-check must be one of {', '.join(DECODE_MODES)}, not {decode!r}")
    if not verify:
        return "verification off (--no-verify)"
    if decode == "never":
        return "off (--decode-check never)"
    avail = _available_memory()
    if decode == "auto" and 2 * model_bytes > DECODE_AUTO_FRACTION * avail:
        return (f"the original and the converted model ({2 * model_bytes / 1e9:.1f} GB) do not fit in "
                f"{DECODE_AUTO_FRACTION:.0%} of the free memory ({avail / 1e9:.1f} GB); --decode-check always runs it")
    return None


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def check_device(device: str) -> str:
    """`device` (--device) if this torch can compute there, else one line saying why: the float64 algebra and the
    verification streams run on the CPU or on a CUDA GPU (cuda, cuda:N)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise QkvconvError(f"unknown --device {device!r}; use cpu or cuda (cuda:N for one GPU of several)") from None
    if dev.type == "cpu":
        return device
    if dev.type != "cuda":
        raise QkvconvError(f"--device {device}: conversions run on cpu or cuda (their algebra is in float64)")
    if torch.version.cuda is None or not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise QkvconvError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise QkvconvError(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return device


def _pipeline(
    model, output, *, name: str, options: dict, layer_fn: Callable, exact: bool, calib, num_seqs: int, seq_len: int,
    seed: int, dtype: torch.dtype | None, atol: float | None = None, force: bool, allow_pickle: bool,
    progress: Progress | None, verify: bool = True, decode: str = "auto", device: str = "cpu",
    calibrate: bool = False, held_out: bool = False, refuse: Callable | None = None,
    config_for: Callable | None = None, details: Callable | None = None,
    finish: Callable | None = None, max_shard_bytes: int | None = None, dry_run: bool = False,
    prepare: Callable | None = None, adjust_config: Callable | None = None,
) -> Report:
    """One conversion: open (headers and checks), calibration ids, stream (transform, verify, write), exactness and
    decode checks, record; nothing is left at `output` unless every check passed.

    layer_fn(plan, sd64, i, attn_input) -> LayerResult. calibrate: the transform needs each layer's attention
    inputs (fitted on 4 of every 5 sequences when held_out, verified on the 5th). prepare(plan, ids, calib_rows,
    dtype): runs once after calibration, before the first layer is transformed (latent-kv's first pass).
    adjust_config(config) -> config: applied to the converted config (latent-kv after pooling: its KV heads)."""
    from qkvconv.checkpoint import DEFAULT_SHARD_BYTES
    from qkvconv.stream import atomic_output, open_plan, stream_convert

    t: dict[str, float] = {}
    device = check_device(device)
    source = resolve_source(model, allow_pickle=allow_pickle)
    out = check_output(output, force=force, inputs=[source]) if output is not None else None
    with _timed(t, "open", progress):
        plan = open_plan(source, allow_pickle=allow_pickle)
    if refuse is not None:
        refuse(plan.config, source)
    dtype = dtype or plan.source_dtype()
    options = {**options, "dtype": str(dtype).removeprefix("torch.")}
    made = config_for or (lambda entries: _converted(plan, entries, dtype))
    config_for = made if adjust_config is None else (lambda entries: adjust_config(made(entries)))
    if dry_run:
        return _dry_run(plan, name, layer_fn, dtype, config_for, out, calibrate=calibrate)
    ids, calib_source, verify_rows, calib_rows = None, "", None, None
    if verify or calibrate:
        with _timed(t, "calibrate", progress):
            ids, calib_source = _calibration(plan, source, calib, num_seqs, seq_len, seed)
        rows = list(range(len(ids)))
        if calibrate:
            calib_rows = rows
            if held_out:  # fit on 4 of every 5 windows, verify on the 5th: the reported error is out of sample
                if len(ids) < 2:
                    raise TransformError(f"--init calibrated needs at least 2 calibration sequences (got {len(ids)})")
                verify_rows = [r for r in rows if r % 5 == 4] or [rows[-1]]
                calib_rows = [r for r in rows if r not in verify_rows]
                calib_source += (f"; verified on the {len(verify_rows)} held-out sequences, fitted on the other "
                                 f"{len(calib_rows)}")
        if not verify and not held_out:
            verify_rows = []
    src_bytes = plan.tensors.total_bytes()
    model_bytes = int(src_bytes * _dtype_bytes(dtype) / _dtype_bytes(plan.source_dtype()))
    skip = _decode_skip_reason(decode, verify, model_bytes)
    options["verify"], options["decode_check"] = verify, decode

    def run(tmp: Path | None) -> Report:
        # the input's sha256 (for the record) is read and hashed on a thread while the layers convert: hashlib and
        # file reads release the GIL, so it overlaps the conversion instead of adding a read of the checkpoint. A
        # verify-only run (no output) writes its record into a temporary folder that is discarded: no hash.
        hashing, stop = (ThreadPoolExecutor(1), threading.Event()) if out is not None else (None, None)
        source_hash = hashing.submit(_source_hash, source, stop) if hashing else None
        try:
            return _run(tmp, source_hash)
        finally:
            if hashing:
                stop.set()  # done, or failed/interrupted: the thread stops within one block
                hashing.shutdown(wait=True)

    def _run(tmp: Path | None, source_hash) -> Report:
        if plan.tokenizer is not None:  # the calibration ids are made: what is left is to write the tokenizer, so it
            # is written now and let go before the layers (SmolLM2's BPE tokenizer held 40-75 MB of heap through them)
            if tmp is not None:
                plan.tokenizer.save_pretrained(tmp)
            plan.tokenizer = None
        if prepare is not None:
            with _timed(t, "prepare", progress):
                prepare(plan, ids, calib_rows, dtype)
        with _timed(t, "convert", progress):
            streamed = stream_convert(
                plan, tmp, lambda sd, i, x: layer_fn(plan, sd, i, x), dtype=dtype, config_for=config_for,
                ids=ids if (verify or calibrate) else None, verify_rows=verify_rows if verify else [],
                calib_rows=calib_rows, exact=exact and verify, device=device,
                max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES, progress=progress, source_label=calib_source,
                direct_io=skip is not None,  # the decode check reads the output back: through the page cache then
            )
        t["stream"] = streamed.timings
        infos = streamed.infos
        cond = [x["wq_condition"] for x in infos if "wq_condition" in x]
        added: dict[str, int] = {}
        for x in infos:
            for kind, n in x.get("added", {}).items():
                added[kind] = added.get(kind, 0) + n
        report = Report(None, name, options, streamed.error if verify else None, cond, t, atol, added=added,
                        exactness=streamed.exactness, fit=[x["fit"] for x in infos if x.get("fit")],
                        decode_skipped=skip, output_bytes=streamed.output_bytes)
        if exact and verify:
            check_exactness(name, streamed.exactness, streamed.error, atol, cond)
        config = streamed.converted_config
        config.dtype = dtype
        report.converted_config = config
        if finish is not None:
            finish(report, plan)
        if tmp is not None:
            write_metadata(tmp, config=config, tokenizer=plan.tokenizer, record=None,
                           generation_config=plan.generation_config)
            if skip is None:
                with _timed(t, "decode", progress):
                    report.decoding = _decode(plan, source, tmp, ids[verify_rows or slice(None)], dtype, name)
            record = history_record(
                transform=name, options=options, source=source, source_hash=source_hash.result() if source_hash else None,
                details={"verification": report.error.as_dict() if report.error else None,
                         **(details(report) if details else {}),
                         **({"exactness": report.exactness.as_dict()} if report.exactness else {}),
                         "decoding": report.decoding.as_dict() if report.decoding else {"skipped": skip},
                         "timings_s": t}, seed=seed)
            import json

            from qkvconv.checkpoint import RECORD_FILE

            (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str))
        return report

    if out is None:
        import tempfile

        if skip is not None:
            return run(None)
        with tempfile.TemporaryDirectory(prefix="qkvconv-verify-") as tmp:  # the decode check loads the output
            return run(Path(tmp))
    with atomic_output(out, force=force, need_bytes=int(model_bytes * 1.05) + (1 << 20)) as tmp:
        report = run(tmp)
    report.output = out
    return report


@dataclass
class DryRun:
    """What a conversion would do, from the headers and one converted layer; nothing is written."""

    transform: str
    source: str
    layers: int
    dtype: str
    removed: list[str]  # layer 0's tensors that go away (relative names)
    added: list[str]  # layer 0's new or rewritten tensors
    params_before: int
    params_after: int
    kv_cache_bytes_per_token: tuple[int, int]
    checkpoint_bytes: int
    output_bytes: int
    peak_memory_bytes: int
    disk_free_bytes: int
    read_bytes_per_s: float
    copy_seconds: float  # a plain copy at the measured read speed, the write assumed as fast
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dry_run(plan, name: str, layer_fn: Callable, dtype: torch.dtype, config_for: Callable, out,
             *, calibrate: bool) -> DryRun:
    """Check the input (headers against config.json), convert layer 0 in memory, and extrapolate to the model."""
    import psutil

    from qkvconv.describe import kv_cache_bytes_per_token
    from qkvconv.stream import Float64View, check_finite, disk_free, skeleton

    src, spec, dims = plan.tensors, plan.spec, plan.dims
    n = dims.num_hidden_layers
    t = time.perf_counter()
    layer0 = {k: check_finite(k, src.get(k)) for k in plan.layer_keys(0)}
    read_s = max(time.perf_counter() - t, 1e-6)
    layer_bytes = sum(x.numel() * x.element_size() for x in layer0.values())
    attn_input = torch.randn(256, dims.hidden_size, dtype=torch.float64) if calibrate else None  # shapes only
    res = layer_fn(plan, Float64View(layer0), 0, attn_input)
    entries = [res.entry] * n
    config = config_for(entries)
    layers = skeleton(config, dtype).get_submodule(spec.layers)
    keep = {f"{spec.layers}.{k}": v for k, v in folded_dtypes(layers).items()}
    kept = {k: x for k, x in layer0.items() if k not in set(res.removed)}
    out_layer = {k: (x.shape, keep.get(k, dtype)) for k, x in kept.items()}
    out_layer.update({k: (x.shape, keep.get(k, dtype)) for k, x in res.tensors.items()})
    out_layer_bytes = sum(_numel(s) * _dtype_bytes(d) for s, d in out_layer.values())
    rest = plan.rest_keys()
    rest_bytes = sum(_numel(src.shape(k)) for k in rest) * _dtype_bytes(dtype)
    total = src.total_bytes()
    params_layer_before = sum(x.numel() for x in layer0.values())
    params_layer_after = sum(_numel(s) for s, _ in out_layer.values())
    params_rest = sum(_numel(src.shape(k)) for k in rest)
    prefix = f"{spec.layers}.0."
    head = max((src.nbytes(k) for k in rest), default=0)
    # one layer as read, its float64 copy, the converted layer, the LM head as stored, 4 float64 hidden streams
    peak = (psutil.Process().memory_info().rss + layer_bytes + 8 * params_layer_before + out_layer_bytes + head
            + 4 * 8 * 8 * 128 * dims.hidden_size)
    note = ["layer 0 converted; every layer assumed to have its shape"]
    if calibrate:
        note.append("calibrated fit: shapes from random attention inputs (the fit itself runs on the real ones)")
    return DryRun(
        transform=name, source=str(plan.source.path), layers=n, dtype=str(dtype).removeprefix("torch."),
        removed=sorted(k.removeprefix(prefix) for k in res.removed),
        added=sorted(k.removeprefix(prefix) for k in res.tensors),
        params_before=params_rest + n * params_layer_before, params_after=params_rest + n * params_layer_after,
        kv_cache_bytes_per_token=(kv_cache_bytes_per_token(plan.config, spec, dtype),
                                  kv_cache_bytes_per_token(config, spec, dtype)),
        checkpoint_bytes=total, output_bytes=rest_bytes + n * out_layer_bytes, peak_memory_bytes=int(peak),
        disk_free_bytes=disk_free(Path(out).parent if out is not None else Path.cwd()),
        read_bytes_per_s=layer_bytes / read_s, copy_seconds=2 * total / (layer_bytes / read_s), notes=note,
    )


def _source_hash(source, stop=None) -> str | None:
    from qkvconv.manifest import hash_path

    return hash_path(source.path, stop=stop) if source.kind != "hub" else None


def _calibration(plan, source, calib, num_seqs: int, seq_len: int, seed: int):
    if plan.tokenizer is None:
        raise QkvconvError(f"{source.path} has no tokenizer: verification and calibration need one (add the "
                           "tokenizer files, or pass --no-verify)")
    model = None
    if str(calib) == "sample":  # sampling runs the whole model: load it (the streamed path never does otherwise)
        model = plan.loaded.model if plan.loaded is not None else load(source).model
    return calibration_ids(model, plan.tokenizer, calib=calib, num_seqs=num_seqs, seq_len=seq_len, seed=seed)


def _converted(plan, entries: list[dict], dtype: torch.dtype):
    config = converted_config(plan.config, plan.spec, _base_class(plan.config), entries)
    config.dtype = dtype
    return config


def _decode(plan, source, converted_dir: Path, ids: torch.Tensor, dtype: torch.dtype, name: str) -> DecodeCheck:
    """The decode check on the written output (loaded as a user would) against the original in the same dtype."""
    if plan.loaded is not None:
        original = plan.loaded.model
        if dtype != next(original.parameters()).dtype:
            original = to_dtype_keeping_folded(copy.deepcopy(original), dtype)
    else:
        original = load(source, dtype=dtype, tokenizer=False).model
    converted = load(converted_dir, dtype=dtype, tokenizer=False).model
    return verify_decoding(original, converted, ids, name)


# ---------------------------------------------------------------------------------------- absorb-query
EXACT_VERIFY_SEQS = 1  # default calibration sequences (× seq_len tokens) that an exact conversion is verified on

def absorb_query_checkpoint(
    model: str | Path,
    output: str | Path | None,
    *,
    mode: str = "exact",
    calib: Path | None = None,
    num_seqs: int | None = None,
    seq_len: int = 128,
    seed: int = 0,
    atol: float | None = None,
    dtype: torch.dtype | None = None,
    folded_dtype: torch.dtype | None = torch.float64,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    verify: bool = True,
    decode: str = "auto",
    device: str = "cpu",
    dry_run: bool = False,
) -> Report:
    """absorb-query on a checkpoint, streamed layer by layer, verified against the original; writes `output` unless
    it is None. dtype None keeps the checkpoint's own.

    exact: the float64 algebra is cast once to `dtype`; the folded maps are kept at `folded_dtype` (default float64;
    None: the output dtype), and the conversion is refused unless it is exact in float64 and rounds like the
    original in `dtype` (verify.Exactness); `atol` adds an absolute bound on max |Δlogit|.

    num_seqs None: 2 sequences for exact (the algebra is proved in float64 on any tokens; more only cost time),
    8 for drop (a lossy error is a statistic, and its fit needs data)."""
    if mode not in ("exact", "drop"):
        raise TransformError(f"unknown absorb-query mode {mode!r}; use exact or drop")
    exact = mode == "exact"
    num_seqs = num_seqs or (EXACT_VERIFY_SEQS if exact else 8)

    def layer(plan, sd, i, attn_input):
        res = absorb_query_layer(sd, plan.spec, plan.dims, i, mode=mode, attn_input=attn_input)
        out_dtype = dtype or plan.source_dtype()
        if exact and folded_dtype is not None and folded_dtype != out_dtype:
            res.entry["folded_dtype"] = str(folded_dtype).removeprefix("torch.")
        return res

    def details(report):
        return {"wq_condition": report.wq_condition}

    def finish(report, plan):
        out_dtype = getattr(torch, report.options["dtype"])
        keep = folded_dtype if exact and folded_dtype is not None and folded_dtype != out_dtype else None
        report.options["folded_dtype"] = str(keep).removeprefix("torch.") if keep is not None else None

    return _pipeline(
        model, output, name="absorb-query",
        options={"mode": mode, "calib": str(calib) if calib else None, "num_seqs": num_seqs, "seq_len": seq_len,
                 "seed": seed, "atol": atol},
        layer_fn=layer, exact=exact, calib=calib, num_seqs=num_seqs, seq_len=seq_len, seed=seed, dtype=dtype,
        atol=atol if exact else None, force=force, allow_pickle=allow_pickle, progress=progress, verify=verify,
        decode=decode, device=device, calibrate=not exact, refuse=_refuse_absorbed,
        details=details, finish=finish, dry_run=dry_run,
    )


# ------------------------------------------------------------------------ attach-query-mlp / attach-preproj
def _entries_of(plan) -> list[dict]:
    block = qkvconv_block(plan.config)
    return copy.deepcopy(block["layers"]) if block else stock_layers(plan.dims)


def _attach(model, output, name: str, one: Callable, options: dict, **kw) -> Report:
    def layer(plan, sd, i, attn_input):
        return one(sd, plan.spec, plan.dims, i, _entries_of(plan)[i])

    def details(report):
        return {"added_parameters": report.added}

    return _pipeline(model, output, name=name, options=options, layer_fn=layer, exact=True, details=details, **kw)


def attach_query_mlp_checkpoint(
    model: str | Path,
    output: str | Path | None,
    *,
    rank: int | None = None,
    act: str = "gelu",
    calib: Path | str | None = None,
    num_seqs: int = 4,
    seq_len: int = 64,
    seed: int = 0,
    atol: float | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    verify: bool = True,
    decode: str = "auto",
    device: str = "cpu",
    dry_run: bool = False,
) -> Report:
    """Add a zero-started nonlinear residual query (METHODS.md §2), verify exactness, write `output`."""
    return _attach(
        model, output, "attach-query-mlp",
        lambda sd, spec, dims, i, entry: attach_query_mlp_layer(sd, spec, dims, i, entry, rank=rank, act=act, seed=seed),
        {"rank": rank, "act": act, "calib": str(calib) if calib else None, "num_seqs": num_seqs, "seq_len": seq_len,
         "seed": seed, "atol": atol},
        calib=calib, num_seqs=num_seqs, seq_len=seq_len, seed=seed, atol=atol, dtype=dtype, force=force,
        allow_pickle=allow_pickle, progress=progress, verify=verify, decode=decode, device=device, dry_run=dry_run,
    )


def attach_preproj_checkpoint(
    model: str | Path,
    output: str | Path | None,
    *,
    expansion: float = 1.25,
    skip: bool = True,
    calib: Path | str | None = None,
    num_seqs: int = 4,
    seq_len: int = 64,
    seed: int = 0,
    atol: float | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    verify: bool = True,
    decode: str = "auto",
    device: str = "cpu",
    dry_run: bool = False,
) -> Report:
    """Add a zero-started pre-projection MLP and content skip (METHODS.md §5), verify exactness, write `output`."""
    return _attach(
        model, output, "attach-preproj",
        lambda sd, spec, dims, i, entry: attach_preproj_layer(sd, spec, dims, i, entry, expansion=expansion, skip=skip,
                                                              seed=seed),
        {"expansion": expansion, "skip": skip, "calib": str(calib) if calib else None, "num_seqs": num_seqs,
         "seq_len": seq_len, "seed": seed, "atol": atol},
        calib=calib, num_seqs=num_seqs, seq_len=seq_len, seed=seed, atol=atol, dtype=dtype, force=force,
        allow_pickle=allow_pickle, progress=progress, verify=verify, decode=decode, device=device, dry_run=dry_run,
    )


# ------------------------------------------------------------------------------------------- share-kv
def _rope_table(model, seq_len: int, layer: int = 0, spec: ArchSpec | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """cos, sin (seq_len, rotary_dim) of layer `layer`'s rotary embedding, None without RoPE."""
    from qkvconv.modeling.modeling_qkvconv import rope_layer_type

    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
    has_rope, layer_type = rope_layer_type(model.config, layer)
    if rotary is None or not has_rope:
        return None, None
    x = torch.zeros(1, dtype=torch.float32)
    args = () if layer_type is None else (layer_type,)
    cos, sin = rotary(x, torch.arange(seq_len)[None], *args)
    if spec is not None and spec.rope_table == "half":  # each frequency once: tile to the rotate_half layout
        cos, sin = cos.repeat(1, 1, 2), sin.repeat(1, 1, 2)
    return cos[0].double(), sin[0].double()


def _attention_facts(model, spec, i: int) -> dict:
    """What layer i's stock attention module computes beyond 1/√d_h softmax attention (share-kv calibration)."""
    attn = model.get_submodule(spec.layer(i, spec.o_proj.rsplit(".", 1)[0]))
    return {"scaling": getattr(attn, "scaling", None), "softcap": getattr(attn, "attn_logit_softcapping", None),
            "sliding_window": getattr(attn, "sliding_window", None), "norm_gain_offset": spec.norm_gain_offset}


def stock_config(config, kv_heads: int):
    """A copy of `config` for the stock architecture with `kv_heads` key/value heads where the family has that
    setting; returns (config, heads actually written): families without it get pooled heads repeated."""
    new = copy.deepcopy(config)
    for key in ("qkvconv", "auto_map"):
        if hasattr(new, key):
            delattr(new, key)
    if hasattr(new, "num_key_value_heads"):
        new.num_key_value_heads = kv_heads
        return new, kv_heads
    return new, config.num_attention_heads


def share_kv_checkpoint(
    model: str | Path,
    output: str | Path | None,
    *,
    mode: str | None = "k=v",
    kv_heads: int | None = None,
    init: str = "key",
    export: str | None = None,
    calib: Path | None = None,
    num_seqs: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    pos2d: int | None = None,
    verify: bool = True,
    decode: str = "auto",
    device: str = "cpu",
    dry_run: bool = False,
) -> Report:
    """share-kv on a checkpoint (lossy: reported, never refused), streamed layer by layer, written to `output`
    unless it is None.

    Calibration: num_seqs×seq_len tokens (default 16×128; 40×256 for init="calibrated", which fits on
    4 of every 5 sequences and reports the error on the 5th).

    export="stock" writes the stock architecture (K=V as duplicated weights, pooled heads as num_key_value_heads):
    loads without remote code, but a K=V cache is then not shared.
    """
    from qkvconv.describe import kv_cache_bytes_per_token
    from qkvconv.stream import skeleton
    from qkvconv.transforms.share_kv import Calibration, check_share_options

    if export not in (None, "stock"):
        raise TransformError(f"unknown --export {export!r}; the only export is stock")
    if pos2d is not None and export == "stock":
        raise TransformError("--pos2d has no stock equivalent; leave out --export stock")
    num_seqs = num_seqs or (40 if init == "calibrated" else 16)
    seq_len = seq_len or (256 if init == "calibrated" else 128)
    state: dict = {}

    def refuse(config, source):
        _refuse_converted(config, source)
        spec = spec_for(config.model_type)
        state["N"] = check_share_options(mode, kv_heads, init, dims_of(config, spec), pos2d)  # before calibration
        if export == "stock":
            state["stock"] = stock_config(config, state["N"])

    def layer(plan, sd, i, attn_input):
        calibration = None
        if init == "calibrated":
            if "model" not in state:
                state["model"] = skeleton(plan.config)
            cos, sin = _rope_table(state["model"], seq_len, i, plan.spec)
            eps = float(getattr(plan.config, "rms_norm_eps", 1e-6) or 1e-6)
            calibration = Calibration({i: attn_input}, seq_len, cos, sin, eps,
                                      **_attention_facts(state["model"], plan.spec, i))
        return share_kv_layer(sd, plan.spec, plan.dims, i, mode=mode, kv_heads=kv_heads, init=init,
                              calibration=calibration, stock_kv_heads=state["stock"][1] if export == "stock" else None,
                              pos2d=pos2d)

    config_for = (lambda entries: state["stock"][0]) if export == "stock" else None

    def finish(report, plan):
        out_dtype = getattr(torch, report.options["dtype"])
        report.options["kv_heads"] = state["N"]
        report.options["kv_cache_bytes_per_token"] = {
            "before": kv_cache_bytes_per_token(plan.config, plan.spec, out_dtype),
            "after": kv_cache_bytes_per_token(report.converted_config, plan.spec, out_dtype),
        }

    return _pipeline(
        model, output, name="share-kv",
        options={"mode": mode or "none", "kv_heads": None, "init": init, "export": export, "pos2d": pos2d,
                 "calib": str(calib) if calib else None, "num_seqs": num_seqs, "seq_len": seq_len, "seed": seed},
        layer_fn=layer, exact=False, calib=calib, num_seqs=num_seqs, seq_len=seq_len, seed=seed, dtype=dtype,
        force=force, allow_pickle=allow_pickle, progress=progress, verify=verify, decode=decode, device=device,
        calibrate=init == "calibrated", held_out=init == "calibrated", refuse=refuse, config_for=config_for,
        details=lambda r: {"calibrated_fit": r.fit}, finish=finish, dry_run=dry_run,
    )


# ------------------------------------------------------------------------------------------ latent-kv
KL_PROBE_SEQS = 4  # --rank-allocation kl: the fitting sequences (× seq_len tokens) each candidate's KL is measured on
KL_MEMORY_FRACTION = 0.5  # ... and the share of the free memory their hidden states may take


def latent_kv_checkpoint(
    model: str | Path,
    output: str | Path | None,
    *,
    kv_rank: int,
    groups: int = 1,
    rank_allocation: str = "uniform",
    rope_pairs: int | None = None,
    kl_probe_seqs: int | None = None,
    fit: str = "kv",
    key_weight: float | None = None,
    calib: Path | None = None,
    num_seqs: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    verify: bool = True,
    decode: str = "auto",
    device: str = "cpu",
    dry_run: bool = False,
) -> Report:
    """latent-kv on a checkpoint (METHODS.md §6; lossy below full rank: reported, never refused), streamed layer by
    layer, written to `output` unless it is None. kv_rank: the average latent size per layer.

    The input is a stock checkpoint or a share-kv output with --mode k=v and/or --kv-heads N (a combination): the
    latent is then fitted over the share-kv model's own K/V projections on its own attention inputs (the pooled
    heads' [W_K | W_V], or the shared W_S alone, keys and values rebuilt from one up-projection), and the output's
    config says num_key_value_heads N, which the latent attention reads.

    Calibration: num_seqs×seq_len tokens (default 40×256), fitted on 4 of every 5 sequences, the error reported on
    the 5th. rank_allocation "uniform" gives every layer kv_rank (the default: on SmolLM2-135M the greedy allocation
    below gave a higher held-out KL at ranks 192 and 128, bench/bench_latent_kv_allocation.py); "greedy" needs every layer's spectrum before the first layer is written: a first pass
    streams the original's layers over the fitting sequences and keeps only each layer's whitened singular values
    (nothing is written, no layer held beyond its own turn).

    rank_allocation "kl" measures, in a first streamed pass (qkvconv.sensitivity), the model's KL to the original
    when ONLY layer i is compressed at rank r, for every layer and every r of a ladder around kv_rank (KL_LADDER:
    0.5, 0.75, 1, 1.25, 1.5, 2 × kv_rank, within the full rank, multiples of groups), on the first kl_probe_seqs
    (default KL_PROBE_SEQS) fitting sequences, so the held-out KL stays out of sample; then picks the ranks with the
    least summed KL whose mean is exactly kv_rank (allocate_ranks_by_kl). Each candidate layer is the one the
    conversion would write at that rank. Cost: a forward of the probe tokens from each candidate's layer to the
    logits (6 candidates per layer); memory: no more of the model than the conversion holds, plus every
    candidate's probe hidden states (L × 6 × probe tokens × hidden size, float32), refused in one line beyond
    KL_MEMORY_FRACTION of the free memory. SmolLM2-135M, kv_rank 128 (⅓ cache), default calibration, 4 × 256 probe
    tokens: held-out KL 0.490 → 0.337 and top-1 62.4 % → 66.4 % against uniform (the summed per-layer KL predicted
    0.471 → 0.336), ranks 64–256, the first pass 653 s on one shared CPU thread (the conversion itself 60 s); BUT
    LAMBADA (first 500, lm-eval) fell: acc 0.200 → 0.136, ppl 117 → 193 (with the ladder's floor at 0.75 × kv_rank:
    KL 0.358, acc 0.160, ppl 145). At kv_rank 192 (½): KL 0.175 → 0.126, top-1 75.6 % → 78.1 %, LAMBADA acc
    0.286 → 0.296 and ppl 55.7 → 59.0 (both within the stderr, 0.020 / 7). The mean next-token KL on calibration
    text does not rank the layers the way the long-range last-word prediction needs them, so uniform stays the
    default.

    fit: "kv" fits the latent to K and V themselves (E‖h·W − h·A·B‖², the default); "attention" weights each key
    and value error by what attention does with it (transforms/latent_kv.py: values by Σ W_O[h]·W_O[h]ᵀ, keys by the
    RoPE-averaged query moments × the spread of the value outputs × key_weight, None: KEY_WEIGHT 0.3), still closed
    form and exact at full rank. Layers with a per-head QK-norm are refused. SmolLM2-135M, default calibration,
    held-out KL / top-1 and LAMBADA (first 500, lm-eval) acc / ppl, base 0.292:

        kv_rank 128 (⅓ cache)   fit kv                   0.490  62.4 %   0.200  117
                                attention λ 1            0.294  70.0 %   0.182  135
                                attention λ 0.3          0.257  71.3 %   0.226   96.5
                                attention λ 0.1          0.302  69.2 %   0.246  106
                                attention λ 0.03         0.377  64.7 %   0.210  170
        kv_rank 192 (½ cache)   fit kv                   0.175  75.6 %   0.286   55.7
                                attention λ 0.3          0.068  85.0 %   0.270   69.2
                                attention λ 0.1          0.074  84.6 %   0.272   68.7

    (uniform RoPE angles instead of the window's relative positions, rank 128: λ 1 0.364 / 0.138, λ 0.3 0.300 /
    0.194.) The held-out KL falls by a third to a half, but LAMBADA does not follow it (stderr ~0.02 acc, ~7-15 ppl):
    better at ⅓, worse in perplexity at ½. fit "kv" stays the default.

    The calibration text matters as much as the fit. Calibrated on the Gutenberg finetuning corpus (160 × 256
    tokens, calib=gutenberg_en_train.txt, num_seqs=160; held-out KL on its own held-out 32 sequences, so not
    comparable with the rows above), kv_rank 128:

                                fit kv                   0.514  61.9 %   0.234   96.7
                                attention λ 0.3          0.296  69.4 %   0.242  102

    (recipes/latent-kv-third-cpu.yaml, docs/examples/latent-kv-third-cpu/: every row of this comparison in one run,
    with paired tests against the base.)

    rope_pairs: P, the MHA2MLA variant (transforms/latent_kv.py): P RoPE pairs per KV head, chosen per layer on the
    fitting sequences, cached beside the RoPE-free latent; kv_rank is then the latent alone, so the cache holds
    kv_rank + 2·P·G values per token and layer. None: reconstruct-then-rotate. Zero-shot it loses far more than
    reconstruct-then-rotate at the same cache (SmolLM2-135M at ½ cache, held-out KL: rank 192 0.19; P=4 + rank 168
    2.0, P=8 + 144 1.5, P=16 + 96 0.94; P=4 at full latent rank 1.8, so the dropped rotation is the loss): MHA2MLA
    heals it by training. What it buys is decoding without rebuilding keys (bench/bench_latent_kv.py).
    """
    from qkvconv.describe import kv_cache_bytes_per_token
    from qkvconv.stream import stream_convert
    from qkvconv.transforms.attach import stock_layers
    from qkvconv.sensitivity import compute_dtype, layer_sensitivity, probe_bytes
    from qkvconv.transforms.latent_kv import (ALLOCATIONS, FITS, KEY_WEIGHT, ROPE_PAIRS_AFTER_SHARE_KV,
                                              allocate_ranks, _split_even, allocate_ranks_by_kl, check_latent_options, full_rank,
                                              layer_spectrum, rank_ladder, rope_distance_angles, share_kv_heads,
                                              uniform_ranks)
    from qkvconv.transforms.layer import LayerResult

    if rank_allocation not in ALLOCATIONS:
        raise TransformError(f"unknown --rank-allocation {rank_allocation!r}; use one of {', '.join(ALLOCATIONS)}")
    if fit not in FITS:
        raise TransformError(f"unknown --fit {fit!r}; use one of {', '.join(FITS)}")
    if key_weight is not None and (fit != "attention" or not key_weight >= 0):
        raise TransformError(f"--key-weight {key_weight}: a non-negative number, with --fit attention only")
    key_weight = KEY_WEIGHT if key_weight is None else key_weight
    if kl_probe_seqs is not None and (rank_allocation != "kl" or kl_probe_seqs < 1):
        raise TransformError(f"--kl-probe-seqs {kl_probe_seqs}: a positive number of sequences, with "
                             "--rank-allocation kl only")
    num_seqs, seq_len = num_seqs or 40, seq_len or 256
    probe_seqs = kl_probe_seqs or KL_PROBE_SEQS
    state: dict = {}

    def refuse(config, source):
        block = qkvconv_block(config)
        spec = spec_for(config.model_type)
        dims = dims_of(config, spec)
        N, parts = share_kv_heads(block, str(source.path), dims.num_key_value_heads,
                                  hasattr(config, "num_key_value_heads"))
        if rope_pairs is not None and block:
            raise TransformError(f"{source.path}: {ROPE_PAIRS_AFTER_SHARE_KV}")  # before calibration
        state["entries"] = copy.deepcopy(block["layers"]) if block else [None] * dims.num_hidden_layers
        inv_freq = rope_inv_freq(config, dims) if fit == "attention" else None  # the query moments' RoPE average
        state["angles"] = None if inv_freq is None else rope_distance_angles(inv_freq, seq_len)
        state["kv_heads"] = N
        if N is not None:
            dims = replace(dims, num_key_value_heads=N)
        check_latent_options(spec, dims, kv_rank, groups, rope_pairs, parts)  # before calibration
        state["ranks"] = uniform_ranks(dims.num_hidden_layers, kv_rank, groups)  # (dry run: no spectra)
        state["ladder"] = rank_ladder(kv_rank, full_rank(dims, groups, rope_pairs, parts), groups)
        if rank_allocation == "kl":  # every candidate's probe hidden states, held until the logits
            need = probe_bytes(dims.num_hidden_layers * len(state["ladder"]), probe_seqs * seq_len,
                               dims.hidden_size, compute_dtype(dtype or torch.float32))
            avail = _available_memory()
            if need > KL_MEMORY_FRACTION * avail:
                raise TransformError(
                    f"--rank-allocation kl would hold {need / 1e9:.1f} GB of probe hidden states ({dims.num_hidden_layers}"
                    f" layers × {len(state['ladder'])} ranks × {probe_seqs}×{seq_len} tokens), more than "
                    f"{KL_MEMORY_FRACTION:.0%} of the free memory ({avail / 1e9:.1f} GB): lower --kl-probe-seqs or "
                    "--seq-len, or use --rank-allocation uniform")

    def adjust_config(config):
        if state["kv_heads"] is not None:  # pooled heads: the latent attention reads its KV heads from the config
            config.num_key_value_heads = state["kv_heads"]
        return config

    def prepare(plan, ids, calib_rows, dtype):
        if rank_allocation == "uniform":
            return
        if rank_allocation == "kl":
            return measure_kl(plan, ids, calib_rows, dtype)
        spectra: list = []

        def spectrum(sd, i, attn_input):  # the input's layer i: its spectrum only, the layer unchanged
            spectra.append(layer_spectrum(sd, plan.spec, plan.dims, i, attn_input, groups, rope_pairs,
                                          state["entries"][i], fit, key_weight, state["angles"]))
            return LayerResult({}, [], state["entries"][i] or stock_layers(plan.dims)[i])

        stream_convert(plan, None, spectrum, dtype=dtype, config_for=lambda entries: _converted(plan, entries, dtype),
                       ids=ids, verify_rows=[], calib_rows=calib_rows, device=device)
        state["ranks"] = allocate_ranks(spectra, kv_rank)
        state["spectra"] = spectra

    def measure_kl(plan, ids, calib_rows, dtype):
        def candidates(sd, i, attn_input):  # layer i as the conversion would write it, at each rank of the ladder
            return {r: latent_kv_layer(sd, plan.spec, plan.dims, i, r, attn_input, groups, rope_pairs,
                                       state["entries"][i], fit, key_weight, state["angles"])
                    for r in state["ladder"]}

        probe_rows = calib_rows[:probe_seqs]  # fitting sequences: the held-out KL stays out of sample
        kl, timings = layer_sensitivity(
            plan, ids, calib_rows, probe_rows, candidates,
            lambda entries: adjust_config(_converted(plan, entries, dtype)), dtype=compute_dtype(dtype),
            device=device, progress=progress)
        chosen = allocate_ranks_by_kl(kl, kv_rank)
        state["ranks"] = [_split_even(r, groups) for r in chosen]
        # the additive model's prediction: Σ_i KL_i(r_i), for the chosen ranks and for kv_rank everywhere
        summed = {"chosen": sum(k[r] for k, r in zip(kl, chosen)), "uniform": sum(k[kv_rank] for k in kl)}
        state["kl"] = {"ladder": state["ladder"], "per_layer": [[kl_i[r] for r in state["ladder"]] for kl_i in kl],
                       "summed": summed, "probe": f"{len(probe_rows)} fitting sequences × {ids.shape[1]} tokens",
                       "timings_s": timings}

    def layer(plan, sd, i, attn_input):
        return latent_kv_layer(sd, plan.spec, plan.dims, i, state["ranks"][i], attn_input, groups, rope_pairs,
                               state["entries"][i], fit, key_weight, state["angles"])

    def finish(report, plan):
        out_dtype = getattr(torch, report.options["dtype"])
        ranks = [sum(r) for r in state["ranks"]]
        report.options["kv_ranks"] = ranks
        report.kl_sensitivity = state.get("kl")
        report.options["kv_cache_bytes_per_token"] = {
            "before": kv_cache_bytes_per_token(plan.config, plan.spec, out_dtype),
            "after": kv_cache_bytes_per_token(report.converted_config, plan.spec, out_dtype),
        }

    def details(report):
        return {"kv_ranks": report.options["kv_ranks"], "rank_allocation": rank_allocation, "groups": groups,
                "fit": [x["fit"] for x in report.fit],
                **({"key_weight": key_weight, "rope_average": "uniform angles" if state["angles"] is None else
                    f"relative positions of a {seq_len}-token causal window"} if fit == "attention" else {}),
                "group_ranks": [x["group_ranks"] for x in report.fit],
                "kept_energy": [x["kept_energy"] for x in report.fit],
                "kv_cache_bytes_per_token": report.options["kv_cache_bytes_per_token"],
                **({"kl_sensitivity": state["kl"]} if "kl" in state else {}),
                **({"rope_pairs": rope_pairs, "rope_pairs_per_layer": [x["rope_pairs"] for x in report.fit],
                    "rope_score_kept": [x["rope_score_kept"] for x in report.fit]} if rope_pairs is not None else {})}

    return _pipeline(
        model, output, name="latent-kv",
        options={"kv_rank": kv_rank, "groups": groups, "rank_allocation": rank_allocation, "rope_pairs": rope_pairs,
                 "fit": fit, **({"key_weight": key_weight} if fit == "attention" else {}),
                 **({"kl_probe_seqs": probe_seqs} if rank_allocation == "kl" else {}),
                 "calib": str(calib) if calib else None, "num_seqs": num_seqs, "seq_len": seq_len, "seed": seed},
        layer_fn=layer, exact=False, calib=calib, num_seqs=num_seqs, seq_len=seq_len, seed=seed, dtype=dtype,
        force=force, allow_pickle=allow_pickle, progress=progress, verify=verify, decode=decode, device=device,
        calibrate=True, held_out=True, refuse=refuse, details=details, finish=finish, dry_run=dry_run,
        prepare=prepare, adjust_config=adjust_config,
    )
