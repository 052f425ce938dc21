"""What `qkvconv inspect` reports: sizes, parameter counts, KV-cache bytes, W_Q conditioning, preflight."""

from __future__ import annotations

import statistics

import torch

from qkvconv.archs import dims_of
from qkvconv.checkpoint import Loaded, qkvconv_block
from qkvconv.transforms import wq_condition
from qkvconv.transforms.attach import attention_parts


def parameter_counts(model, spec) -> dict[str, int]:
    """Unique parameters (tied weights counted once): total, non-embedding, attention."""
    seen, total, emb, attn = set(), 0, 0, 0
    embeddings = set(spec.input_embeddings) | {spec.output_embedding}
    attn_parts = [f".{part}." for part in attention_parts(spec)]
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if name in embeddings:
            emb += p.numel()
        elif any(part in f".{name}" for part in attn_parts):
            attn += p.numel()
    return {"total": total, "non_embedding": total - emb, "attention": attn}


def attached_parameters(model) -> dict[str, int]:
    """Parameters of the residual modules qkvconv attached (query_mlp, preproj, content_skip), by kind."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        for kind in ("query_mlp", "preproj", "content_skip"):
            if f".{kind}." in f".{name}":
                counts[kind] = counts.get(kind, 0) + p.numel()
    return counts


def kv_cache_bytes_per_token(config, spec, dtype: torch.dtype) -> int:
    """Bytes the KV cache holds per generated token: keys and values of every layer, by each layer's mode
    (share-kv: a K=V layer stores one tensor, "kv_heads" pooled heads; latent-kv: "kv_latent" rank r values, plus
    2P rotated key dims per KV head with "rope_pairs")."""
    dims = dims_of(config, spec)
    block = qkvconv_block(config)
    modes = block["layers"] if block else [{}] * dims.num_hidden_layers
    per_token = sum(
        m["kv_latent"]["rank"] + 2 * sum(len(p) for p in m["kv_latent"].get("rope_pairs", [])) if "kv_latent" in m
        else (1 if m.get("kv") == "shared" else 2) * m.get("kv_heads", dims.num_key_value_heads) * dims.head_dim
        for m in modes
    )
    return per_token * torch.empty((), dtype=dtype).element_size()


def layer_modes(config) -> list[str] | None:
    """Each layer's attention mode in words (qkvconv checkpoints), e.g. "k=v, kv_heads 1"."""
    block = qkvconv_block(config)
    if not block:
        return None
    out = []
    for m in block["layers"]:
        shared = [x for x, on in (("q=k", m.get("qk") == "shared"), ("k=v", m.get("kv") == "shared")) if on]
        words = ["q=k=v" if len(shared) == 2 else (shared[0] if shared else "qkv")]
        if "kv_latent" in m:
            words = [f"kv latent rank {m['kv_latent']['rank']}"]
            if "rope_pairs" in m["kv_latent"]:
                words.append(f"{len(m['kv_latent']['rope_pairs'][0])} RoPE pairs per KV head")
        if "kv_heads" in m:
            words.append(f"kv_heads {m['kv_heads']}")
        if "pos2d" in m:
            words.append(f"pos2d {m['pos2d']['channels']}")
        if m.get("query") == "identity":
            words.append("identity query")
        out.append(", ".join(words))
    return out


def _summary(xs: list[float]) -> dict:
    finite = [x for x in xs if x == x]
    if not finite:
        return {"min": None, "median": None, "max": None, "per_layer": xs}
    return {"min": min(finite), "median": statistics.median(finite), "max": max(finite), "per_layer": xs}


def describe(loaded: Loaded) -> dict:
    model, spec, config = loaded.model, loaded.spec, loaded.model.config
    dims = dims_of(config, spec)
    block = qkvconv_block(config)
    sd = model.state_dict()
    dtype = next(model.parameters()).dtype
    identity_query = bool(block) and any(layer["query"] == "identity" for layer in block["layers"])
    square = dims.q_size == dims.hidden_size
    shared = bool(block) and any({"kv", "qk", "kv_heads", "kv_latent"} & set(layer) for layer in block["layers"])
    if shared:  # share-kv and latent-kv layers keep no stock q/k/v weights to read
        cond = _summary([float("nan")] * dims.num_hidden_layers)
    else:
        cond = _summary([1.0] * dims.num_hidden_layers if identity_query else wq_condition(sd, spec, dims))
    attn_bias = any(
        k.endswith(".bias") and any(p and f".{p}." in f".{k}" for p in (spec.q_proj, spec.k_proj, spec.fused_qkv))
        for k in sd
    )
    if shared:
        exact = {"applies": False, "why": "share-kv / latent-kv layers: absorb-query needs stock projections"}
    elif identity_query:
        exact = {"applies": False, "why": "the query is already the identity"}
    elif not square:
        exact = {"applies": False, "why": f"W_Q is not square ({dims.hidden_size}×{dims.q_size})"}
    elif cond["max"] is not None and cond["max"] >= 1e12:
        exact = {"applies": False, "why": f"W_Q is singular in some layer (cond {cond['max']:.3g})"}
    else:
        exact = {"applies": True, "why": f"square W_Q, max cond {cond['max']:.3g}: fp32 error grows ~ eps·cond"}
    if exact["applies"] or (square and not identity_query and not shared):
        drop = {"applies": True, "why": "lossy: needs finetuning to heal"}
    else:
        drop = {"applies": False, "why": exact["why"]}
    return {
        "source": loaded.source.path,
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "family": spec.family,
        "model_type": config.model_type,
        "num_layers": dims.num_hidden_layers,
        "hidden_size": dims.hidden_size,
        "num_attention_heads": dims.num_attention_heads,
        "num_key_value_heads": dims.num_key_value_heads,
        "head_dim": dims.head_dim,
        "norm": spec.norm_kind,
        "positional": spec.positional,
        "rotary_dim": dims.rotary_dim,
        "attention_bias": attn_bias,
        "qk_norm": any(f".{n}." in k for n in spec.qk_norm for k in sd),
        "parallel_residual": bool(getattr(config, "use_parallel_residual", False)),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "dtype": str(dtype).removeprefix("torch."),
        "num_parameters": parameter_counts(model, spec),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config, spec, dtype),
        "wq_condition": cond,
        "qkvconv_layers": block["layers"] if block else None,
        "attached_parameters": attached_parameters(model),
        "layer_modes": layer_modes(config),
        "transforms": {"absorb-query --mode exact": exact, "absorb-query --mode drop": drop},
    }
