"""Attention variants of qkvconv-converted checkpoints, for loading with plain transformers.

This file is self-contained (it imports torch and transformers only) and is copied next to every
converted checkpoint, so `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works
where qkvconv is not installed. The stock model class of the family is built first, then the modules
named in `config.qkvconv` are swapped for the variants below. Family knowledge (module paths, fused
layout) comes from the config block, never from `model_type`.

Config block (config.json, key "qkvconv"):
    {"format": 1, "base_class": "LlamaForCausalLM",
     "paths": {"layers": ..., "attn_norm": ..., "q_proj": ..., "fused_qkv": ..., "qkv_layout": ...},
     "layers": [{"query": "identity" | "projection", "attn_input": "affine" | "attn_affine" | "norm",
                 optional share-kv keys: "kv": "shared", "qk": "shared", "kv_heads": N,
                 "pos2d": {"channels": p} (q=k only); latent-kv: "kv_latent": {"rank": r, optional "rope_pairs":
                 [[frequency indices] per KV head], optional "group_ranks": [r_1, ...] per group of KV heads}}, ...]}
    "folded_dtype": "float64" (absorb-query: the folded maps kept at that precision, see keep_folded),
    optional per-layer keys: "query_mlp": {"size", "rank", "act"} (QueryMLP on the q projection),
    "preproj": {"size", "inner", "expansion", "skip", optional "on": "attention"} (PreProj on attn_norm, or on the
    attention's input where no norm is private to it; content skip on paths["attn"])
    "attn_affine": h' = h·M + c as `<attn>.attn_in` on the attention's input (absorb-query where the MLP reads the same
    norm, or where there is no pre-attention norm), see attach_attention_input
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

FORMAT = 1
BASE_CLASSES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GraniteForCausalLM",
    "SmolLM3ForCausalLM",
    "GptOssForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "Phi3ForCausalLM",
    "PhiForCausalLM",
    "StableLmForCausalLM",
    "Olmo2ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)


# ------------------------------------------------------------- transformers compatibility (tested 5.0.0 … 5.24.0)
# Every calling convention of transformers that this file relies on beyond the public model classes, in one place:
# - the KV cache reaches an attention module as `cache=` (llama, mistral, qwen2/3, gpt2 from 5.24), as
#   `past_key_values=` (those families in 5.0 … 5.23) or `layer_past=` (gpt_neox, every 5.x); `past_key_value=` was
#   4.x's name. A cache under a name not listed here is still found by its type (transformers.cache_utils.Cache).
# - Cache.update(key, value, layer_idx) -> (all keys, all values) and Cache.get_seq_length(layer_idx) (all 5.x).
# - the attention kernel: transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS.get_interface(name, default) from
#   5.1 (5.0 indexes the mapping by name, "eager" absent), and gemma2's eager_attention_forward(module, q, k, v,
#   mask, dropout=, scaling=, softcap=, **kwargs) (all 5.x; llama's, plus attention-logit soft-capping); see
#   attention_function.
# - a model output carries the cache as `.cache` (from 5.24) or `.past_key_values` (before).
# - the rotary module (`*.rotary_emb`) is called as rotary(x, position_ids) -> (cos, sin), each (B, T, rotary_dim),
#   with `rope_type` and `inv_freq` attributes (all 5.x); see _RopeTable. Where the config has one RoPE per layer
#   type (gemma3: rope_parameters keyed by config.layer_types), it is rotary(x, position_ids, layer_type) with
#   `rope_type[layer_type]` and `{layer_type}_inv_freq`.
# - transformers' RMSNorm modules carry `weight` and `variance_epsilon` (or `eps`, in the *RMSNorm classes of gemma)
#   (all 5.x); see rms_norm_eps.
# If a forward returns a cache that a shared-projection attention never received, the model raises (see
# _check_cache_reached): decoding silently without a cache is what broke share-kv models under transformers 5.24.
CACHE_KWARGS = ("cache", "past_key_values", "layer_past", "past_key_value")


def attention_function(name: str):
    """The attention kernel transformers registers under `name` ("eager", "sdpa", "flash_attention_2", ...)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward  # llama's + softcap=

    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):  # transformers >= 5.1
        return ALL_ATTENTION_FUNCTIONS.get_interface(name, eager_attention_forward)
    return eager_attention_forward if name == "eager" else ALL_ATTENTION_FUNCTIONS[name]


def _is_cache(x) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(x, Cache)


def take_cache(kwargs: dict):
    """Pop the KV cache from an attention module's keyword arguments, whatever this transformers calls it."""
    found = None
    for name in CACHE_KWARGS:
        value = kwargs.pop(name, None)
        if found is None and value is not None:
            found = value
    if found is None:
        for name in [n for n, v in kwargs.items() if _is_cache(v)]:
            found = kwargs.pop(name)
    return found


def output_cache(output):
    """The KV cache a model output or generate() result carries (`.cache` from transformers 5.24, else
    `.past_key_values`), or None."""
    for name in ("cache", "past_key_values"):
        value = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
        if value is not None:
            return value
    return None


def _reset_cache_seen(model, args, kwargs):
    for m in model._qkvconv_shared_attention:
        m.cache_seen = False


def _check_cache_reached(model, args, kwargs, output):
    """A forward that returns a cache must have passed it to every shared-projection attention module."""
    if output_cache(output) is None:
        return
    missed = [m.layer_idx for m in model._qkvconv_shared_attention if not m.cache_seen]
    if missed:
        raise RuntimeError(
            f"qkvconv: the KV cache did not reach the shared attention of layers {missed[:4]} under transformers "
            f"{transformers.__version__} (it passes the cache under a keyword this modeling file does not know); "
            "refusing to decode without the cache. Use a transformers version in qkvconv's tested range."
        )


def _watch_cache(model: nn.Module) -> None:
    shared = [m for m in model.modules() if isinstance(m, SharedProjectionAttention)]
    if shared:
        model._qkvconv_shared_attention = shared  # a plain list: not registered as submodules twice
        model.register_forward_pre_hook(_reset_cache_seen, with_kwargs=True)
        model.register_forward_hook(_check_cache_reached, with_kwargs=True)


# ------------------------------------------------------------------ absorb-query: folded matrices at high precision
# With the identity query, keys are h'·W_Q⁻¹W_K: the rounding of h' in the model's dtype is amplified by up to
# cond(W_Q) (~1e6 in real checkpoints). A checkpoint whose layer spec says "folded_dtype" keeps the folded maps
# (the norm's affine M, c and the key/value projections) at that dtype (float64): h' is computed and kept there,
# and only q, k, v return to the model's compute dtype, so the converted model rounds like the original.
def _cast_params(module: nn.Module, dtype: torch.dtype) -> None:
    for p in module.parameters(recurse=False):
        p.data = p.data.to(dtype)


def _input_to_param_dtype(module, args):
    return (args[0].to(module.weight.dtype), *args[1:])


def _output_to_compute_dtype(module, args, output):
    return output.to(module.compute_dtype_ref.dtype)


def keep_folded(module: nn.Module, dtype: torch.dtype, hooks: bool = True) -> None:
    """Keep `module`'s parameters at `dtype` whatever the model's dtype; with `hooks`, its input is cast to that dtype
    and its output back to the model's compute dtype (held by a non-persistent buffer that follows .to())."""
    module._qkvconv_folded = dtype
    if hooks:
        compute = next(module.parameters()).dtype
        module.register_buffer("compute_dtype_ref", torch.empty(0, dtype=compute), persistent=False)
        module.register_forward_pre_hook(_input_to_param_dtype)
        module.register_forward_hook(_output_to_compute_dtype)
    _cast_params(module, dtype)


def restore_folded(model: nn.Module) -> None:
    """Put folded parameters back at their dtype after a model-wide .to(dtype)."""
    for m in model.modules():
        if getattr(m, "_qkvconv_folded", None) is not None:
            _cast_params(m, m._qkvconv_folded)


def to_dtype_keeping_folded(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """model.to(dtype), except that folded parameters keep their precision (and their values)."""
    for m in model.modules():
        if getattr(m, "_qkvconv_folded", None) is None:
            _cast_params(m, dtype)
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(dtype)
    return model


class ComputeDtype(nn.Module):
    """The identity query of a folded layer: q = h', returned in the model's compute dtype."""

    def __init__(self):
        super().__init__()
        self.register_buffer("compute_dtype_ref", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.compute_dtype_ref.dtype)


def rms_norm_eps(norm: nn.Module) -> float | None:
    """The epsilon of a transformers RMSNorm module (`variance_epsilon` in llama-like families, `eps` in the
    *RMSNorm classes of gemma-like ones), None for any other module."""
    if hasattr(norm, "variance_epsilon"):
        return norm.variance_epsilon
    if type(norm).__name__.endswith("RMSNorm") and type(norm).__module__.startswith("transformers."):
        return getattr(norm, "eps", None)
    return None


def _norm_at(norm: nn.Module, x: torch.Tensor, gain_offset: float = 0.0) -> torch.Tensor:
    """`norm`(x) computed in x's dtype. transformers' RMSNorm always normalises in float32 and scales by
    (gain_offset + weight) (gemma: 1 + γ); nn.LayerNorm computes in its input's dtype."""
    eps = rms_norm_eps(norm)
    if eps is not None:
        gain = gain_offset + norm.weight.to(x.dtype)
        return gain * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    if isinstance(norm, nn.LayerNorm):
        w = None if norm.weight is None else norm.weight.to(x.dtype)
        b = None if norm.bias is None else norm.bias.to(x.dtype)
        return nn.functional.layer_norm(x, norm.normalized_shape, w, b, norm.eps)
    return norm(x).to(x.dtype)


class AffineNorm(nn.Module):
    """The pre-attention norm followed by a full affine map: h' = Norm(x)·M + c (absorb-query).

    folded: M, c stay at their own (high) precision and h' is returned at it (see keep_folded).
    gain_offset: the norm scales by (gain_offset + weight) (paths["norm_gain_offset"]; 1 in gemma)."""

    def __init__(self, norm: nn.Module, hidden_size: int, folded: torch.dtype | None = None, gain_offset: float = 0.0):
        super().__init__()
        self.norm, self.gain_offset = norm, gain_offset
        self.affine = nn.Linear(hidden_size, hidden_size, bias=True)
        self.folded = folded is not None
        if folded is not None:
            keep_folded(self.affine, folded, hooks=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return self.affine(_norm_at(self.norm, x.to(self.affine.weight.dtype), self.gain_offset))
        return self.affine(self.norm(x))


def _replace_attention_input(args, kwargs, fn):
    """(args, kwargs) of an attention forward with its hidden_states (first positional, or keyword) mapped by fn."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}


def _attn_in_hook(module, args, kwargs):
    return _replace_attention_input(args, kwargs, lambda x: module.attn_in(x.to(module.attn_in.weight.dtype)))


def attach_attention_input(attn: nn.Module, hidden_size: int, folded: torch.dtype | None) -> None:
    """h' = h·M + c applied to the attention module's input only (`attn.attn_in`, a forward pre-hook): absorb-query's
    map where it cannot live in a norm. folded: M, c kept at that precision and h' returned at it (see keep_folded)."""
    attn.attn_in = nn.Linear(hidden_size, hidden_size, bias=True)
    if folded is not None:
        keep_folded(attn.attn_in, folded, hooks=False)
    attn.register_forward_pre_hook(_attn_in_hook, with_kwargs=True)


class IdentityQueryFused(nn.Module):
    """A fused QKV projection whose query part is the identity: q = x, [k | v] = kv(x).

    Output is packed like the stock fused module so the stock attention code splits it unchanged:
      fused_concat_conv1d: [q | k | v]                       (GPT-2)
      fused_concat_linear: [q (H·dh) | k (G·dh) | v (G·dh)]  (Phi-3; kv_size = G·dh)
      fused_per_head:      per head [q_h | k_h | v_h], (H, 3, dh) (GPT-NeoX)
    """

    def __init__(self, hidden_size: int, num_heads: int, layout: str, bias: bool, kv_size: int | None = None):
        super().__init__()
        self.num_heads, self.layout = num_heads, layout
        self.kv = nn.Linear(hidden_size, 2 * (kv_size or hidden_size), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(x).chunk(2, dim=-1)
        x = x.to(k.dtype)  # a folded layer's h' arrives at high precision; q = h' in the compute dtype
        if self.layout in ("fused_concat_conv1d", "fused_concat_linear"):
            return torch.cat([x, k, v], dim=-1)
        heads = (*x.shape[:-1], self.num_heads, -1)  # (..., H, dh)
        return torch.cat([x.reshape(heads), k.reshape(heads), v.reshape(heads)], dim=-1).flatten(-2)


# ------------------------------------------------------------------ residual modules (attach-query-mlp, attach-preproj)
# They hang off an existing module as a child plus a forward hook, so the stock weight names (q_proj.weight,
# input_layernorm.weight, ...) stay where every other transform and tool expects them.
_ACTIVATIONS = {"gelu": nn.functional.gelu, "silu": nn.functional.silu, "relu": nn.functional.relu}


class GainLayerNorm(nn.Module):
    """LayerNorm with a gain and no bias, as nn.LayerNorm(size, bias=False) computes it. Its own class because
    transformers 5.0's GPT-2 weight init zeroes the bias of every nn.LayerNorm it meets, bias or not."""

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.normalized_shape, self.eps = (size,), eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, self.normalized_shape, self.weight, None, self.eps)


class QueryMLP(nn.Module):
    """Nonlinear residual query q = X + f(X), f(X) = LayerNorm(act(RMSNorm(X)·W1)·W2), no biases
    (arXiv 2603.13381), applied to the query part of a projection's output, before q_norm and RoPE.

    layout says where the query sits in that output: "separate" (all of it), "fused_concat_conv1d" or
    "fused_concat_linear" ([q | k | v]) or "fused_per_head" (per head [q_h | k_h | v_h]). Zero output-norm gain: f = 0 at start.
    """

    def __init__(self, size: int, rank: int, act: str, layout: str, num_heads: int):
        super().__init__()
        self.act, self.layout, self.num_heads = act, layout, num_heads
        self.norm = nn.RMSNorm(size, eps=1e-6)
        self.up = nn.Linear(size, rank, bias=False)  # W1 (d_q → R)
        self.down = nn.Linear(rank, size, bias=False)  # W2 (R → d_q)
        self.out_norm = GainLayerNorm(size)

    def f(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_norm(self.down(_ACTIVATIONS[self.act](self.up(self.norm(x)))))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Projection output y with its query part X replaced by X + f(X)."""
        if self.layout == "separate":
            return y + self.f(y)
        size = self.norm.normalized_shape[0]
        if self.layout in ("fused_concat_conv1d", "fused_concat_linear"):
            q, rest = y.split([size, y.shape[-1] - size], dim=-1)
            return torch.cat([q + self.f(q), rest], dim=-1)
        heads = y.unflatten(-1, (self.num_heads, -1))  # (..., H, 3·dh)
        dh = size // self.num_heads
        q = heads[..., :dh].flatten(-2)  # (..., H·dh)
        q = (q + self.f(q)).unflatten(-1, (self.num_heads, dh))
        return torch.cat([q, heads[..., dh:]], dim=-1).flatten(-2)


class PreProj(nn.Module):
    """Pre-projection MLP branch g(x̂) = W_down·SiLU(W_up·x̂), no biases (arXiv 2604.10791); x̃ = x̂ + g(x̂)."""

    def __init__(self, hidden_size: int, inner: int):
        super().__init__()
        self.up = nn.Linear(hidden_size, inner, bias=False)
        self.down = nn.Linear(inner, hidden_size, bias=False)  # zero at start: x̃ = x̂

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.up(x)))


def _query_mlp_hook(module, args, output):
    return module.query_mlp(output)


def _preproj_hook(module, args, output):
    x = output.to(module.preproj.up.weight.dtype)  # (an absorbed layer's x̂ may be at the folded precision)
    return output + module.preproj(x).to(output.dtype)  # x̃ = x̂ + W_down·SiLU(W_up·x̂)


def _preproj_input_hook(module, args, kwargs):
    return _replace_attention_input(args, kwargs, lambda x: _preproj_hook(module, None, x))


def _content_skip_hook(module, args, kwargs, output):
    x = args[0] if args else kwargs["hidden_states"]  # the attention input, x̃
    out = output[0] if isinstance(output, tuple) else output
    skip = module.content_skip(x.to(module.content_skip.weight.dtype)).to(out.dtype)  # W_skip·x̃
    if isinstance(output, tuple):
        return (output[0] + skip, *output[1:])
    return output + skip


def attach_residual_modules(layer: nn.Module, spec: dict, paths: dict, num_heads: int) -> None:
    """Add the layer's query MLP / pre-projection MLP / content skip, where `spec` asks for them."""
    if "query_mlp" in spec:
        m = spec["query_mlp"]
        target = layer.get_submodule(paths["q_proj"] if paths["qkv_layout"] == "separate" else paths["fused_qkv"])
        target.query_mlp = QueryMLP(m["size"], m["rank"], m.get("act", "gelu"), paths["qkv_layout"], num_heads)
        target.register_forward_hook(_query_mlp_hook)
    if "preproj" in spec:
        m = spec["preproj"]
        if m.get("on") == "attention":  # x̃ = x̂ + g(x̂) on the attention's input only
            attn = layer.get_submodule(paths["attn"])
            attn.preproj = PreProj(m["size"], m["inner"])
            attn.register_forward_pre_hook(_preproj_input_hook, with_kwargs=True)
        else:
            norm = layer.get_submodule(paths["attn_norm"])
            norm.preproj = PreProj(m["size"], m["inner"])
            norm.register_forward_hook(_preproj_hook)
        if m.get("skip", False):
            attn = layer.get_submodule(paths["attn"])
            attn.content_skip = nn.Linear(m["size"], m["size"], bias=False)
            attn.register_forward_hook(_content_skip_hook, with_kwargs=True)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (HF rotate_half layout) on the first cos.shape[-1] dims of each head; x: (B, n, T, dh), cos: (1, T, r)."""
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    if r == x.shape[-1]:  # full rotary: no pass-through dims to concatenate
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat([x_rot * cos + _rotate_half(x_rot) * sin, x_pass], dim=-1)


class _RopeTable:
    """cos/sin of the model's rotary embedding for positions 0…n−1, computed once and shared by every layer.

    k=v caches S before RoPE, so each decoding step rotates the whole cached S; without this table every layer
    would also recompute cos/sin for every past position at every step. The table grows geometrically and is
    rebuilt when the device, dtype or inv_freq change; rope types whose frequencies depend on the sequence
    length (dynamic, longrope) are computed per call instead. layer_type: the table of that layer type, where
    the rotary module keeps one RoPE per type (gemma3's sliding and full layers).
    """

    STATIC = ("default", "linear", "llama3", "yarn")

    def __init__(self, rotary: nn.Module, layer_type: str | None = None, half: bool = False):
        self.rotary, self.layer_type, self.key, self.cos, self.sin = rotary, layer_type, None, None, None
        self.half = half  # the rotary module returns each frequency once (config block "rope_table": "half")
        self.derived: dict = {}  # tables a consumer computes from cos/sin (latent-kv's kept pairs), dropped with them

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor):
        cos, sin = self.rotary(x, positions) if self.layer_type is None else self.rotary(x, positions, self.layer_type)
        return (cos.repeat(1, 1, 2), sin.repeat(1, 1, 2)) if self.half else (cos, sin)  # rotate_half layout

    def __call__(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + x.shape[-2]
        rope_type = getattr(self.rotary, "rope_type", "default")
        if self.layer_type is not None:
            rope_type = rope_type[self.layer_type]
        if rope_type not in self.STATIC:
            return self._rotary(x, torch.arange(start, end, device=x.device)[None])
        inv = getattr(self.rotary, "inv_freq" if self.layer_type is None else f"{self.layer_type}_inv_freq", None)
        key = (x.device, x.dtype, None if inv is None else (inv.data_ptr(), inv._version))
        if key != self.key or self.cos.shape[-2] < end:
            size = max(end, 2 * self.cos.shape[-2]) if key == self.key else end
            with torch.no_grad():
                self.cos, self.sin = self._rotary(x, torch.arange(size, device=x.device)[None])
            self.key, self.derived = key, {}
        return self.cos[:, start:end], self.sin[:, start:end]


def rope_layer_type(config, i: int) -> tuple[bool, str | None]:
    """(whether layer i has RoPE, the layer type its RoPE is keyed by or None): config.rope_parameters keyed by
    config.layer_types (gemma3) gives each layer type its own RoPE, a None entry none."""
    types, params = getattr(config, "layer_types", None), getattr(config, "rope_parameters", None)
    if types and isinstance(params, dict) and types[i] in params:
        return params[types[i]] is not None, types[i]
    return True, None


class Pos2D(nn.Module):
    """Learned asymmetric 2D positional term on the logits of symmetric (q=k) attention (METHODS.md §4,
    arXiv 2305.19129): S'(i, j) = S(i, j) + Σ_c u_{h,c}·PE2D_c(i, j), per head h, u starting at zero.

    PE2D is the fixed 2D sinusoidal encoding of (i, j) with p channels: p/4 frequencies ω_k = 10000^(−k/(p/4)),
    channels sin(iω_k), cos(iω_k), sin(jω_k), cos(jω_k). (The paper's Linear_{p→1}(S + PE2D) with its weights
    summing to 1, so S passes unchanged and the term starts at zero.) The row channels (i) add the same amount
    to every logit of a softmax row and cancel there, so only the column part g(j) = Σ u·PE2D_j is computed:
    the same attention, without a (T, S) table.
    """

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels < 4 or channels % 4:
            raise ValueError(f"pos2d channels must be a positive multiple of 4, got {channels}")
        self.channels = channels
        self.weight = nn.Parameter(torch.zeros(num_heads, channels))  # u: (H, p); row channels first, then column

    def key_bias(self, start: int, length: int, device, dtype) -> torch.Tensor:
        """g(j) for key positions start … start+length−1: (1, H, 1, length)."""
        k = self.channels // 4
        freq = 10000.0 ** (-torch.arange(k, device=device, dtype=torch.float32) / k)
        ang = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None] * freq  # (S, k)
        pe = torch.cat([ang.sin(), ang.cos()], -1)  # (S, p/2): the column channels
        g = pe @ self.weight[:, self.channels // 2 :].float().T  # (S, H)
        return g.T[None, :, None, :].to(dtype)


def _with_bias(mask, bias: torch.Tensor, q_len: int, past: int, dtype) -> torch.Tensor:
    """An additive float mask (B|1, H, T, S): the causal mask (or the given one) plus `bias`."""
    S = bias.shape[-1]
    if mask is None:  # the SDPA path passes none and relies on is_causal: build the causal mask here
        rows = torch.arange(past, past + q_len, device=bias.device)[:, None]
        mask = torch.arange(S, device=bias.device)[None] > rows
    if mask.dtype == torch.bool:  # True = attend in HF boolean masks (our causal one above: True = blocked)
        blocked = mask if mask.ndim == 2 else ~mask
        mask = torch.zeros(blocked.shape, dtype=dtype, device=bias.device).masked_fill(blocked, torch.finfo(dtype).min)
    mask = mask[None, None] if mask.ndim == 2 else mask
    return mask[..., :S].to(dtype) + bias


def _with_sink(k, v, mask, sinks: torch.Tensor, q_len: int, past: int):
    """Attention sinks (gpt_oss) on any attention kernel: one extra key and value of zeros, whose logit q·0 + mask
    is the head's sink s_h: softmax over [logits, s_h] then drops it, as the family's own attention does.
    k, v: (B, N, S, dh) -> (B, N, S+1, dh); mask -> (B|1, H, T, S+1) additive."""
    k, v = (torch.cat([x, x.new_zeros(*x.shape[:2], 1, x.shape[-1])], -2) for x in (k, v))
    S, H = k.shape[-2] - 1, sinks.shape[0]
    base = _with_bias(mask, torch.zeros(1, 1, 1, S, dtype=k.dtype, device=k.device), q_len, past, k.dtype)
    base = base.expand(base.shape[0], H, q_len, S)
    sink = sinks.to(k.dtype).view(1, H, 1, 1).expand(base.shape[0], H, q_len, 1)
    return k, v, torch.cat([base, sink], -1)


class SharedProjectionAttention(nn.Module):
    """Attention with shared projections and/or pooled KV heads (share-kv, METHODS.md §3).

    Layer keys: "kv": "shared" (k=v), "qk": "shared" (q=k), both (q=k=v), "kv_heads": N (N | H).
      S = h·W_S + b_S with N heads (s_proj). k=v: keys = RoPE(k_norm(S)), values = S; the cache stores S ONCE,
      pre-RoPE, in the key slot (the value slot holds a zero-width tensor) and keys are rotated when read.
      q=k: queries = RoPE(q_norm(S)), S head g serving query heads g·H/N … (g+1)·H/N − 1; keys = RoPE(k_norm(S)).
    RoPE is applied at absolute cache indices to queries and keys alike: logits only see the difference.
    Carried from the family's attention module: scaling, sliding_window, use_rope (NoPE layers), sinks.
    """

    def __init__(self, old: nn.Module, config, layer_idx: int, spec: dict, rotary, qkv_bias: bool, o_bias: bool,
                 q_norm: nn.Module | None, k_norm: nn.Module | None):
        super().__init__()
        d, H = config.hidden_size, config.num_attention_heads
        dh = getattr(config, "head_dim", None) or d // H
        N = spec.get("kv_heads") or getattr(config, "num_key_value_heads", None) or H
        self.config, self.layer_idx, self.head_dim = config, layer_idx, dh
        self.num_heads, self.kv_heads, self.num_key_value_groups = H, N, H // N
        self.kv_shared, self.qk_shared = spec.get("kv") == "shared", spec.get("qk") == "shared"
        self.scaling = getattr(old, "scaling", dh**-0.5)
        self.sliding_window = getattr(old, "sliding_window", None)
        self.softcap = getattr(old, "attn_logit_softcapping", None)  # logits → softcap·tanh(logits/softcap)
        self.use_rope = getattr(old, "use_rope", True)  # False on a family's NoPE layers (smollm3)
        if isinstance(getattr(old, "sinks", None), torch.Tensor):  # learned per-head sink logits (gpt_oss)
            self.sinks = nn.Parameter(torch.zeros(H))
        self.is_causal, self.attention_dropout = True, 0.0
        self._rotary = rotary  # a _RopeTable shared by the model's layers, None without RoPE
        self.cache_seen = False  # set by every forward; checked by _check_cache_reached
        self.norm_over_heads = False  # QK-norms over the whole projection (set by _swap_shared_attention)
        if not self.qk_shared:
            self.q_proj = nn.Linear(d, H * dh, bias=qkv_bias)
        if self.kv_shared or self.qk_shared:
            self.s_proj = nn.Linear(d, N * dh, bias=qkv_bias)
        if not (self.kv_shared or self.qk_shared):
            self.k_proj = nn.Linear(d, N * dh, bias=qkv_bias)
        if not self.kv_shared:
            self.v_proj = nn.Linear(d, N * dh, bias=qkv_bias)
        self.o_proj = nn.Linear(H * dh, d, bias=o_bias)
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        if spec.get("pos2d"):
            self.pos2d = Pos2D(spec["pos2d"]["channels"], H)

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A QK-norm on head-split states (B, n, T, dh); norm_over_heads: one norm over all n·dh of a token (olmo2's
        q_norm/k_norm), per token, so it can run on cached pre-norm states at read time."""
        if isinstance(norm, nn.Identity):
            return x
        if not self.norm_over_heads:
            return norm(x)
        B, n, T, dh = x.shape
        return norm(x.transpose(1, 2).reshape(B, T, n * dh)).view(B, T, n, dh).transpose(1, 2)

    def _rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        if self._rotary is None or not self.use_rope:
            return x
        return _rope(x, *self._rotary(x, start))

    def _begin(self, kwargs: dict):
        """The cache transformers hands this layer (None without one) and how many tokens it already holds; drops the
        keyword arguments the stock attention reads and this one recomputes (positions, RoPE tables, flags)."""
        cache = take_cache(kwargs)
        self.cache_seen = cache is not None
        for k in ("position_embeddings", "position_ids", "use_cache", "output_attentions"):
            kwargs.pop(k, None)
        return cache, cache.get_seq_length(self.layer_idx) if cache is not None else 0

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, n·dh) -> (B, n, S, dh)
        return x.view(x.shape[0], x.shape[1], -1, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        cache, past = self._begin(kwargs)
        T, heads = hidden_states.shape[1], self._heads
        s = heads(self.s_proj(hidden_states)) if hasattr(self, "s_proj") else None
        q = s if self.qk_shared else heads(self.q_proj(hidden_states))
        if self.qk_shared:  # before q_norm: a norm per query head, or over all H heads, sees what the stock one does
            q = q.repeat_interleave(self.num_key_value_groups, dim=1)  # (B, H, T, dh)
        q = self._rotate(self._norm(self.q_norm, q), past)
        if self.kv_shared:  # cache S once, pre-RoPE; keys = RoPE(k_norm(S)) over the whole past
            s_all = cache.update(s, s[..., :0], self.layer_idx)[0] if cache is not None else s
            first = past + T - s_all.shape[-2]  # > 0 where a sliding-window cache dropped the oldest tokens
            k_all, v_all = self._rotate(self._norm(self.k_norm, s_all), first), s_all
        else:
            k = s if self.qk_shared else heads(self.k_proj(hidden_states))
            k = self._rotate(self._norm(self.k_norm, k), past)
            v = heads(self.v_proj(hidden_states))
            k_all, v_all = cache.update(k, v, self.layer_idx) if cache is not None else (k, v)
        return self._attend(q, k_all, v_all, attention_mask, past, kwargs)

    def _attend(self, q, k_all, v_all, attention_mask, past: int, kwargs: dict):
        """The family's attention kernel over all keys/values (with pos2d and sinks), then o_proj."""
        B, _, T, _ = q.shape
        if hasattr(self, "pos2d"):
            bias = self.pos2d.key_bias(0, k_all.shape[-2], q.device, q.dtype)
            attention_mask = _with_bias(attention_mask, bias, T, past, q.dtype)
        if hasattr(self, "sinks"):
            k_all, v_all, attention_mask = _with_sink(k_all, v_all, attention_mask, self.sinks, T, past)
        attend = attention_function(self.config._attn_implementation)
        if self.softcap is not None:
            kwargs["softcap"] = self.softcap
        out, weights = attend(self, q, k_all, v_all, attention_mask, dropout=0.0, scaling=self.scaling,
                              sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(out.reshape(B, T, -1).contiguous()), weights


class LatentKVAttention(SharedProjectionAttention):
    """Attention whose KV cache holds one low-rank latent per token (latent-kv, METHODS.md §6).

    Layer key "kv_latent": {"rank": r} (+ "group_ranks": [r_1 … r_g] with --groups: B_K, B_V block-diagonal, each
    group of KV heads rebuilt from its own r_j latent values). c = h·A (kv_a_proj, d → r, no bias) is all the cache
    stores: (B, 1, T, r) in the key slot, a zero-width tensor in the value slot. Over all cached positions:
        keys = RoPE(k_norm(c·B_K + b_K))   (k_b_proj; rebuilt, THEN rotated at absolute cache indices)
        values = c·B_V + b_V               (v_b_proj)
    Values are never rebuilt where that is cheaper (decoding): a softmax row p sums to its mass m (1, or less beside a
    sink), so per query head of KV head g

        p·(c·B_V,g + b_V,g) = (p·c)·B_V,g + m·b_V,g          ((H·T)·S·r instead of S·r·G·dh per step).

    With "rope_pairs": [[i_1 … i_P] per KV head] (MHA2MLA, arXiv 2502.14837), each KV head keeps RoPE on P frequency
    pairs only: those 2P key dims come from k_rope_proj (d → G·2P, rotated, cached as-is in the value slot) and the
    other e = dh − 2P come from the latent, never rotated; q_proj's heads are laid out to match, [pair firsts |
    pair seconds | the e RoPE-free dims]. The RoPE-free scores then absorb B_K (the latent is never expanded):

        q_nope·(c·B_K,g + b_K,g)ᵀ = (q_nope·B_K,gᵀ)·cᵀ + q_nope·b_K,g

    Queries, scaling, soft-capping, sliding window (by the mask) and sinks are the family's, as in
    SharedProjectionAttention. `absorb`: None picks the cheaper evaluation per call (absorbed when the query rows H·T
    are fewer than the rebuilt width G·dh, i.e. when decoding), True / False force one (tests compare them).
    """

    def __init__(self, old: nn.Module, config, layer_idx: int, spec: dict, rotary, qkv_bias: bool, o_bias: bool,
                 q_norm: nn.Module | None, k_norm: nn.Module | None):
        super().__init__(old, config, layer_idx, {}, rotary, qkv_bias, o_bias, q_norm, k_norm)
        d, N, dh, r = config.hidden_size, self.kv_heads, self.head_dim, spec["kv_latent"]["rank"]
        del self.k_proj, self.v_proj
        self.rank, self.absorb = r, None
        self.group_ranks = spec["kv_latent"].get("group_ranks")  # latent sizes per group of KV heads (--groups)
        pairs = spec["kv_latent"].get("rope_pairs")
        self.rope_pairs = pairs  # (G, P) frequency indices, a list: a tensor made here would be left on the meta device
        self.rope_width = 0 if pairs is None else 2 * len(pairs[0])  # 2P key dims per KV head kept out of the latent
        nope = dh - self.rope_width  # the key dims rebuilt from the latent
        self.kv_a_proj = nn.Linear(d, r, bias=False)  # A: c = h·A
        if nope:
            self.k_b_proj = nn.Linear(r, N * nope, bias=qkv_bias)  # B_K (of the RoPE-free dims with rope_pairs)
        self.v_b_proj = nn.Linear(r, N * dh, bias=qkv_bias)  # B_V
        if self.rope_width:
            self.k_rope_proj = nn.Linear(d, N * self.rope_width, bias=qkv_bias)  # the kept pairs' key dims

    # -------------------------------------------------------------------------------------------- helpers
    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, e) -> (B, G, (H/G)·T, e): query head h = g·H/G + j belongs to KV head g (repeat_kv's order)."""
        B, H, T, e = x.shape
        return x.reshape(B, self.kv_heads, (H // self.kv_heads) * T, e)

    def _rebuilt_keys(self, c_all: torch.Tensor) -> torch.Tensor:
        """c_all·B_K + b_K over the cached latents (B, S, r) as (B, G, S, dh). With "group_ranks" (--groups)
        B_K is block-diagonal and each group's KV heads are rebuilt from that group's slice of the latent alone:
        `groups` times fewer products than the dense B_K (SmolLM2 rank 192, 3 groups, 1k tokens: decoding at 0.72-0.78×
        of the base's tokens/s instead of 0.65-0.71×, 2-core CPU)."""
        if self.group_ranks is None:  # one dense product (a view, not head-major: faster than the batched one)
            return self._heads(self.k_b_proj(c_all))
        w, b = self._per_kv_head(self.k_b_proj)  # (G, r, dh), (G, 1, dh)
        per, start, blocks = self.kv_heads // len(self.group_ranks), 0, []
        for j, rj in enumerate(self.group_ranks):  # group j: its heads from its own latent slice, (B, per, S, dh)
            blocks.append(c_all[:, None, :, start:start + rj] @ w[j * per:(j + 1) * per, start:start + rj])
            start += rj
        k = torch.cat(blocks, 1)
        return k if b is None else k + b

    def _per_kv_head(self, linear: nn.Linear):
        """An up-projection's weight as (G, r, e) and bias as (G, 1, e) or None: its columns per KV head."""
        G = self.kv_heads
        w = linear.weight.view(G, -1, linear.weight.shape[-1]).transpose(1, 2)
        return w, None if linear.bias is None else linear.bias.view(G, 1, -1)

    def _pair_rope(self, x: torch.Tensor, start: int):
        """cos and sign-folded sin of the kept pairs at the positions of x (B, G, T, 2P), per KV head: (1, G, 1, T, 2P)
        each; None where the layer has no RoPE. Gathered once per table (the shared one grows geometrically) and
        sliced per step, except for rope types computed per call."""
        if self._rotary is None or not self.use_rope:
            return None
        cos, sin = self._rotary(x, start)  # (1, T, rotary_dim)
        shared = self._rotary
        if shared.key is None:  # a rope type whose table depends on the length: these positions only
            return self._pair_tables(cos, sin, x)
        full = shared.derived.get(self.layer_idx)
        if full is None:
            full = shared.derived[self.layer_idx] = self._pair_tables(shared.cos, shared.sin, x)
        end = start + x.shape[-2]
        return full[0][..., start:end, :], full[1][..., start:end, :]

    def _pair_tables(self, cos: torch.Tensor, sin: torch.Tensor, x: torch.Tensor):
        """(1, n, rotary_dim) tables (rotate_half layout: column i is frequency i) -> the kept pairs' (1, G, 1, n, 2P),
        [firsts | seconds], with rotate_half's sign folded into sin: RoPE(x) = x·cos + roll(x, P)·sin."""
        index = torch.tensor(self.rope_pairs, device=x.device).view(self.kv_heads, -1).repeat(1, 2)  # (G, 2P)
        sign = torch.ones(index.shape[-1], dtype=x.dtype, device=x.device)
        sign[: index.shape[-1] // 2] = -1  # rotate_half([x1 | x2]) = [−x2 | x1] = roll(x, P)·[−1 | +1]
        return cos[0][:, index].permute(1, 0, 2)[None, :, None].to(x.dtype), \
            (sin[0][:, index].to(x.dtype) * sign).permute(1, 0, 2)[None, :, None]

    def _rotate_pairs(self, x: torch.Tensor, table) -> torch.Tensor:
        """RoPE on the kept pairs: x (B, n, T, 2P), n = G keys or H queries, each head at its KV head's frequencies."""
        if table is None:
            return x
        B, n, T, w = x.shape
        x = x.reshape(B, self.kv_heads, n // self.kv_heads, T, w)
        return (x * table[0] + x.roll(w // 2, -1) * table[1]).view(B, n, T, w)

    def _probs(self, logits: torch.Tensor, attention_mask, past: int) -> torch.Tensor:
        """softmax over the keys of scaled logits (B, H, T, S), as the family's eager attention: soft-capping, the
        mask (the causal one when none is given), sinks; in float32 (float64 stays float64), returned in the logits'
        dtype."""
        B, H, T, S = logits.shape
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        if attention_mask is not None or T > 1:  # one new token with no mask given sees every cached one
            logits = logits + _with_bias(attention_mask, logits.new_zeros(1, 1, 1, S), T, past, logits.dtype)
        if hasattr(self, "sinks"):  # one more logit per row, the head's sink, dropped after the softmax
            logits = torch.cat([logits, self.sinks.to(logits.dtype).view(1, H, 1, 1).expand(B, H, T, 1)], -1)
        p = nn.functional.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        return p.to(logits.dtype)[..., :S]

    def _absorbed_values(self, p: torch.Tensor, c_all: torch.Tensor) -> torch.Tensor:
        """Σ_s p_s·(c_s·B_V + b_V) = (p·c)·B_V + (Σ_s p_s)·b_V per query head: p (B, H, T, S), c_all (B, S, r) ->
        (B, H, T, dh), no value ever rebuilt."""
        B, H, T, S = p.shape
        pc = (p.reshape(B, H * T, S) @ c_all).view(B, H, T, -1)  # (B, H, T, r)
        w, b = self._per_kv_head(self.v_b_proj)  # (G, r, dh), (G, 1, dh)
        out = self._grouped(pc) @ w  # (B, G, (H/G)·T, dh)
        if b is not None:
            out = out + self._grouped(p.sum(-1, keepdim=True)) * b
        return out.view(B, H, T, -1)

    def _output(self, out: torch.Tensor, p: torch.Tensor):
        B, H, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), p

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        cache, past = self._begin(kwargs)
        B, T = hidden_states.shape[:2]
        q = self._norm(self.q_norm, self._heads(self.q_proj(hidden_states)))  # (B, H, T, dh), not yet rotated
        c = self.kv_a_proj(hidden_states)[:, None]  # (B, 1, T, r): cached
        kr, table = c[..., :0], None  # (B, 1, T, 0) without kept pairs
        if self.rope_width:  # the kept pairs' keys, rotated like a stock key cache: (B, G, T, 2P)
            kr = self._heads_of(self.k_rope_proj(hidden_states), self.rope_width)
            table = self._pair_rope(kr, past)
            kr = self._rotate_pairs(kr, table)
        if cache is not None:
            c, kr = cache.update(c, kr, self.layer_idx)
        c_all = c[:, 0]  # (B, S, r)
        first = past + T - c_all.shape[-2]  # > 0 where a sliding-window cache dropped the oldest tokens
        H, G, dh = q.shape[1], self.kv_heads, self.head_dim
        absorb = self.absorb if self.absorb is not None else H * T < G * dh
        if self.rope_pairs is None:
            q = self._rotate(q, past)
            k_all = self._rotate(self._norm(self.k_norm, self._rebuilt_keys(c_all)), first)
            if not absorb:
                return self._attend(q, k_all, self._heads(self.v_b_proj(c_all)), attention_mask, past, kwargs)
            logits = (self._grouped(q) @ k_all.transpose(-1, -2)).view(B, H, T, -1)
        else:
            w, has_nope = self.rope_width, hasattr(self, "k_b_proj")
            q_rope, q_nope = self._rotate_pairs(q[..., :w], table), q[..., w:]
            if not absorb:
                parts = ([kr] if w else []) + ([self._heads_of(self.k_b_proj(c_all), dh - w)] if has_nope else [])
                k_all = torch.cat(parts, -1)
                q = torch.cat([q_rope, q_nope], -1)
                return self._attend(q, k_all, self._heads(self.v_b_proj(c_all)), attention_mask, past, kwargs)
            logits = 0
            if w:
                logits = (self._grouped(q_rope) @ kr.transpose(-1, -2)).view(B, H, T, -1)
            if has_nope:  # (q_nope·B_Kᵀ)·cᵀ + q_nope·b_K per KV head
                wk, bk = self._per_kv_head(self.k_b_proj)  # (G, r, e), (G, 1, e)
                qn = self._grouped(q_nope)  # (B, G, (H/G)·T, e)
                q_lat = (qn @ wk.transpose(-1, -2)).view(B, H * T, -1)  # (B, H·T, r)
                nope = q_lat @ c_all.transpose(-1, -2)  # (B, H·T, S)
                if bk is not None:
                    nope = nope + (qn * bk).sum(-1).view(B, H * T, 1)
                logits = logits + nope.view(B, H, T, -1)
        p = self._probs(logits * self.scaling, attention_mask, past)
        return self._output(self._absorbed_values(p, c_all), p)

    def _heads_of(self, x: torch.Tensor, width: int) -> torch.Tensor:  # (B, S, n·width) -> (B, n, S, width)
        return x.view(x.shape[0], x.shape[1], -1, width).transpose(1, 2)


def _swap_shared_attention(model: nn.Module, layer: nn.Module, i: int, spec: dict, paths: dict,
                           cls: type = SharedProjectionAttention) -> None:
    """Replace layer i's attention block with SharedProjectionAttention (share-kv layer keys), or `cls`
    (LatentKVAttention for latent-kv layers)."""
    old = layer.get_submodule(paths["attn"])
    qkv = layer.get_submodule(paths["q_proj"] if paths["qkv_layout"] == "separate" else paths["fused_qkv"])
    o = layer.get_submodule(paths["o_proj"])
    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
    has_rope, layer_type = rope_layer_type(model.config, i)
    if rotary is not None and has_rope:  # one table for all layers (of a type), kept on the rotary module
        tables = getattr(rotary, "_qkvconv_tables", None)
        if not isinstance(tables, dict):
            tables = rotary._qkvconv_tables = {}
        rotary = tables.setdefault(layer_type, _RopeTable(rotary, layer_type, paths.get("rope_table") == "half"))
    else:
        rotary = None
    norms = [layer.get_submodule(p) if _has_module(layer, p) else None for p in paths.get("qk_norm") or []]
    q_norm, k_norm = (norms + [None, None])[:2]
    new = cls(old, model.config, i, spec, rotary, getattr(qkv, "bias", None) is not None,
              getattr(o, "bias", None) is not None, q_norm, k_norm)
    new.norm_over_heads = paths.get("qk_norm_scope") == "projection"
    _set_module(layer, paths["attn"], new)


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def apply_qkvconv_layout(model: nn.Module, block: dict) -> None:
    """Swap the modules `block` names for their qkvconv variants (in place, before weights load)."""
    if block.get("format") != FORMAT:
        raise ValueError(f"qkvconv checkpoint format {block.get('format')} is not {FORMAT}; upgrade qkvconv")
    paths, cfg = block["paths"], model.config
    layers = model.get_submodule(paths["layers"])
    d = cfg.hidden_size
    for i, (layer, spec) in enumerate(zip(layers, block["layers"], strict=True)):
        if "kv_latent" in spec:
            _swap_shared_attention(model, layer, i, spec, paths, LatentKVAttention)
        elif "kv" in spec or "qk" in spec or "kv_heads" in spec:
            _swap_shared_attention(model, layer, i, spec, paths)
        folded = getattr(torch, spec["folded_dtype"]) if spec.get("folded_dtype") else None
        if spec["attn_input"] == "affine":
            norm = layer.get_submodule(paths["attn_norm"])
            _set_module(layer, paths["attn_norm"], AffineNorm(norm, d, folded, paths.get("norm_gain_offset", 0.0)))
        elif spec["attn_input"] == "attn_affine":
            attach_attention_input(layer.get_submodule(paths["attn"]), d, folded)
        if spec["query"] == "identity":
            if paths["qkv_layout"] == "separate":
                _set_module(layer, paths["q_proj"], ComputeDtype() if folded else nn.Identity())
                if folded:
                    for key in ("k_proj", "v_proj"):
                        keep_folded(layer.get_submodule(paths[key]), folded)
            else:
                old = layer.get_submodule(paths["fused_qkv"])
                bias = getattr(old, "bias", None) is not None
                H = cfg.num_attention_heads
                kv_size = (getattr(cfg, "num_key_value_heads", None) or H) * (getattr(cfg, "head_dim", None) or d // H)
                fused = IdentityQueryFused(d, H, paths["qkv_layout"], bias, kv_size)
                if folded:
                    keep_folded(fused.kv, folded)
                _set_module(layer, paths["fused_qkv"], fused)
        attach_residual_modules(layer, spec, paths, cfg.num_attention_heads)


def _make_class(base_name: str) -> type:
    base = getattr(transformers, base_name)

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_qkvconv_layout(self, config.qkvconv)
        restore_folded(self)
        _watch_cache(self)

    return type(f"Qkvconv{base_name}", (base,), {"__init__": __init__, "__module__": __name__})


def __getattr__(name: str) -> type:
    """Qkvconv<Base> on first use (PEP 562): building all of them imports every family's modeling module from
    transformers, 3.6 s of each process's start on a 2-core AMD EPYC. `getattr(module, name)`, as transformers'
    remote-code loader does, and `from modeling_qkvconv import Qkvconv<Base>` both land here."""
    base = name.removeprefix("Qkvconv")
    if base == name or base not in BASE_CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = globals()[name] = _make_class(base)
    return cls


def __dir__() -> list[str]:
    return sorted(set(globals()) | {f"Qkvconv{b}" for b in BASE_CLASSES})
