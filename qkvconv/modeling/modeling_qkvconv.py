"""Attention variants of qkvconv-converted checkpoints, for loading with plain transformers.

This file is self-contained (it imports torch and transformers only) and is copied next to every
converted checkpoint, so `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works
where qkvconv is not installed. The stock model class of the family is built first, then the modules
named in `config.qkvconv` are swapped for the variants below. Family knowledge (module paths, fused
layout) comes from the config block, never from `model_type`.

Config block (config.json, key "qkvconv"):
    {"format": 1, "base_class": "LlamaForCausalLM",
     "paths": {"layers": ..., "attn_norm": ..., "q_proj": ..., "fused_qkv": ..., "qkv_layout": ...},
     "layers": [{"query": "identity" | "projection", "attn_input": "affine" | "norm"}, ...]}
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
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
)


class AffineNorm(nn.Module):
    """The pre-attention norm followed by a full affine map: h' = Norm(x)·M + c (absorb-query)."""

    def __init__(self, norm: nn.Module, hidden_size: int):
        super().__init__()
        self.norm = norm
        self.affine = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine(self.norm(x))


class IdentityQueryFused(nn.Module):
    """A fused QKV projection whose query part is the identity: q = x, [k | v] = kv(x).

    Output is packed like the stock fused module so the stock attention code splits it unchanged:
      fused_concat_conv1d: [q | k | v]                       (GPT-2)
      fused_per_head:      per head [q_h | k_h | v_h], (H, 3, dh) (GPT-NeoX)
    """

    def __init__(self, hidden_size: int, num_heads: int, layout: str, bias: bool):
        super().__init__()
        self.num_heads, self.layout = num_heads, layout
        self.kv = nn.Linear(hidden_size, 2 * hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(x).chunk(2, dim=-1)
        if self.layout == "fused_concat_conv1d":
            return torch.cat([x, k, v], dim=-1)
        heads = (*x.shape[:-1], self.num_heads, -1)  # (..., H, dh)
        return torch.cat([x.reshape(heads), k.reshape(heads), v.reshape(heads)], dim=-1).flatten(-2)


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
    for layer, spec in zip(layers, block["layers"], strict=True):
        if spec["attn_input"] == "affine":
            _set_module(layer, paths["attn_norm"], AffineNorm(layer.get_submodule(paths["attn_norm"]), d))
        if spec["query"] == "identity":
            if paths["qkv_layout"] == "separate":
                _set_module(layer, paths["q_proj"], nn.Identity())
            else:
                old = layer.get_submodule(paths["fused_qkv"])
                bias = getattr(old, "bias", None) is not None
                _set_module(
                    layer,
                    paths["fused_qkv"],
                    IdentityQueryFused(d, cfg.num_attention_heads, paths["qkv_layout"], bias),
                )


def _make_class(base_name: str) -> type:
    base = getattr(transformers, base_name)

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_qkvconv_layout(self, config.qkvconv)

    return type(f"Qkvconv{base_name}", (base,), {"__init__": __init__, "__module__": __name__})


for _name in BASE_CLASSES:
    globals()[f"Qkvconv{_name}"] = _make_class(_name)
