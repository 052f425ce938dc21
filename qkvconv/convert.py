"""The conversion pipeline shared by every transform: load, calibrate, transform, verify, write.

Each step is timed; nothing is written unless the transform and its verification succeed.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qkvconv.archs import ArchSpec, dims_of
from qkvconv.checkpoint import Loaded, check_output, load, qkvconv_block, resolve_source, write_with_history
from qkvconv.compat import no_init_weights
from qkvconv.errors import TransformError, VerificationError
from qkvconv.modeling import FORMAT
from qkvconv.transforms import absorb_query, attach_preproj, attach_query_mlp
from qkvconv.transforms.attach import stock_layers
from qkvconv.verify import (
    DecodeCheck,
    LogitError,
    attention_inputs,
    calibration_ids,
    compare_model,
    decode_check,
    logits_of,
)

# fp32 error of an exact absorption grows like eps·cond(W_Q)·|logit| (METHODS.md §1). The default
# bound on max |Δlogit| is loose enough for cond ~1e6 at fp32 and tight enough to catch any algebra bug
# (a wrong sign, transpose or bias moves logits by O(1)).
DEFAULT_ATOL = {torch.float64: 1e-6, torch.float32: 0.1, torch.bfloat16: 2.0, torch.float16: 1.0}


@dataclass
class Report:
    """What a conversion did and how close it stayed to the original."""

    output: Path | None
    transform: str
    options: dict
    error: LogitError
    wq_condition: list[float]
    timings: dict[str, float] = field(default_factory=dict)
    atol: float | None = None
    added: dict[str, int] = field(default_factory=dict)  # new parameters by module kind (attach-*)
    decoding: DecodeCheck | None = None  # greedy decoding: cached vs uncached vs the original


def verify_decoding(original, converted, ids: torch.Tensor, name: str) -> DecodeCheck:
    """The decode check of every conversion: a converted model whose cached greedy decoding differs from its
    uncached decoding (or whose cache does not hold the decoded tokens) fails, and nothing is written."""
    try:
        check = decode_check(original, converted, ids)
    except RuntimeError as e:  # e.g. the shipped modeling code refusing to decode without its cache
        raise VerificationError(f"{name}: decoding with the KV cache failed: {e}; nothing written") from e
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
            "fused_qkv": spec.fused_qkv,
            "qkv_layout": spec.qkv_layout,
            "attn": spec.o_proj.rsplit(".", 1)[0],  # the attention block, relative to a layer
            "o_proj": spec.o_proj,
            "qk_norm": spec.qk_norm,
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
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m.endswith(("lm_head.weight", "embed_out.weight")))]
    if missing or unexpected:
        raise TransformError(f"internal: converted weights do not fit the layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    return model.eval()


def base_class_of(loaded: Loaded) -> str:
    block = qkvconv_block(loaded.config)
    return block["base_class"] if block else type(loaded.model).__name__


def _open(model, output, timings: dict, *, dtype, force: bool, allow_pickle: bool, progress: Progress | None):
    """Check the input and refuse a taken output before the slow load, then load (timed)."""
    source = resolve_source(model, allow_pickle=allow_pickle)
    if output is not None:
        check_output(output, force=force, inputs=[source])
    with _timed(timings, "load", progress):
        loaded = load(source, dtype=dtype, allow_pickle=allow_pickle, with_hash=True)
    return source, loaded


def _write_result(
    output, *, transform: str, options: dict, source, loaded: Loaded, error: LogitError, extra: dict,
    timings: dict, state_dict, config, spec: ArchSpec, seed: int, force: bool,
) -> Path:
    """Append this conversion, with its verification, to the source's history and write the checkpoint atomically."""
    return write_with_history(
        output, transform=transform, options=options, source=source, source_hash=loaded.source_hash,
        details={"verification": error.as_dict(), **extra, "timings_s": timings}, seed=seed, state_dict=state_dict,
        config=config, spec=spec, tokenizer=loaded.tokenizer,
        generation_config=getattr(loaded.model, "generation_config", None), force=force,
    )


def absorb_query_checkpoint(
    model: str | Path,
    output: str | Path | None,
    *,
    mode: str = "exact",
    calib: Path | None = None,
    num_seqs: int = 8,
    seq_len: int = 128,
    seed: int = 0,
    atol: float | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> Report:
    """absorb-query on a checkpoint, verified against the original; writes `output` unless it is None."""
    t: dict[str, float] = {}
    source, loaded = _open(model, output, t, dtype=dtype, force=force, allow_pickle=allow_pickle, progress=progress)
    block = qkvconv_block(loaded.config)
    if block and any(layer["query"] == "identity" for layer in block["layers"]):
        raise TransformError(f"{source.path} already has an identity query; nothing to absorb")
    spec, dims = loaded.spec, dims_of(loaded.config, loaded.spec)
    with _timed(t, "calibrate", progress):
        ids, calib_source = calibration_ids(
            loaded.model, loaded.tokenizer, calib=calib, num_seqs=num_seqs, seq_len=seq_len, seed=seed
        )
        ref = logits_of(loaded.model, ids)
        acts = attention_inputs(loaded.model, spec, ids) if mode == "drop" else None
    with _timed(t, "transform", progress):
        result = absorb_query(loaded.model.state_dict(), spec, dims, mode=mode, attn_inputs=acts)
        config = converted_config(loaded.config, spec, base_class_of(loaded), result.layers)
        new_model = build_converted(config, result.state_dict, dtype)
    with _timed(t, "verify", progress):
        error = compare_model(ref, new_model, ids, calib_source)
        decoding = verify_decoding(loaded.model, new_model, ids, "absorb-query")
    bound = atol if atol is not None else DEFAULT_ATOL.get(dtype, 0.1)
    options = {"mode": mode, "calib": str(calib) if calib else None, "num_seqs": num_seqs, "seq_len": seq_len,
               "seed": seed, "dtype": str(dtype).removeprefix("torch."), "atol": bound if mode == "exact" else None}
    report = Report(None, "absorb-query", options, error, result.wq_condition, t, bound if mode == "exact" else None,
                    decoding=decoding)
    if mode == "exact" and not error.max_abs <= bound:
        raise VerificationError(
            f"exact absorption exceeds --atol {bound:g}: max |Δlogit| {error.max_abs:.3g} "
            f"(max cond(W_Q) {max(result.wq_condition):.3g}); nothing written"
        )
    if output is not None:
        with _timed(t, "save", progress):
            report.output = _write_result(
                output, transform="absorb-query", options=options, source=source, loaded=loaded, error=error,
                extra={"wq_condition": result.wq_condition, "decoding": decoding.as_dict()}, timings=t, state_dict=result.state_dict, config=config, spec=spec, seed=seed,
                force=force,
            )
    return report


# ------------------------------------------------------------------------ attach-query-mlp / attach-preproj
# Zero-started residual branches add exact zeros, so the converted logits equal the original ones bit for bit;
# the bound only leaves room for a different kernel path.
ATTACH_ATOL = 1e-5


def _attach_checkpoint(
    model: str | Path,
    output: str | Path | None,
    name: str,
    attach: Callable,
    options: dict,
    *,
    num_seqs: int,
    seq_len: int,
    seed: int,
    atol: float | None,
    dtype: torch.dtype,
    force: bool,
    allow_pickle: bool,
    progress: Progress | None,
) -> Report:
    """Shared pipeline of the attach commands: load, calibrate, attach, verify exactness, write."""
    t: dict[str, float] = {}
    source, loaded = _open(model, output, t, dtype=dtype, force=force, allow_pickle=allow_pickle, progress=progress)
    spec, dims = loaded.spec, dims_of(loaded.config, loaded.spec)
    block = qkvconv_block(loaded.config)
    layers = copy.deepcopy(block["layers"]) if block else stock_layers(dims)
    with _timed(t, "calibrate", progress):
        ids, calib_source = calibration_ids(loaded.model, loaded.tokenizer, num_seqs=num_seqs, seq_len=seq_len, seed=seed)
        ref = logits_of(loaded.model, ids)
    with _timed(t, "transform", progress):
        result = attach(loaded.model.state_dict(), spec, dims, layers)
        config = converted_config(loaded.config, spec, base_class_of(loaded), result.layers)
        new_model = build_converted(config, result.state_dict, dtype)
    with _timed(t, "verify", progress):
        error = compare_model(ref, new_model, ids, calib_source)
        decoding = verify_decoding(loaded.model, new_model, ids, name)
    bound = ATTACH_ATOL if atol is None else atol
    options = {**options, "num_seqs": num_seqs, "seq_len": seq_len, "seed": seed,
               "dtype": str(dtype).removeprefix("torch."), "atol": bound}
    report = Report(None, name, options, error, [], t, bound, added=result.added, decoding=decoding)
    if not error.max_abs <= bound:
        raise VerificationError(
            f"{name} is not exact at step 0: max |Δlogit| {error.max_abs:.3g} exceeds --atol {bound:g}; nothing written"
        )
    if output is not None:
        with _timed(t, "save", progress):
            report.output = _write_result(
                output, transform=name, options=options, source=source, loaded=loaded, error=error,
                extra={"added_parameters": result.added, "decoding": decoding.as_dict()}, timings=t, state_dict=result.state_dict, config=config, spec=spec, seed=seed,
                force=force,
            )
    return report


def attach_query_mlp_checkpoint(
    model: str | Path,
    output: str | Path | None,
    *,
    rank: int | None = None,
    act: str = "gelu",
    num_seqs: int = 4,
    seq_len: int = 64,
    seed: int = 0,
    atol: float | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Add a zero-started nonlinear residual query (METHODS.md §2), verify exactness, write `output`."""

    def attach(sd, spec, dims, layers):
        return attach_query_mlp(sd, spec, dims, layers, rank=rank, act=act, seed=seed)

    return _attach_checkpoint(
        model, output, "attach-query-mlp", attach, {"rank": rank, "act": act}, num_seqs=num_seqs, seq_len=seq_len,
        seed=seed, atol=atol, dtype=dtype, force=force, allow_pickle=allow_pickle, progress=progress,
    )


def attach_preproj_checkpoint(
    model: str | Path,
    output: str | Path | None,
    *,
    expansion: float = 1.25,
    skip: bool = True,
    num_seqs: int = 4,
    seq_len: int = 64,
    seed: int = 0,
    atol: float | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Add a zero-started pre-projection MLP and content skip (METHODS.md §5), verify exactness, write `output`."""

    def attach(sd, spec, dims, layers):
        return attach_preproj(sd, spec, dims, layers, expansion=expansion, skip=skip, seed=seed)

    return _attach_checkpoint(
        model, output, "attach-preproj", attach, {"expansion": expansion, "skip": skip}, num_seqs=num_seqs,
        seq_len=seq_len, seed=seed, atol=atol, dtype=dtype, force=force, allow_pickle=allow_pickle, progress=progress,
    )


# ------------------------------------------------------------------------------------------- share-kv
def _rope_table(model, seq_len: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """cos, sin (seq_len, rotary_dim) of the model's own rotary embedding, None without RoPE."""
    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
    if rotary is None:
        return None, None
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(x, torch.arange(seq_len)[None])
    return cos[0].double(), sin[0].double()


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
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    pos2d: int | None = None,
) -> Report:
    """share-kv on a checkpoint (lossy: reported, never refused), written to `output` unless it is None.

    Calibration: num_seqs×seq_len tokens (default 16×128; 40×256 for init="calibrated", which fits on
    4 of every 5 sequences and reports the error on the 5th).

    export="stock" writes the stock architecture (K=V as duplicated weights, pooled heads as num_key_value_heads):
    loads without remote code, but a K=V cache is then not shared.
    """
    from transformers import AutoModelForCausalLM

    from qkvconv.describe import kv_cache_bytes_per_token
    from qkvconv.transforms.share_kv import Calibration, check_share_options, share_kv

    if export not in (None, "stock"):
        raise TransformError(f"unknown --export {export!r}; the only export is stock")
    t: dict[str, float] = {}
    source, loaded = _open(model, output, t, dtype=dtype, force=force, allow_pickle=allow_pickle, progress=progress)
    if qkvconv_block(loaded.config):
        raise TransformError(f"{source.path} is already a qkvconv-converted checkpoint; share-kv needs a stock one")
    spec, dims = loaded.spec, dims_of(loaded.config, loaded.spec)
    N = check_share_options(mode, kv_heads, init, dims, pos2d)  # fail before the slow calibration
    num_seqs = num_seqs or (40 if init == "calibrated" else 16)
    seq_len = seq_len or (256 if init == "calibrated" else 128)
    with _timed(t, "calibrate", progress):
        ids, calib_source = calibration_ids(
            loaded.model, loaded.tokenizer, calib=calib, num_seqs=num_seqs, seq_len=seq_len, seed=seed
        )
        calibration = None
        if init == "calibrated":
            # fit on 4 of every 5 windows, verify on the 5th: the reported error is out of sample
            if len(ids) < 2:
                raise TransformError(f"--init calibrated needs at least 2 calibration sequences (got {len(ids)})")
            held = torch.arange(len(ids)) % 5 == 4
            held[-1] |= not held.any()
            fit_ids, ids = ids[~held], ids[held]
            calib_source += f"; verified on the {len(ids)} held-out sequences, fitted on the other {len(fit_ids)}"
            cos, sin = _rope_table(loaded.model, fit_ids.shape[1])
            eps = float(getattr(loaded.config, "rms_norm_eps", 1e-6) or 1e-6)
            calibration = Calibration(attention_inputs(loaded.model, spec, fit_ids), fit_ids.shape[1], cos, sin, eps)
        ref = logits_of(loaded.model, ids)
    with _timed(t, "transform", progress):
        stock_heads = None
        if export == "stock":
            config, stock_heads = stock_config(loaded.config, N)
        result = share_kv(loaded.model.state_dict(), spec, dims, mode=mode, kv_heads=kv_heads, init=init,
                          calibration=calibration, stock_kv_heads=stock_heads, pos2d=pos2d)
        if export == "stock":
            new_model = AutoModelForCausalLM.from_config(config).to(dtype)
            new_model.load_state_dict(result.state_dict, strict=not getattr(config, "tie_word_embeddings", False))
            new_model.eval()
        else:
            config = converted_config(loaded.config, spec, base_class_of(loaded), result.layers)
            new_model = build_converted(config, result.state_dict, dtype)
    with _timed(t, "verify", progress):
        error = compare_model(ref, new_model, ids, calib_source)
        decoding = verify_decoding(loaded.model, new_model, ids, "share-kv")
    before = kv_cache_bytes_per_token(loaded.config, spec, dtype)
    after = kv_cache_bytes_per_token(new_model.config, spec, dtype) if export == "stock" else \
        kv_cache_bytes_per_token(config, spec, dtype)
    options = {"mode": mode or "none", "kv_heads": N, "init": init, "export": export, "pos2d": pos2d,
               "calib": str(calib) if calib else None, "num_seqs": num_seqs, "seq_len": seq_len, "seed": seed,
               "dtype": str(dtype).removeprefix("torch."),
               "kv_cache_bytes_per_token": {"before": before, "after": after}}
    report = Report(None, "share-kv", options, error, [], t, None, decoding=decoding)
    report.fit = result.fit
    if output is not None:
        with _timed(t, "save", progress):
            report.output = _write_result(
                output, transform="share-kv", options=options, source=source, loaded=loaded, error=error,
                extra={"calibrated_fit": result.fit, "decoding": decoding.as_dict()}, timings=t, state_dict=result.state_dict, config=config, spec=spec, seed=seed,
                force=force,
            )
    return report
