"""Read and write a layer's Q/K/V projections whatever their packing.

Math convention everywhere in qkvconv: a projection is y = x·W + b with W of shape (d_in, d_out),
float64. `nn.Linear` stores W^T (d_out, d_in); GPT-2's `Conv1D` stores W itself (d_in, d_out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkvconv.archs import ArchSpec, Dims


@dataclass(frozen=True)
class Proj:
    """One projection y = x·W + b in math convention, float64."""

    W: torch.Tensor  # (d_in, d_out)
    b: torch.Tensor | None  # (d_out,)


def _expect(t: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, found {tuple(t.shape)}")
    return t


def _linear(sd: dict, key: str, d_in: int, d_out: int) -> Proj:
    W = _expect(sd[f"{key}.weight"], (d_out, d_in), key).double().T  # stored (d_out, d_in)
    b = sd.get(f"{key}.bias")
    return Proj(W, None if b is None else _expect(b, (d_out,), key).double())


def fused_qkv_size(layout: str, dims: Dims) -> int:
    """Output size of a fused QKV projection: 3·H·dh, or H·dh + 2·G·dh for the GQA concat (Phi-3)."""
    return dims.q_size + 2 * dims.kv_size if layout == "fused_concat_linear" else 3 * dims.q_size


def split_fused_qkv(W: torch.Tensor, b: torch.Tensor | None, layout: str, dims: Dims) -> tuple[Proj, Proj, Proj]:
    """Split a fused QKV projection (math convention, W: (d, fused_qkv_size)) into q, k, v.

    fused_concat_conv1d (GPT-2): columns are [q (H·dh) | k (H·dh) | v (H·dh)].
    fused_per_head (GPT-NeoX):   columns are per head [h0: q k v | h1: q k v | ...], i.e. (H, 3, dh).
    fused_concat_linear (Phi-3): one nn.Linear whose output rows are [q (H·dh) | k (G·dh) | v (G·dh)]: GQA sizes,
                                 so k and v are narrower than q (G < H); in math convention the same column order.
    """
    d, H, dh = dims.hidden_size, dims.num_attention_heads, dims.head_dim
    _expect(W, (d, fused_qkv_size(layout, dims)), "fused qkv")
    if b is not None:
        _expect(b, (fused_qkv_size(layout, dims),), "fused qkv bias")
    if layout in ("fused_concat_conv1d", "fused_concat_linear"):
        sizes = [dims.q_size, dims.kv_size, dims.kv_size] if layout == "fused_concat_linear" else [H * dh] * 3
        Ws = W.split(sizes, dim=1)
        bs = b.split(sizes) if b is not None else (None, None, None)
    elif layout == "fused_per_head":
        Ws = [w.reshape(d, H * dh) for w in W.reshape(d, H, 3, dh).unbind(2)]
        bs = [x.reshape(H * dh) for x in b.reshape(H, 3, dh).unbind(1)] if b is not None else (None, None, None)
    else:
        raise ValueError(f"not a fused layout: {layout}")
    return tuple(Proj(w.contiguous(), None if x is None else x.contiguous()) for w, x in zip(Ws, bs))


def read_qkv(sd: dict, spec: ArchSpec, dims: Dims, i: int) -> tuple[Proj, Proj, Proj]:
    """Layer i's (q, k, v) projections in math convention, float64."""
    d = dims.hidden_size
    if spec.qkv_layout == "separate":
        return (
            _linear(sd, spec.layer(i, spec.q_proj), d, dims.q_size),
            _linear(sd, spec.layer(i, spec.k_proj), d, dims.kv_size),
            _linear(sd, spec.layer(i, spec.v_proj), d, dims.kv_size),
        )
    key = spec.layer(i, spec.fused_qkv)
    w, b = sd[f"{key}.weight"], sd.get(f"{key}.bias")
    size = fused_qkv_size(spec.qkv_layout, dims)
    if spec.qkv_layout == "fused_concat_conv1d":
        W = _expect(w, (d, size), key).double()  # Conv1D stores (d_in, d_out)
    else:
        W = _expect(w, (size, d), key).double().T  # Linear stores (d_out, d_in)
    return split_fused_qkv(W, None if b is None else b.double(), spec.qkv_layout, dims)


def qkv_keys(sd: dict, spec: ArchSpec, i: int) -> list[str]:
    """State-dict keys that hold layer i's q, k, v (weights and biases)."""
    modules = [spec.q_proj, spec.k_proj, spec.v_proj] if spec.qkv_layout == "separate" else [spec.fused_qkv]
    return [k for m in modules for k in (f"{spec.layer(i, m)}.weight", f"{spec.layer(i, m)}.bias") if k in sd]


def write_kv(spec: ArchSpec, i: int, k: Proj, v: Proj, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """State-dict entries for layer i's key and value projections after the query became the identity.

    separate: `k_proj` / `v_proj` as nn.Linear (weight W^T).
    fused:    one nn.Linear `<fused_qkv>.kv` with output [k | v]; the loader's IdentityQueryFused module
              re-packs [q=x | k | v] into the family's fused layout.
    """
    out: dict[str, torch.Tensor] = {}

    def put(key: str, W: torch.Tensor, b: torch.Tensor | None) -> None:
        out[f"{key}.weight"] = W.T.contiguous().to(dtype)  # (d_out, d_in)
        if b is not None:
            out[f"{key}.bias"] = b.contiguous().to(dtype)

    if spec.qkv_layout == "separate":
        put(spec.layer(i, spec.k_proj), k.W, k.b)
        put(spec.layer(i, spec.v_proj), v.W, v.b)
    else:
        b = None if k.b is None else torch.cat([k.b, v.b])
        put(f"{spec.layer(i, spec.fused_qkv)}.kv", torch.cat([k.W, v.W], dim=1), b)
    return out
