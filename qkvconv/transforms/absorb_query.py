"""absorb-query: make the query projection the identity (METHODS.md §1; arXiv 2510.23912, 2603.13381).

Attention sees its input h only through h·W_Q, h·W_K, h·W_V, so for invertible Θ the change
(h, W_Q, W_K, W_V) → (h·Θ, Θ⁻¹W_Q, Θ⁻¹W_K, Θ⁻¹W_V) leaves every layer output unchanged. With Θ = W_Q:

    h' = Norm(x)·diag(γ)·W_Q + (β·W_Q + b_Q)      (folded into the pre-attention norm's affine)
    q  = h'                                         (identity query)
    W_K' = W_Q⁻¹·W_K,  b_K' = b_K − b_Q·W_Q⁻¹·W_K   (same for V)

Where the pre-attention norm also feeds the MLP (parallel attention + MLP on one norm: phi, stablelm with
use_parallel_residual) or where there is no pre-attention norm (olmo2: attention reads the raw residual), h ↦ h·W_Q + b_Q
cannot be folded into a norm; it becomes an explicit d×d affine map `<attention>.attn_in` on the attention's input
only, so the MLP and the residual still see h ("attn_input": "attn_affine"). The identity is the same, and with it
any norm on q or k applied after the projection (per head, or over the whole H·dh projection as olmo2's q_norm and
k_norm): q = q_norm(h·W_Q) = q_norm(h'), k = k_norm(h·W_K) = k_norm(h'·W_Q⁻¹W_K), v = h'·W_Q⁻¹W_V.

`exact` does this in float64 and casts once. `drop` removes W_Q outright (q = Norm(x), the norm stays
diagonal) and refits W_K by least squares on calibration activations so that each head's logits stay
close: a RoPE-commuting refit (a complex scale per rotary frequency) on rotary dims and a full
linear map on the others. `drop` is lossy by design and meant to be healed by finetuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkvconv.archs import ArchSpec, Dims, attention_owns_its_norm
from qkvconv.archs.layout import Proj, qkv_keys, read_qkv, write_kv
from qkvconv.errors import TransformError
from qkvconv.transforms.layer import LayerResult, layer_dtype

SINGULAR_COND = 1e12  # beyond this W_Q⁻¹ in float64 has no correct digit worth casting to fp32


@dataclass
class AbsorbResult:
    state_dict: dict[str, torch.Tensor]
    layers: list[dict]  # per-layer layout block for the loader (modeling_qkvconv)
    wq_condition: list[float]  # cond(W_Q) per layer
    folded: list[str]  # keys of the folded maps (M, c, W_Q⁻¹W_K, W_Q⁻¹W_V): the ones whose rounding cond(W_Q) amplifies


def _lu(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    LU, piv, _ = torch.linalg.lu_factor_ex(W)  # a singular W gives a zero pivot (not an exception)
    return LU, piv


def _top_eigenvalue(apply, n: int, dtype: torch.dtype, device, gen: torch.Generator, block: int, steps: int) -> float:
    """The largest eigenvalue of a symmetric positive semi-definite operator X ↦ apply(X) (n × k blocks), from
    below: Rayleigh–Ritz on the block Krylov space [X₀, A·X₀, …, A^steps·X₀] (X₀ random n × `block`). Each new
    block is orthogonalised against the earlier ones (twice, then QR) to keep the basis well conditioned, and the
    whole basis is orthonormalised once more before the Rayleigh quotient QᵀAQ: for any orthonormal Q its
    eigenvalues interlace A's (Cauchy), so the estimate cannot exceed the true one even where the Krylov space is
    exhausted early and a block is rounding noise."""
    basis = [torch.linalg.qr(torch.randn(n, block, dtype=dtype, device=device, generator=gen)).Q]
    for _ in range(steps):
        Z = apply(basis[-1])
        B = torch.cat(basis, 1)
        for _ in range(2):
            Z = Z - B @ (B.T @ Z)
        basis.append(torch.linalg.qr(Z).Q)
    Q = torch.linalg.qr(torch.cat(basis, 1)).Q
    T = Q.T @ apply(Q)
    return float(torch.linalg.eigvalsh((T + T.T) / 2)[-1])


def _stored_order_products(W: torch.Tensor):
    """X ↦ W·X and Y ↦ Wᵀ·Y for a few columns X, Y, each written so that W is read in the order it is stored.
    MKL's float64 GEMM against a transposed W with 4 columns ran 6× slower than against W as stored on an AMD EPYC
    (31 ms against 5 ms at n = 2048, 2 threads; a W_Q from a checkpoint is the transposed view of nn.Linear's
    weight): so Wᵀ·Y is (Yᵀ·W)ᵀ where W is row-major, and W·X is (Xᵀ·Wᵀ)ᵀ where W is a transposed view."""
    if not W.is_contiguous() and W.T.is_contiguous():
        Wt = W.T
        return (lambda X: (X.T @ Wt).T), (lambda Y: Wt @ Y)
    W = W.contiguous()
    return (lambda X: W @ X), (lambda Y: (Y.T @ W).T)


def condition_number(W: torch.Tensor, lu: tuple[torch.Tensor, torch.Tensor] | None = None, block: int = 4,
                     steps: int = 6) -> float:
    """cond₂(W) = σ_max/σ_min of a square W, from one LU factorisation: σ_max² as the top eigenvalue of WᵀW,
    1/σ_min² as the top eigenvalue of (WᵀW)⁻¹ = W⁻¹W⁻ᵀ (two solves with the LU), each by a block Krylov method
    (_top_eigenvalue): O(n²·block) per step instead of an O(n³) SVD (47 s for one 2048×2048 W_Q on 2 cores).

    Why blocks: each step is one call into LAPACK/BLAS on `block` columns, and a call on one vector costs what the
    machine's threads cost to wake. The single-vector power and inverse iteration this replaces took 15 + 15 steps
    on a flat spectrum and, while a conversion's reader, writer and hash threads ran, ~10 ms a vector solve where
    alone it is 1 ms: 12.9 s of a 25.8 s absorb-query of bench_stream's 4 GiB checkpoint (44 layers of 2048²); the
    Krylov estimate took 4.5-6.6 s there and is closer. Both estimates are Rayleigh quotients, from below and exact
    for a singular W; on log-spaced spectra (no gap at either end, the hardest case) 7 steps of 4 columns are
    within 2.1 % at n = 2048, 1.2 % at n = 512 (the power iterations: 3.3 %, 3.9 %;
    tests/test_absorb_query.py::test_condition_number_estimate)."""
    LU, piv = lu if lu is not None else _lu(W)
    diag = LU.diagonal().abs()
    if not bool(torch.isfinite(LU).all()) or float(diag.min()) == 0.0:
        return float("inf")
    gen = torch.Generator(device=W.device).manual_seed(0)
    n, block = W.shape[0], min(block, W.shape[0])
    steps = min(steps, max(0, -(-n // block) - 1))  # the Krylov space never needs more than n columns

    def inverse_gram(X: torch.Tensor) -> torch.Tensor:  # (WᵀW)⁻¹·X = W⁻¹·(W⁻ᵀ·X)
        return torch.linalg.lu_solve(LU, piv, torch.linalg.lu_solve(LU, piv, X, adjoint=True))

    times, t_times = _stored_order_products(W)
    smax2 = _top_eigenvalue(lambda X: t_times(times(X)), n, W.dtype, W.device, gen, block, steps)
    smin2_inv = _top_eigenvalue(inverse_gram, n, W.dtype, W.device, gen, block, steps)
    if not smin2_inv < float("inf"):
        return float("inf")
    return (smax2 * smin2_inv) ** 0.5


def wq_condition(sd: dict, spec: ArchSpec, dims: Dims) -> list[float]:
    """Condition number of each layer's W_Q (inf where singular, nan where not square)."""
    out = []
    for i in range(dims.num_hidden_layers):
        q, _, _ = read_qkv(sd, spec, dims, i)
        out.append(condition_number(q.W) if q.W.shape[0] == q.W.shape[1] else float("nan"))
    return out


def _check_square(dims: Dims) -> None:
    if dims.q_size != dims.hidden_size:
        raise TransformError(
            f"W_Q is not square (hidden_size {dims.hidden_size} × heads·head_dim {dims.q_size}); "
            "absorb-query needs num_attention_heads·head_dim == hidden_size"
        )


def _fold_norm(sd: dict, spec: ArchSpec, i: int, q: Proj, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Norm(x)·diag(γ)+β followed by ·W_Q+b_Q  →  Norm(x) with unit gain, then affine (M, c).

    The gain is γ = offset + weight (spec.norm_gain_offset: 1 where the stored weight is γ − 1, as in gemma), so
    the unit gain is the weight 1 − offset."""
    key = spec.layer(i, spec.attn_norm)
    weight = sd[f"{key}.weight"].double()  # (d,)
    gamma = spec.norm_gain_offset + weight
    beta = sd.get(f"{key}.bias")
    M_t = torch.mul(q.W.T, gamma, out=torch.empty_like(q.W, memory_format=torch.contiguous_format))  # (diag(γ)·W_Q)ᵀ:
    # nn.Linear's (d_out, d_in), written once into a new buffer (q.W may be a view of the caller's tensor)
    c = torch.zeros(M_t.shape[0], dtype=torch.float64)
    if beta is not None:
        c = c + beta.double() @ q.W
    if q.b is not None:
        c = c + q.b
    out = {
        f"{key}.norm.weight": torch.full_like(weight, 1 - spec.norm_gain_offset).to(dtype),  # unit gain
        f"{key}.affine.weight": M_t.to(dtype),
        f"{key}.affine.bias": c.to(dtype),
    }
    if beta is not None:
        out[f"{key}.norm.bias"] = torch.zeros_like(beta, dtype=dtype)
    return out


def _attn_affine(spec: ArchSpec, i: int, q: Proj, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """h' = h·W_Q + b_Q as an explicit affine map on the attention's input (the norm, if any, is left alone)."""
    key = f"{spec.layer(i, spec.o_proj.rsplit('.', 1)[0])}.attn_in"
    b = q.b if q.b is not None else torch.zeros(q.W.shape[1], dtype=torch.float64)
    return {f"{key}.weight": q.W.T.contiguous().to(dtype), f"{key}.bias": b.to(dtype)}  # nn.Linear: (d_out, d_in)


def _absorb_layer(q: Proj, k: Proj, v: Proj, i: int) -> tuple[Proj, Proj, float]:
    lu = _lu(q.W)  # one factorisation for the condition number and both solves
    cond = condition_number(q.W, lu)
    if not cond < SINGULAR_COND:
        raise TransformError(f"W_Q of layer {i} is singular (condition number {cond:.3g}); it cannot be absorbed")
    if q.b is not None and (k.b is None or v.b is None):
        raise TransformError(f"layer {i} has a query bias but no key/value bias to carry it")
    kv = torch.linalg.lu_solve(*lu, torch.cat([k.W, v.W], 1))  # W_Q⁻¹·[W_K | W_V] in one call
    Wk, Wv = kv.split([k.W.shape[1], v.W.shape[1]], 1)
    bk = None if k.b is None else (k.b - q.b @ Wk if q.b is not None else k.b)
    bv = None if v.b is None else (v.b - q.b @ Wv if q.b is not None else v.b)
    return Proj(Wk, bk), Proj(Wv, bv), cond


def _rope_commuting_refit(new: torch.Tensor, old: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """T (dh, dh) with new·T ≈ old-equivalent keys: for rows q_new, q_old (n, dh), returns T such that
    q_old·k ≈ q_new·(k·T) for every key k and every RoPE rotation.

    Rotary dims (HF rotate_half layout: pair f with f + r/2) act as complex numbers z = x_f + i·x_{f+r/2};
    RoPE multiplies z by e^{iθm}, so only a complex scale c_f per frequency commutes with it:
    z_old ≈ c_f·z_new (least squares)  ⇒  z_k' = conj(c_f)·z_k. Other dims: q_old ≈ q_new·M  ⇒  k' = k·Mᵀ.
    """
    dh = new.shape[1]
    T = torch.zeros(dh, dh, dtype=torch.float64)
    half = rotary_dim // 2
    if half:
        zn = torch.complex(new[:, :half], new[:, half:rotary_dim])
        zo = torch.complex(old[:, :half], old[:, half:rotary_dim])
        c = (zn.conj() * zo).sum(0) / (zn.abs() ** 2).sum(0).clamp_min(1e-30)  # (r/2,)
        f = torch.arange(half)
        T[f, f] = c.real
        T[f + half, f + half] = c.real
        T[f + half, f] = c.imag
        T[f, f + half] = -c.imag
    if rotary_dim < dh:
        M = torch.linalg.lstsq(new[:, rotary_dim:], old[:, rotary_dim:]).solution  # (dh-r, dh-r)
        T[rotary_dim:, rotary_dim:] = M.T
    return T


def _drop_layer(q: Proj, k: Proj, h: torch.Tensor, dims: Dims) -> Proj:
    """Refit W_K (per KV group) for q := h, on calibration attention inputs h (n, d)."""
    H, G, dh = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
    q_old = (h @ q.W + (q.b if q.b is not None else 0)).reshape(-1, H, dh)  # (n, H, dh)
    q_new = h.reshape(-1, H, dh)  # q := h, split into heads
    rep = H // G
    Wk, bk = k.W.clone(), None if k.b is None else k.b.clone()
    for g in range(G):
        heads = slice(g * rep, (g + 1) * rep)
        T = _rope_commuting_refit(q_new[:, heads].reshape(-1, dh), q_old[:, heads].reshape(-1, dh), dims.rotary_dim)
        cols = slice(g * dh, (g + 1) * dh)
        Wk[:, cols] = k.W[:, cols] @ T
        if bk is not None:
            bk[cols] = k.b[cols] @ T
    return Proj(Wk, bk)


def absorb_query_layer(
    sd: dict[str, torch.Tensor], spec: ArchSpec, dims: Dims, i: int, *, mode: str = "exact",
    attn_input: torch.Tensor | None = None,
) -> LayerResult:
    """Layer i of absorb-query (the unit the streaming driver calls): `sd` holds at least layer i's tensors.

    attn_input: the layer's calibration attention inputs (n, d), needed by mode="drop"."""
    if mode not in ("exact", "drop"):
        raise TransformError(f"unknown absorb-query mode {mode!r}; use exact or drop")
    _check_square(dims)
    dtype = layer_dtype(sd, f"{spec.layers}.{i}.")
    q, k, v = read_qkv(sd, spec, dims, i)
    removed = qkv_keys(sd, spec, i)
    out: dict[str, torch.Tensor] = {}
    folded: list[str] = []
    if mode == "exact":
        k2, v2, cond = _absorb_layer(q, k, v, i)
        if not attention_owns_its_norm(spec, dims):  # no norm private to the attention to fold into
            fold = _attn_affine(spec, i, q, dtype)
            entry = {"query": "identity", "attn_input": "attn_affine"}
        else:
            norm = spec.layer(i, spec.attn_norm)
            removed += [key for key in (f"{norm}.weight", f"{norm}.bias") if key in sd]
            fold = _fold_norm(sd, spec, i, q, dtype)
            entry = {"query": "identity", "attn_input": "affine"}
        out.update(fold)
        folded += [key for key in fold if ".affine." in key or ".attn_in." in key]
    else:
        if attn_input is None:
            raise TransformError("absorb-query --mode drop needs calibration attention inputs for every layer")
        cond = condition_number(q.W)
        k2, v2 = _drop_layer(q, k, attn_input.double(), dims), v
        entry = {"query": "identity", "attn_input": "norm"}
    kv = write_kv(spec, i, k2, v2, dtype)
    out.update(kv)
    if mode == "exact":
        folded += list(kv)
    return LayerResult(out, removed, entry, {"wq_condition": cond, "folded": folded})


def absorb_query(
    state_dict: dict[str, torch.Tensor],
    spec: ArchSpec,
    dims: Dims,
    *,
    mode: str = "exact",
    attn_inputs: list[torch.Tensor] | None = None,
) -> AbsorbResult:
    """Return a new state dict whose queries are the identity; the input dict is not modified.

    attn_inputs: per layer, calibration inputs to attention (n, d), needed by mode="drop".
    """
    if mode not in ("exact", "drop"):
        raise TransformError(f"unknown absorb-query mode {mode!r}; use exact or drop")
    _check_square(dims)
    if mode == "drop" and (attn_inputs is None or len(attn_inputs) != dims.num_hidden_layers):
        raise TransformError("absorb-query --mode drop needs calibration attention inputs for every layer")
    out = dict(state_dict)
    layers, conds, folded = [], [], []
    for i in range(dims.num_hidden_layers):
        res = absorb_query_layer(state_dict, spec, dims, i, mode=mode,
                                 attn_input=attn_inputs[i] if attn_inputs is not None else None)
        res.apply(out)
        layers.append(res.entry)
        conds.append(res.info["wq_condition"])
        folded += res.info["folded"]
    return AbsorbResult(out, layers, conds, folded)
