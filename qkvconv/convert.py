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
from qkvconv.modeling.modeling_qkvconv import restore_folded, to_dtype_keeping_folded
from qkvconv.errors import TransformError, VerificationError
from qkvconv.modeling import FORMAT
from qkvconv.transforms import absorb_query, attach_preproj, attach_query_mlp
from qkvconv.transforms.attach import stock_layers
from qkvconv.verify import (
    DecodeCheck,
    Exactness,
    LogitError,
    attention_inputs,
    calibration_ids,
    compare_model,
    decode_check,
    logits_of,
    measure_exactness,
)



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
    exactness: Exactness | None = None  # exact transforms: algebraic error and rounding ratio


def folded_dtypes(model) -> dict[str, torch.dtype]:
    """State-dict key -> dtype of every parameter a converted model keeps at its own precision (keep_folded)."""
    out = {}
    for name, module in model.named_modules():
        if getattr(module, "_qkvconv_folded", None) is not None:
            for p, _ in module.named_parameters(recurse=False):
                out[f"{name}.{p}" if name else p] = module._qkvconv_folded
    return out


def _cast_output(state_dict: dict, dtype: torch.dtype, keep: dict[str, torch.dtype]) -> dict:
    """The one cast of the float64 algebra to the output dtype; keys in `keep` to their own dtype."""
    return {k: v.to(keep.get(k, dtype)) for k, v in state_dict.items()}


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
            "k_proj": spec.k_proj,
            "v_proj": spec.v_proj,
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
    restore_folded(model)  # folded maps stay at their own precision
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
    folded_dtype: torch.dtype | None = torch.float64,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> Report:
    """absorb-query on a checkpoint, verified against the original; writes `output` unless it is None.

    exact: the float64 algebra is cast once to `dtype`; the folded maps are kept at `folded_dtype` (default float64;
    None: the output dtype), and the conversion is refused unless it is exact in float64 and rounds like the
    original in `dtype` (verify.Exactness); `atol` adds an absolute bound on max |Δlogit|."""
    if mode == "exact":
        return _exact_checkpoint(
            model, output, "absorb-query", lambda sd, spec, dims, layers: absorb_query(sd, spec, dims, mode="exact"),
            {"mode": "exact"}, calib=calib, num_seqs=num_seqs, seq_len=seq_len, seed=seed, atol=atol, dtype=dtype,
            folded_dtype=folded_dtype, force=force, allow_pickle=allow_pickle, progress=progress,
        )
    t: dict[str, float] = {}
    source, loaded = _open(model, output, t, dtype=dtype, force=force, allow_pickle=allow_pickle, progress=progress)
    _refuse_absorbed(loaded, source)
    spec, dims = loaded.spec, dims_of(loaded.config, loaded.spec)
    with _timed(t, "calibrate", progress):
        ids, calib_source = calibration_ids(
            loaded.model, loaded.tokenizer, calib=calib, num_seqs=num_seqs, seq_len=seq_len, seed=seed
        )
        ref = logits_of(loaded.model, ids)
        acts = attention_inputs(loaded.model, spec, ids)
    with _timed(t, "transform", progress):
        result = absorb_query(loaded.model.state_dict(), spec, dims, mode=mode, attn_inputs=acts)
        config = converted_config(loaded.config, spec, base_class_of(loaded), result.layers)
        new_model = build_converted(config, result.state_dict, dtype)
    with _timed(t, "verify", progress):
        error = compare_model(ref, new_model, ids, calib_source)
        decoding = verify_decoding(loaded.model, new_model, ids, "absorb-query")
    options = {"mode": mode, "calib": str(calib) if calib else None, "num_seqs": num_seqs, "seq_len": seq_len,
               "seed": seed, "dtype": str(dtype).removeprefix("torch."), "atol": None}
    report = Report(None, "absorb-query", options, error, result.wq_condition, t, None, decoding=decoding)
    if output is not None:
        with _timed(t, "save", progress):
            report.output = _write_result(
                output, transform="absorb-query", options=options, source=source, loaded=loaded, error=error,
                extra={"wq_condition": result.wq_condition, "decoding": decoding.as_dict()}, timings=t,
                state_dict=result.state_dict, config=config, spec=spec, seed=seed, force=force,
            )
    return report


def _refuse_absorbed(loaded: Loaded, source) -> None:
    block = qkvconv_block(loaded.config)
    if block and any(layer["query"] == "identity" for layer in block["layers"]):
        raise TransformError(f"{source.path} already has an identity query; nothing to absorb")


def _exact_checkpoint(
    model, output, name: str, transform: Callable, options: dict, *, calib, num_seqs: int, seq_len: int, seed: int,
    atol: float | None, dtype: torch.dtype, folded_dtype: torch.dtype | None, force: bool, allow_pickle: bool,
    progress: Progress | None,
) -> Report:
    """The pipeline of every exact transform: load in float64, calibrate, transform (float64 algebra), one cast to
    the output dtype, then verify: algebra in float64, rounding against the original's own, decoding; write."""
    t: dict[str, float] = {}
    source, loaded = _open(model, output, t, dtype=torch.float64, force=force, allow_pickle=allow_pickle,
                           progress=progress)
    if name == "absorb-query":
        _refuse_absorbed(loaded, source)
    spec, dims = loaded.spec, dims_of(loaded.config, loaded.spec)
    block = qkvconv_block(loaded.config)
    layers = copy.deepcopy(block["layers"]) if block else stock_layers(dims)
    with _timed(t, "calibrate", progress):
        ids, calib_source = calibration_ids(
            loaded.model, loaded.tokenizer, calib=calib, num_seqs=num_seqs, seq_len=seq_len, seed=seed
        )
    with _timed(t, "transform", progress):
        result = transform(loaded.model.state_dict(), spec, dims, layers)  # float64 in, float64 out
        folded = getattr(result, "folded", [])
        keep = folded_dtype if folded and folded_dtype is not None and folded_dtype != dtype else None
        for layer in result.layers if keep is not None else []:
            if layer.get("attn_input") == "affine":
                layer["folded_dtype"] = str(keep).removeprefix("torch.")
        config = converted_config(loaded.config, spec, base_class_of(loaded), result.layers)
        config.dtype = dtype  # the checkpoint's dtype (the source was read in float64 for the algebra)
        converted64 = build_converted(config, result.state_dict, torch.float64)
        # the one cast: every tensor to the output dtype, except the folded maps (this transform's or an absorbed
        # source's), which keep the precision their module is declared at
        out_sd = _cast_output(result.state_dict, dtype, folded_dtypes(converted64))
        new_model = converted64 if dtype == torch.float64 else build_converted(config, out_sd, dtype)
        original = loaded.model
        if dtype != torch.float64:
            original = to_dtype_keeping_folded(copy.deepcopy(loaded.model), dtype)
    cond = list(getattr(result, "wq_condition", []))
    with _timed(t, "verify", progress):
        exact, error = measure_exactness(loaded.model, converted64, original, new_model, ids, calib_source)
        check_exactness(name, exact, error, atol, cond)
        del converted64
        decoding = verify_decoding(original, new_model, ids, name)
    options = {**options, "calib": str(calib) if calib else None, "num_seqs": num_seqs, "seq_len": seq_len,
               "seed": seed, "dtype": str(dtype).removeprefix("torch."),
               "folded_dtype": str(keep).removeprefix("torch.") if keep is not None else None, "atol": atol}
    report = Report(None, name, options, error, cond, t, atol, added=getattr(result, "added", {}), decoding=decoding,
                    exactness=exact)
    if output is not None:
        extra = {"exactness": exact.as_dict(), "decoding": decoding.as_dict()}
        extra.update({"wq_condition": cond} if cond else {"added_parameters": result.added})
        with _timed(t, "save", progress):
            report.output = _write_result(
                output, transform=name, options=options, source=source, loaded=loaded, error=error, extra=extra,
                timings=t, state_dict=out_sd, config=config, spec=spec, seed=seed, force=force,
            )
    return report


# ------------------------------------------------------------------------ attach-query-mlp / attach-preproj
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
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Add a zero-started nonlinear residual query (METHODS.md §2), verify exactness, write `output`."""

    def attach(sd, spec, dims, layers):
        return attach_query_mlp(sd, spec, dims, layers, rank=rank, act=act, seed=seed)

    return _exact_checkpoint(
        model, output, "attach-query-mlp", attach, {"rank": rank, "act": act}, calib=calib, num_seqs=num_seqs,
        seq_len=seq_len, seed=seed, atol=atol, dtype=dtype, folded_dtype=None, force=force, allow_pickle=allow_pickle,
        progress=progress,
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
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Add a zero-started pre-projection MLP and content skip (METHODS.md §5), verify exactness, write `output`."""

    def attach(sd, spec, dims, layers):
        return attach_preproj(sd, spec, dims, layers, expansion=expansion, skip=skip, seed=seed)

    return _exact_checkpoint(
        model, output, "attach-preproj", attach, {"expansion": expansion, "skip": skip}, calib=calib,
        num_seqs=num_seqs, seq_len=seq_len, seed=seed, atol=atol, dtype=dtype, folded_dtype=None, force=force,
        allow_pickle=allow_pickle, progress=progress,
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
