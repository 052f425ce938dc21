"""attach-query-mlp and attach-preproj: add zero-started residual MLPs to attention (METHODS.md §2, §5).

Both add a residual branch whose last factor starts at zero, so the converted model computes exactly
what the original did until it is finetuned:

    query MLP (arXiv 2603.13381):  q = X + f(X),  f(X) = LayerNorm_γ(GELU(RMSNorm(X)·W1)·W2),  γ = 0
        X is the query in query coordinates before q_norm and RoPE: h·W_Q + b_Q, or h' after absorb-query.
    pre-projection MLP (arXiv 2604.10791):  x̃ = x̂ + W_down·SiLU(W_up·x̂),  W_down = 0
        between the pre-attention norm and Q/K/V; content skip: attention output += W_skip·x̃,  W_skip = 0.

Weights of the original model keep their names; the new ones live under `<q module>.query_mlp.*`,
`<attn_norm>.preproj.*` and `<attention>.content_skip.*` (see modeling_qkvconv.attach_residual_modules).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkvconv.archs import ArchSpec, Dims, attention_owns_its_norm
from qkvconv.errors import TransformError
from qkvconv.transforms.layer import LayerResult, layer_dtype

ACTIVATIONS = ("gelu", "silu", "relu")


@dataclass
class AttachResult:
    state_dict: dict[str, torch.Tensor]
    layers: list[dict]  # per-layer layout block for the loader (modeling_qkvconv)
    added: dict[str, int]  # new parameters by module kind


def stock_layers(dims: Dims) -> list[dict]:
    """The layout block of an unconverted model: every layer as it came."""
    return [{"query": "projection", "attn_input": "norm"} for _ in range(dims.num_hidden_layers)]


def attention_module(spec: ArchSpec) -> str:
    """The attention block relative to a layer (the parent of the output projection), e.g. "self_attn"."""
    return spec.o_proj.rsplit(".", 1)[0]


def attention_parts(spec: ArchSpec) -> list[str]:
    """The modules of a layer that make up its attention, relative to the layer: the attention block, and where the
    family has a pre-attention norm, what qkvconv puts on it (the absorbed affine, the pre-projection MLP), e.g.
    ["self_attn", "input_layernorm.affine", "input_layernorm.preproj"]. Without one (olmo2: attn_norm null) those
    live inside the attention block (attn_in, preproj on the attention), so the list is just ["self_attn"]."""
    parts = [attention_module(spec)]
    if spec.attn_norm is not None:
        parts += [f"{spec.attn_norm}.affine", f"{spec.attn_norm}.preproj"]
    return parts


def query_module(spec: ArchSpec) -> str:
    """The module whose output holds the query (the q projection, or the fused QKV projection)."""
    return spec.q_proj if spec.qkv_layout == "separate" else spec.fused_qkv


def _normal(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    # drawn where the generator is (the CPU) whatever device the conversion runs on: one seed, the same weights
    return torch.randn(shape, generator=gen, dtype=torch.float64, device=gen.device) * fan_in**-0.5


def _check_layers(layers: list[dict], dims: Dims, key: str, command: str) -> None:
    if len(layers) != dims.num_hidden_layers:
        raise TransformError(f"layout block has {len(layers)} layers, the model {dims.num_hidden_layers}")
    if any(key in layer for layer in layers):
        raise TransformError(f"the model already has a {key.replace('_', ' ')}; {command} applies once")


def layer_generator(seed: int, i: int) -> torch.Generator:
    """Layer i's own random stream: the same weights whatever order (or subset) the layers are converted in."""
    return torch.Generator().manual_seed(seed * 1_000_003 + i)


def _query_mlp_rank(dims: Dims, rank: int | None, act: str) -> int:
    if act not in ACTIVATIONS:
        raise TransformError(f"unknown activation {act!r}; use one of {', '.join(ACTIVATIONS)}")
    size = dims.q_size
    rank = size // 2 if rank is None else rank
    if not 1 <= rank <= 4 * size:
        raise TransformError(f"--rank must be between 1 and {4 * size} for query size {size}, not {rank}")
    return rank


def attach_query_mlp_layer(
    sd: dict[str, torch.Tensor], spec: ArchSpec, dims: Dims, i: int, entry: dict, *, rank: int | None = None,
    act: str = "gelu", seed: int = 0,
) -> LayerResult:
    """Layer i of attach-query-mlp; `entry` is the layer's current layout entry (stock_layers for a stock model)."""
    if "query_mlp" in entry:
        raise TransformError("the model already has a query mlp; attach-query-mlp applies once")
    rank = _query_mlp_rank(dims, rank, act)
    size = dims.q_size
    dtype = layer_dtype(sd, f"{spec.layers}.{i}.")
    gen = layer_generator(seed, i)
    key = f"{spec.layer(i, query_module(spec))}.query_mlp"
    out = {
        f"{key}.norm.weight": torch.ones(size, dtype=dtype),  # RMSNorm gain
        f"{key}.up.weight": _normal((rank, size), size, gen).to(dtype),  # W1ᵀ, (R, d_q)
        f"{key}.down.weight": _normal((size, rank), rank, gen).to(dtype),  # W2ᵀ, (d_q, R)
        f"{key}.out_norm.weight": torch.zeros(size, dtype=dtype),  # LayerNorm gain 0: f(X) = 0
    }
    added = {"query_mlp": 2 * size * rank + 2 * size}
    return LayerResult(out, [], {**entry, "query_mlp": {"size": size, "rank": rank, "act": act}}, {"added": added})


def attach_query_mlp(
    state_dict: dict[str, torch.Tensor],
    spec: ArchSpec,
    dims: Dims,
    layers: list[dict],
    *,
    rank: int | None = None,
    act: str = "gelu",
    seed: int = 0,
) -> AttachResult:
    """Add a zero-started query MLP to every layer; the input dict and `layers` are not modified.

    rank: R, default d_q/2 with d_q = heads·head_dim (the query size; = d where W_Q is square).
    """
    _check_layers(layers, dims, "query_mlp", "attach-query-mlp")
    return _every_layer(state_dict, layers, lambda i, entry: attach_query_mlp_layer(
        state_dict, spec, dims, i, entry, rank=rank, act=act, seed=seed))


def _every_layer(state_dict: dict, layers: list[dict], one) -> AttachResult:
    out, new_layers, added = dict(state_dict), [], {}
    for i, entry in enumerate(layers):
        res = one(i, entry)
        res.apply(out)
        new_layers.append(res.entry)
        for kind, n in res.info["added"].items():
            added[kind] = added.get(kind, 0) + n
    return AttachResult(out, new_layers, added)


def _check_preproj(spec: ArchSpec, expansion: float) -> None:
    if not 0 < expansion <= 16:
        raise TransformError(f"--expansion must be in (0, 16], not {expansion}")


def attach_preproj_layer(
    sd: dict[str, torch.Tensor], spec: ArchSpec, dims: Dims, i: int, entry: dict, *, expansion: float = 1.25,
    skip: bool = True, seed: int = 0,
) -> LayerResult:
    """Layer i of attach-preproj; `entry` is the layer's current layout entry."""
    if "preproj" in entry:
        raise TransformError("the model already has a preproj; attach-preproj applies once")
    _check_preproj(spec, expansion)
    d = dims.hidden_size
    inner = max(1, round(expansion * d))
    dtype = layer_dtype(sd, f"{spec.layers}.{i}.")
    gen = layer_generator(seed, i)
    on_attention = not attention_owns_its_norm(spec, dims)
    key = f"{spec.layer(i, attention_module(spec) if on_attention else spec.attn_norm)}.preproj"
    out = {
        f"{key}.up.weight": _normal((inner, d), d, gen).to(dtype),  # W_up, (E, d)
        f"{key}.down.weight": torch.zeros(d, inner, dtype=dtype),  # W_down = 0: x̃ = x̂
    }
    added = {"preproj": 2 * d * inner}
    if skip:
        out[f"{spec.layer(i, attention_module(spec))}.content_skip.weight"] = torch.zeros(d, d, dtype=dtype)  # W_skip = 0
        added["content_skip"] = d * d
    new = {**entry, "preproj": {"size": d, "inner": inner, "expansion": expansion, "skip": skip}}
    if on_attention:  # on the attention's input only: the MLP's input is unchanged
        new["preproj"]["on"] = "attention"
    return LayerResult(out, [], new, {"added": added})


def attach_preproj(
    state_dict: dict[str, torch.Tensor],
    spec: ArchSpec,
    dims: Dims,
    layers: list[dict],
    *,
    expansion: float = 1.25,
    skip: bool = True,
    seed: int = 0,
) -> AttachResult:
    """Add a zero-started pre-projection MLP (and content skip) to every layer; inputs are not modified."""
    _check_layers(layers, dims, "preproj", "attach-preproj")
    _check_preproj(spec, expansion)
    return _every_layer(state_dict, layers, lambda i, entry: attach_preproj_layer(
        state_dict, spec, dims, i, entry, expansion=expansion, skip=skip, seed=seed))


def added_module_prefixes(layers: list[dict], spec: ArchSpec) -> list[str]:
    """State-dict prefixes of the modules qkvconv added (what `finetune --train new` trains)."""
    prefixes = []
    for i, layer in enumerate(layers):
        if "query_mlp" in layer:
            prefixes.append(f"{spec.layer(i, query_module(spec))}.query_mlp.")
        if "preproj" in layer:
            on = attention_module(spec) if layer["preproj"].get("on") == "attention" else spec.attn_norm
            prefixes.append(f"{spec.layer(i, on)}.preproj.")
            if layer["preproj"].get("skip"):
                prefixes.append(f"{spec.layer(i, attention_module(spec))}.content_skip.")
        if "pos2d" in layer:
            prefixes.append(f"{spec.layer(i, attention_module(spec))}.pos2d.")
        if "kv_latent" in layer:  # latent-kv: the down- and up-projections (and kept RoPE pairs) replace k/v_proj
            attn = spec.layer(i, attention_module(spec))
            prefixes += [f"{attn}.{m}." for m in ("kv_a_proj", "k_b_proj", "v_b_proj", "k_rope_proj")]
    return prefixes
