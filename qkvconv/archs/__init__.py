"""Architecture knowledge as data: one JSON spec per family, validated, plus the lookup.

Transforms never branch on `model_type`; they read an `ArchSpec` and the `Dims` of a config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict

from qkvconv.errors import UnsupportedArchitecture


class ArchSpec(BaseModel):
    """Where a family keeps its attention weights and how they are packed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str
    model_types: list[str]
    layers: str  # module path of the decoder-layer list
    attn_norm: str | None  # pre-attention norm, relative to a layer; None: attention reads the raw residual (olmo2)
    norm_kind: Literal["rmsnorm", "layernorm"]
    norm_gain_offset: float = 0.0  # every norm scales by (offset + weight): gemma stores γ of a (1 + γ) gain
    qkv_layout: Literal["separate", "fused_concat_conv1d", "fused_per_head", "fused_concat_linear"]
    q_proj: str | None
    k_proj: str | None
    v_proj: str | None
    o_proj: str
    fused_qkv: str | None
    qk_norm: list[str]  # per-head norms on q and k, where the model has them
    positional: Literal["rope", "partial_rope", "learned"]  # rope: every dim rotates (the family's code ignores a
    # config's partial_rotary_factor); partial_rope: the first partial_rotary_factor / rotary_pct of each head
    input_embeddings: list[str]
    output_embedding: str
    mlp_reads_attn_norm: bool  # GPT-J style shared norm: the MLP would need Θ⁻¹ too
    mlp_reads_attn_norm_when: str | None = None  # config flag that makes the MLP read the attention norm (stablelm)
    # what one QK-norm spans: "head" one norm shared by every head (dh); "each_head" one norm per head (stablelm);
    # "projection" one norm over the whole H·dh projection (olmo2)
    qk_norm_scope: Literal["head", "each_head", "projection"] = "head"
    rope_table: Literal["duplicated", "half"] = "duplicated"  # the rotary module's cos/sin: each frequency twice
    # (rotate_half layout, width rotary_dim), or once (width rotary_dim/2, gpt_oss; the same rotation)

    def layer(self, i: int, module: str) -> str:
        return f"{self.layers}.{i}.{module}"


@dataclass(frozen=True)
class Dims:
    """Attention sizes of one model, in HF vocabulary."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int  # 0 without RoPE
    mlp_reads_attn_norm: bool = False  # the MLP reads the pre-attention norm's output too (parallel, one norm)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


def attention_owns_its_norm(spec: ArchSpec, dims: Dims) -> bool:
    """A pre-attention norm that only the attention reads: absorb-query folds W_Q into it and attach-preproj hangs on
    it. Otherwise (no such norm: olmo2; the MLP reads it too: phi, parallel stablelm) both go on the attention's
    own input, so the MLP and the residual still see what they saw."""
    return spec.attn_norm is not None and not dims.mlp_reads_attn_norm


@cache
def all_specs() -> tuple[ArchSpec, ...]:
    files = sorted(p for p in resources.files("qkvconv.archs").iterdir() if p.name.endswith(".json"))
    return tuple(ArchSpec.model_validate(json.loads(p.read_text())) for p in files)


def supported_model_types() -> list[str]:
    return sorted(t for s in all_specs() for t in s.model_types)


def spec_for(model_type: str | None) -> ArchSpec:
    for spec in all_specs():
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitecture(
        f"unsupported architecture {model_type!r}; qkvconv supports: {', '.join(supported_model_types())}"
    )


def rotary_fraction(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    for key in ("partial_rotary_factor", "rotary_pct"):
        if key in params:
            return float(params[key])
        if getattr(config, key, None) is not None:
            return float(getattr(config, key))
    return 1.0


def rope_inv_freq(config, dims: Dims):
    """The RoPE frequencies ω_i of the rotary pairs, (rotary_dim/2,) float64 tensor, as transformers computes them
    (the default θ^(−2i/rotary_dim), or its ROPE_INIT_FUNCTIONS for scaled types); None without RoPE, where the
    layers' RoPE differs (per-layer-type parameters), or for a type whose frequencies depend on the sequence."""
    import torch

    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not dims.rotary_dim or any(isinstance(v, dict) for v in params.values()):
        return None
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if kind == "default" and theta is not None:
        return float(theta) ** -(torch.arange(0, dims.rotary_dim, 2, dtype=torch.float64) / dims.rotary_dim)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS or kind in ("dynamic", "longrope"):
        return None
    inv_freq = ROPE_INIT_FUNCTIONS[kind](config, "cpu")[0].double()
    return inv_freq if len(inv_freq) == dims.rotary_dim // 2 else None


def dims_of(config, spec: ArchSpec) -> Dims:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rotary = {"learned": 0, "rope": head_dim}.get(spec.positional, int(head_dim * rotary_fraction(config)))
    return Dims(
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rotary_dim=rotary,
        mlp_reads_attn_norm=spec.mlp_reads_attn_norm
        or bool(spec.mlp_reads_attn_norm_when and getattr(config, spec.mlp_reads_attn_norm_when, False)),
    )
