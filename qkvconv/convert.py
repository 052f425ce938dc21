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

from qkvconv import __version__
from qkvconv.archs import ArchSpec, dims_of
from qkvconv.checkpoint import Loaded, check_output, load, qkvconv_block, read_record, resolve_source, untie, write_checkpoint
from qkvconv.errors import TransformError, VerificationError
from qkvconv.manifest import manifest
from qkvconv.modeling import FORMAT
from qkvconv.transforms import absorb_query
from qkvconv.verify import LogitError, attention_inputs, calibration_ids, compare_model, logits_of

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
    source = resolve_source(model, allow_pickle=allow_pickle)
    if output is not None:
        check_output(output, force=force, inputs=[source])
    with _timed(t, "load", progress):
        loaded = load(source, dtype=dtype, allow_pickle=allow_pickle, with_hash=True)
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
    bound = atol if atol is not None else DEFAULT_ATOL.get(dtype, 0.1)
    options = {"mode": mode, "calib": str(calib) if calib else None, "num_seqs": num_seqs, "seq_len": seq_len,
               "seed": seed, "dtype": str(dtype).removeprefix("torch."), "atol": bound if mode == "exact" else None}
    report = Report(None, "absorb-query", options, error, result.wq_condition, t, bound if mode == "exact" else None)
    if mode == "exact" and not error.max_abs <= bound:
        raise VerificationError(
            f"exact absorption exceeds --atol {bound:g}: max |Δlogit| {error.max_abs:.3g} "
            f"(max cond(W_Q) {max(result.wq_condition):.3g}); nothing written"
        )
    if output is not None:
        with _timed(t, "save", progress):
            history = (read_record(source.path) or {}).get("history", []) if source.kind == "hf_dir" else []
            entry = {
                "transform": "absorb-query",
                "options": options,
                "source": {"path": source.path, "kind": source.kind, "sha256": loaded.source_hash},
                "verification": error.as_dict(),
                "wq_condition": result.wq_condition,
                "timings_s": t,
            }
            record = {"qkvconv_version": __version__, "history": [*history, entry], "manifest": manifest(seed=seed)}
            report.output = write_checkpoint(
                output,
                state_dict=untie(result.state_dict, config, spec),
                config=config,
                tokenizer=loaded.tokenizer,
                generation_config=getattr(loaded.model, "generation_config", None),
                record=record,
                force=force,
            )
    return report
