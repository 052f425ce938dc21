"""latent-kv: one low-rank latent for keys and values (METHODS.md §6; Palu arXiv 2407.21118, MHA2MLA 2502.14837).

K = h·W_K + b_K and V = h·W_V + b_V read the same attention input h, so one latent c = h·A (r values per token)
can serve both:

    K ≈ c·B_K + b_K,   V ≈ c·B_V + b_V,   keys = RoPE(k_norm(c·B_K + b_K))  (rebuilt from c, THEN rotated)

The cache holds c only (r instead of 2·G·dh values per token and layer); RoPE and the QK-norm act on the rebuilt
keys as they acted on the original ones, so at full rank r = 2·G·dh the model is the original (up to rounding).

Activation-aware fit, per layer (or per group of KV heads, --groups): with H = hᵀh/n on calibration tokens
(+ a ridge of RIDGE·tr(H)/d) and H = L·Lᵀ (Cholesky), W = [W_K | W_V] (d × 2·G·dh):

    Lᵀ·W = U·Σ·Vᵀ,   A = L⁻ᵀ·U_r·Σ_r (d × r),   [B_K | B_V] = V_rᵀ (r × 2·G·dh)

minimises E‖h·W − h·A·[B_K | B_V]‖² (Eckart–Young in the whitened space); σ_j² is exactly what rank j removes from
that error, which the rank allocation across layers uses. Without calibration H = I (plain SVD of W). The biases
stay on the up-projections, so they are exact at any rank. Groups: each group of G/groups KV heads gets its own
latent; the latents are concatenated (c = h·[A_1 … A_g]) and B_K, B_V are block-diagonal, so the loader sees one
dense latent attention whatever the grouping. Then each latent coordinate is rescaled (A[:, j]·t_j, B[j]/t_j) so that
A's column and B's row have one RMS (balance_latent: the SVD leaves all the scale in A, and a finetune's Adam then
moves B by percents a step). float64 throughout, one cast at the end.

--rope-pairs P (MHA2MLA, arXiv 2502.14837 §3.1, partial RoPE + §3.2 joint SVD): per KV head g keep RoPE on the P
frequency pairs with the largest 2-norm contribution to q·k on the calibration activations,

    score(g, i) = Σ_{query heads h of g} E‖q_{h,i}‖ · E‖k_{g,i}‖    (pair i = dims (i, i + rotary_dim/2))

(the paper's S_2-norm: |q_i·R k_i| ≤ ‖q_i‖·‖k_i‖, RoPE preserves each pair's norm; GQA sums its query heads; without
calibration E‖·‖ is the root mean square under h ~ N(0, I), ‖W_pair‖_F). Those 2P key dims per KV head (W_K^rope) are
cached as they are, rotated; the other e = dh − 2P key dims lose their rotation and join the values in the latent,
fitted as above on [W_K^nope | W_V]. The query heads are permuted to match each KV head's dims, [pair firsts | pair
seconds | RoPE-free dims] (q·k is unchanged by one permutation of both). Cache per token and layer: r + G·2P values.
With every pair kept and full rank it is the original model; with fewer pairs the dropped rotation is the loss (the
paper heals it by training). Partial rotary: pairs are those of the rotary dims, the pass-through dims are RoPE-free.

--fit attention weights the fit by what attention does with K and V, per KV head g (the rest as above):

    E‖(h·W − h·A·B)·D‖²,  D·Dᵀ = blockdiag(M_K, M_V) per KV head (+ RIDGE·tr/size),  Lᵀ·W·D = U·Σ·Vᵀ,
    A = L⁻ᵀ·U_r·Σ_r,  B = V_rᵀ·D⁻¹                  (D: the Cholesky factor; full rank: A·B = W, exact)

    M_V = Σ_{h of g} W_O[h]·W_O[h]ᵀ   (a value error dv reaches the output as dv·W_O[h]; W_O[h]: head h's dh rows)
    M_K = λ·s²·Σ_{h of g} Var(v_g·W_O[h])·Q_h   (a key error dk moves logit s·q_h·R(dk), which moves the output by
          about the spread of the value outputs: first-order softmax; s = head_dim^-½, λ = key_weight, default
          KEY_WEIGHT = 0.3, measured; plausibly below 1 because a value error along the mean input adds up over the
          attended tokens while a key error's effect, through centred value outputs, partly averages out)

Q_h = E_Δ[R(Δ)ᵀ·E[q_h q_hᵀ]·R(Δ)], the query moments averaged over the relative RoPE rotations R(Δ) of the query/key
pairs of a causal window of seq_len tokens (Δ = 0 … −(seq_len − 1), seq_len − |Δ| pairs each): a fast pair (ω_i·seq_len
≫ 2π) becomes isotropic, E‖q_{h,i}‖²/2 on both dims, with no cross terms; a slow one (SmolLM2's θ = 1e5: half its
pairs turn less than a radian over 256 tokens) keeps its block. Without the model's frequencies every pair's angle is
taken uniform (all isotropic). Non-rotary dims keep their E[q qᵀ] block (with --rope-pairs the latent's key dims are
all RoPE-free: the full block, no average). K=V (share-kv k=v): the shared block is weighted by M_K + M_V. Statistics
on the calibration tokens, or under h ~ N(0, I) without them. A per-head QK-norm between the rebuilt key and the logit
is not modelled: such layers are refused.

After share-kv (a combination): the latent is fitted over what the share-kv layer projects. After --kv-heads N it is
[W_K | W_V] of the N pooled heads (2·N·dh columns); after --mode k=v it is the shared W_S alone (N·dh columns: keys
and values are one tensor S), so keys and values are rebuilt from the same up-projection, B_K = B_V = V_rᵀ and
K = V = c·B + b_S (the loader's two up-projections hold the same weights). Queries, W_O and the QK-norms are the
share-kv layer's. At full rank the output is the share-kv model.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

import torch

from qkvconv.archs import ArchSpec, Dims
from qkvconv.archs.layout import Proj, qkv_keys, read_qkv
from qkvconv.errors import TransformError
from qkvconv.transforms.layer import LayerResult, column_signs, layer_dtype
from qkvconv.transforms.share_kv import _attn_prefix, _o_key, _put, move_qk_norms, read_o

# the layer keys of a share-kv output that a latent can follow: pooled heads and/or K=V (queries their own)
SHARE_KV_KEYS = {"query", "attn_input", "kv", "kv_heads"}

ROPE_PAIRS_AFTER_SHARE_KV = ("--rope-pairs needs a stock checkpoint, not a share-kv output (latent-kv follows "
                             "share-kv without --rope-pairs)")
ALLOCATIONS = ("uniform", "greedy", "kl")
FITS = ("kv", "attention")  # what the latent is fitted to: K and V themselves, or attention's use of them
# --fit attention's λ, picked by held-out KL on SmolLM2-135M at rank 128 (fit kv: 0.490): λ 1 0.294, 0.3 0.257, 0.1 0.302
# (LAMBADA first 500: 0.182, 0.226, 0.246; fit kv 0.200): convert.latent_kv_checkpoint has the measurements
KEY_WEIGHT = 0.3
RIDGE = 1e-6  # relative to the mean eigenvalue tr(H)/d
MIN_RANK_FRACTION = 0.25  # greedy: every layer keeps at least this share of the average rank
KL_LADDER = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # kl: the candidate ranks of each layer, as multiples of kv_rank


def full_rank(dims: Dims, groups: int = 1, rope_pairs: int | None = None, parts: int = 2) -> int:
    """The largest useful rank of one layer: each group's W is d × (G/groups)·(parts·dh − 2P) (parts 2: [W_K | W_V],
    with --rope-pairs [W_K^nope | W_V]; 1: a share-kv K=V layer's W_S)."""
    per_group = (dims.num_key_value_heads // groups) * (parts * dims.head_dim - 2 * (rope_pairs or 0))
    return groups * min(dims.hidden_size, per_group)


def check_latent_options(spec: ArchSpec, dims: Dims, kv_rank: int, groups: int = 1,
                         rope_pairs: int | None = None, parts: int = 2) -> None:
    """Refuse, in one line, a request that does not apply to this model.

    Every family in qkvconv/archs reads K and V from one attention input h, so the latent applies to all of them:
    QK-norms (per head, per KV head, or over the whole projection), partial RoPE, sinks, soft-capping and sliding
    windows act on the keys rebuilt from the cached latent at read time, as share-kv's K=V does with S."""
    G = dims.num_key_value_heads
    if groups < 1 or G % groups:
        raise TransformError(f"--groups {groups} must divide the model's {G} key/value heads (try one of "
                             f"{', '.join(str(n) for n in range(1, G + 1) if G % n == 0)})")
    if rope_pairs is not None and not 0 <= rope_pairs <= dims.rotary_dim // 2:
        has = (f"{dims.rotary_dim // 2} rotary pairs per head ({dims.rotary_dim} of its {dims.head_dim} dims rotate)"
               if dims.rotary_dim else "no RoPE: use --rope-pairs 0 for a latent of every key dim, absorbed at decode")
        raise TransformError(f"--rope-pairs {rope_pairs} must be between 0 and the model's {has}")
    top = full_rank(dims, groups, rope_pairs, parts)
    if kv_rank < groups:
        raise TransformError(f"--kv-rank {kv_rank} is below --groups {groups}: each group needs at least rank 1")
    if kv_rank > top:
        what = ("the shared K=V projection W_S ({G} heads × {dh})" if parts == 1 else
                "[W_K | W_V] (2 × {G} heads × {dh})" if rope_pairs is None else
                "[W_K^nope | W_V] ({G} heads × (2 × {dh} − 2 × {P}))").format(G=G, dh=dims.head_dim, P=rope_pairs)
        raise TransformError(f"--kv-rank {kv_rank} exceeds the full rank {top} of {what}: nothing would be saved")


def check_rope_pairs_layer(sd: dict, spec: ArchSpec, i: int) -> None:
    """--rope-pairs absorbs B_K into the query, which a QK-norm (a per-head norm of the rebuilt keys) forbids."""
    normed = [n for n in spec.qk_norm if any(k.startswith(f"{spec.layer(i, n)}.") for k in sd)]
    if normed:
        raise TransformError(f"--rope-pairs: layer {i} normalises keys per head ({normed[-1]}), so the RoPE-free key "
                             "part cannot be absorbed into the query; use latent-kv without --rope-pairs")


def share_kv_heads(block: dict | None, source: str, kv_heads: int, settable: bool) -> tuple[int | None, int]:
    """(pooled KV heads N, None where not pooled; parts: 1 for K=V else 2) of the checkpoint latent-kv reads, from its
    qkvconv block (None: a stock checkpoint); kv_heads: the config's KV heads, settable: whether the family's config
    has num_key_value_heads (the latent attention reads pooled heads from it). Refuses, in one line, a conversion
    the latent attention cannot follow."""
    if not block:
        return None, 2
    layers = block["layers"]
    for i, layer in enumerate(layers):
        if layer.get("qk") == "shared" or "pos2d" in layer:
            raise TransformError(f"{source}: layer {i} has a shared query (share-kv q=k / q=k=v or --pos2d); the latent "
                                 "attention projects its own queries, so latent-kv follows only share-kv k=v and "
                                 "--kv-heads")
        if set(layer) - SHARE_KV_KEYS or layer["query"] != "projection" or layer["attn_input"] != "norm":
            what = ", ".join(sorted(set(layer) - SHARE_KV_KEYS)) or f"query {layer['query']}"
            raise TransformError(f"{source} is already a qkvconv-converted checkpoint ({what} in layer {i}); "
                                 "latent-kv needs a stock checkpoint or a share-kv output")
    if not any("kv" in layer or "kv_heads" in layer for layer in layers):
        raise TransformError(f"{source} is a qkvconv checkpoint with nothing share-kv did; latent-kv needs a stock "
                             "checkpoint or a share-kv output")
    heads = {layer.get("kv_heads", kv_heads) for layer in layers}
    shared = {layer.get("kv") == "shared" for layer in layers}
    if len(heads) > 1 or len(shared) > 1:
        raise TransformError(f"{source}: layers differ in pooled heads or K=V; latent-kv needs one layout throughout")
    N = heads.pop()
    if N != kv_heads and not settable:
        raise TransformError(f"{source}: the family's config has no num_key_value_heads, so the latent attention "
                             f"cannot hold its {N} pooled heads (latent-kv follows share-kv k=v here)")
    return (N if N != kv_heads else None), 1 if shared.pop() else 2


def read_kv_source(sd: dict, spec: ArchSpec, dims: Dims, i: int, entry: dict | None
                   ) -> tuple[Proj, list[Proj], Proj, Dims, list[str]]:
    """Layer i's (q, parts, o, dims, removed keys) as the latent sees them: parts [k, v] of a stock layer or of a
    share-kv layer with pooled heads, [s] of a share-kv K=V layer; dims with the layer's KV heads.
    A share-kv layer stores q_proj, k_proj, v_proj or s_proj, o_proj as nn.Linear under the attention block."""
    if entry is None or not (set(entry) & {"kv", "kv_heads"}):
        q, k, v = read_qkv(sd, spec, dims, i)
        removed = qkv_keys(sd, spec, i) + [key for key in sd if key.startswith(_o_key(spec, i) + ".")]
        return q, [k, v], read_o(sd, spec, dims, i), dims, removed
    attn = _attn_prefix(spec, i)
    dims = replace(dims, num_key_value_heads=entry.get("kv_heads", dims.num_key_value_heads))

    def linear(name: str, d_in: int, d_out: int) -> Proj:  # nn.Linear stores (d_out, d_in)
        w, b = sd[f"{attn}.{name}.weight"], sd.get(f"{attn}.{name}.bias")
        if tuple(w.shape) != (d_out, d_in):
            raise TransformError(f"{attn}.{name}.weight: expected {(d_out, d_in)}, found {tuple(w.shape)}")
        return Proj(w.double().T.contiguous(), None if b is None else b.double())

    d = dims.hidden_size
    names = ["s_proj"] if entry.get("kv") == "shared" else ["k_proj", "v_proj"]
    parts = [linear(n, d, dims.kv_size) for n in names]
    removed = [f"{attn}.{n}.{t}" for n in ["q_proj", *names, "o_proj"] for t in ("weight", "bias")
               if f"{attn}.{n}.{t}" in sd]
    return linear("q_proj", d, dims.q_size), parts, linear("o_proj", dims.q_size, d), dims, removed


# ------------------------------------------------------------------------------------------ the fit
def _gram(attn_input: torch.Tensor | None, d: int) -> torch.Tensor:
    """H = hᵀh/n + RIDGE·tr(H)/d·I in float64 (identity without calibration: plain SVD)."""
    if attn_input is None:
        return torch.eye(d, dtype=torch.float64)
    x = attn_input.double().reshape(-1, d)
    H = x.T @ x / len(x)  # (d, d)
    return H + RIDGE * H.trace() / d * torch.eye(d, dtype=torch.float64)


def _group_weights(k: Proj, v: Proj | None, dims: Dims, groups: int) -> list[torch.Tensor]:
    """[W_K | W_V] of each group of KV heads: (d, (G/groups)·(e + dh)) each, the group's key columns first (e = dh,
    or the RoPE-free key width with --rope-pairs); v None: the group's columns of k alone (a K=V layer's W_S)."""
    wk = k.W.shape[1] // groups
    wv = 0 if v is None else v.W.shape[1] // groups
    return [torch.cat([k.W[:, j * wk:(j + 1) * wk]] + ([] if v is None else [v.W[:, j * wv:(j + 1) * wv]]), 1)
            for j in range(groups)]

# ------------------------------------------------------------------------------------- --fit attention
def check_attention_fit(sd: dict, spec: ArchSpec, i: int) -> None:
    """--fit attention weights key errors by the raw queries, which a per-head QK-norm between them and the logits
    would change: refused where the layer has one (stock or share-kv layout)."""
    attn = _attn_prefix(spec, i)
    names = [spec.layer(i, n) for n in spec.qk_norm] + [f"{attn}.q_norm", f"{attn}.k_norm"]
    normed = [n for n in names if any(k.startswith(f"{n}.") for k in sd)]
    if normed:
        raise TransformError(f"--fit attention: layer {i} normalises queries/keys per head ({normed[-1]}), which "
                             "the attention weighting does not model; use --fit kv")


def _second_moments(p: Proj, heads: int, attn_input: torch.Tensor | None) -> torch.Tensor:
    """E[x_h x_hᵀ] of x = h·W + b for each head: (heads, w, w), w = W's columns per head; on the calibration tokens,
    or WᵀW + bbᵀ under h ~ N(0, I)."""
    if attn_input is None:
        w = p.W if p.b is None else torch.cat([p.W, p.b[None]], 0)  # (d (+1), heads·w)
        w = w.reshape(len(w), heads, -1)
        return torch.einsum("nhi,nhj->hij", w, w)
    x = attn_input.double().reshape(-1, p.W.shape[0]) @ p.W
    x = (x if p.b is None else x + p.b).view(len(x), heads, -1)  # (n, heads, w)
    return torch.einsum("nhi,nhj->hij", x, x) / len(x)


def rope_distance_angles(inv_freq: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The relative rotation angles ω_i·Δ (window, P) of the query/key pairs of a causal window of `window` tokens,
    Δ = key − query position = 0, −1, … −(window − 1), and their weights (window − |Δ| pairs each, summing to 1)."""
    delta = -torch.arange(window, dtype=torch.float64)
    weights = window + delta
    return delta[:, None] * inv_freq.double()[None], weights / weights.sum()


def _rope_average(Q: torch.Tensor, rotary_dim: int, angles: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """E_Δ[R(Δ)ᵀ·Q·R(Δ)] for Q (heads, dh, dh): the query moments as a key error dk meets them, q·R(Δ)·dk, RoPE
    rotating pair i (dims i, i + rotary_dim/2) by ω_i·Δ (R_i = c_i·I + s_i·J, J = [[0, −1], [1, 0]]). angles: (ω_i·Δ
    (n, P), weights (n,)), rope_distance_angles; None: every pair's angle uniform and independent (each rotary pair
    isotropic, E‖q_i‖²/2 on both dims, no cross term with a rotary dim). The non-rotary block stays."""
    half, heads, dh = rotary_dim // 2, Q.shape[0], Q.shape[1]
    if angles is None:  # E[c_i c_j] = E[s_i s_j] = δ_ij/2, every other moment 0
        cc = ss = torch.eye(half, dtype=torch.float64) / 2
        cs = torch.zeros(half, half, dtype=torch.float64)
        c = s = torch.zeros(half, dtype=torch.float64)
    else:
        theta, w = angles
        cos, sin = theta.cos(), theta.sin()  # (n, P)
        cc, ss, cs = (cos.T * w) @ cos, (sin.T * w) @ sin, (cos.T * w) @ sin  # E[c_i c_j], E[s_i s_j], E[c_i s_j]
        c, s = w @ cos, w @ sin  # E[c_i], E[s_i]
    J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    out = Q.clone()
    # rotary × rotary as (heads, 2, P, 2, P) = [h, α, i, β, j]; R_iᵀ = c_i·I − s_i·J:
    # E[R_iᵀ·Q_ij·R_j] = E[c_i c_j]·Q_ij + E[c_i s_j]·Q_ij·J − E[s_i c_j]·J·Q_ij − E[s_i s_j]·J·Q_ij·J
    Qr = Q[:, :rotary_dim, :rotary_dim].reshape(heads, 2, half, 2, half)
    QJ = torch.einsum("haibj,bc->haicj", Qr, J)
    JQ = torch.einsum("ca,haibj->hcibj", J, Qr)
    JQJ = torch.einsum("ca,haibj,bd->hcidj", J, Qr, J)

    def grid(m):  # (P, P) over the [i, j] axes
        return m[None, None, :, None, :]

    rr = grid(cc) * Qr + grid(cs) * QJ - grid(cs.T) * JQ - grid(ss) * JQJ
    out[:, :rotary_dim, :rotary_dim] = rr.reshape(heads, rotary_dim, rotary_dim)
    if dh > rotary_dim:  # non-rotary x × rotary pair j: E[Q_xj·R_j] = Q_xj·(E[c_j]·I + E[s_j]·J), and its transpose
        Qx = Q[:, rotary_dim:, :rotary_dim].reshape(heads, dh - rotary_dim, 2, half)  # [h, x, β, j]
        xr = c * Qx + s * torch.einsum("hxbj,bc->hxcj", Qx, J)
        out[:, rotary_dim:, :rotary_dim] = xr.reshape(heads, dh - rotary_dim, rotary_dim)
        out[:, :rotary_dim, rotary_dim:] = out[:, rotary_dim:, :rotary_dim].transpose(1, 2)
    return out


def _value_spread(v: Proj, o: Proj, dims: Dims, attn_input: torch.Tensor | None) -> torch.Tensor:
    """Var(v_g·W_O[h]) for each query head h (g its KV head), summed over the output dims: (H,). = tr(W_O[h]ᵀ·
    W_V,gᵀ·Cov(h)·W_V,g·W_O[h]) (the bias does not spread); Cov(h) on the calibration tokens, I without them."""
    H, G, dh, d = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim, dims.hidden_size
    if attn_input is None:
        cov = torch.eye(d, dtype=torch.float64)
    else:
        x = attn_input.double().reshape(-1, d)
        x = x - x.mean(0)
        cov = x.T @ x / len(x)  # (d, d)
    wv = v.W.reshape(d, G, dh)
    wo = o.W.reshape(G, H // G, dh, d)  # query head h = g·(H/G) + m
    C = torch.einsum("dgi,de,egj->gij", wv, cov, wv)  # (G, dh, dh): Cov(v_g) = W_V,gᵀ·Cov(h)·W_V,g
    # tr(W_O[h]ᵀ·Cov(v_g)·W_O[h]) per head: dh × dh products, never a (d, d) one per head
    return torch.einsum("gmie,gij,gmje->gm", wo, C, wo).reshape(H)


def attention_weights(q: Proj, parts: list[Proj], o: Proj, dims: Dims, attn_input: torch.Tensor | None,
                      key_weight: float = KEY_WEIGHT, rotary: bool = True,
                      angles: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The right weight of the latent's columns for --fit attention (module docstring), per KV head g: [M_K, M_V]
    (e × e, dh × dh; e = q's columns per head, the RoPE-free key width with --rope-pairs) of [k, v] parts, or
    [M_K + M_V] of a K=V layer's [s]. rotary: average the query moments over RoPE (False: the key dims are RoPE-free)."""
    H, G, dh = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
    k, v = _kv(parts)
    Q = _second_moments(q, H, attn_input)  # (H, e, e)
    if rotary and dims.rotary_dim:
        Q = _rope_average(Q, dims.rotary_dim, angles)
    spread = _value_spread(v or k, o, dims, attn_input)  # (H,)
    wo = o.W.reshape(H, dh, -1)
    # M_K = λ·s²·Σ_h Var(v_g·W_O[h])·Q_h ; M_V = Σ_h W_O[h]·W_O[h]ᵀ, over the query heads h of g
    MK = (key_weight / dh * spread[:, None, None] * Q).reshape(G, H // G, *Q.shape[1:]).sum(1)
    MV = (wo @ wo.transpose(1, 2)).view(G, H // G, dh, dh).sum(1)
    return [[MK[g] + MV[g]] if v is None else [MK[g], MV[g]] for g in range(G)]


def _group_metric(weights: list[list[torch.Tensor]], groups: int) -> list[torch.Tensor]:
    """Each group's D·Dᵀ in _group_weights' column order, [its heads' M_K … | their M_V …] (K=V: [M …]), plus a
    ridge of RIDGE·tr/size."""
    per = len(weights) // groups
    out = []
    for j in range(groups):
        heads = weights[j * per:(j + 1) * per]
        M = torch.block_diag(*[w[0] for w in heads], *[w[1] for w in heads if len(w) > 1])
        out.append(M + RIDGE * M.trace() / len(M) * torch.eye(len(M), dtype=torch.float64))
    return out


def fit_metrics(sd: dict, spec: ArchSpec, i: int, q: Proj, parts: list[Proj], o: Proj, dims: Dims,
                attn_input: torch.Tensor | None, groups: int, fit: str, key_weight: float,
                rope_pairs: int | None, rope_angles: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> list[torch.Tensor | None]:
    """Each group's D·Dᵀ for _whiten: None for --fit kv; parts as the latent sees them ([k^nope, v] with rope_pairs,
    q then in split_rope_pairs' layout, its RoPE-free columns [2P:] of each head matching k^nope); rope_angles: the
    relative rotations the query moments are averaged over (rope_distance_angles; None: uniform angles)."""
    if fit not in FITS:
        raise TransformError(f"unknown --fit {fit!r}; use one of {', '.join(FITS)}")
    if fit == "kv":
        return [None] * groups
    if not key_weight >= 0:
        raise TransformError(f"--key-weight {key_weight} must be a non-negative number")
    check_attention_fit(sd, spec, i)
    if rope_pairs is not None:
        H, dh = dims.num_attention_heads, dims.head_dim
        q = _columns(q, torch.cat([torch.arange(2 * rope_pairs, dh) + h * dh for h in range(H)]))
    weights = attention_weights(q, parts, o, dims, attn_input, key_weight, rope_pairs is None, rope_angles)
    return _group_metric(weights, groups)


# ------------------------------------------------------------------------------------ --rope-pairs (MHA2MLA)
def _columns(p: Proj, cols: torch.Tensor) -> Proj:
    return Proj(p.W[:, cols], None if p.b is None else p.b[cols])


def _pair_norms(p: Proj, heads: int, dims: Dims, attn_input: torch.Tensor | None) -> torch.Tensor:
    """E‖x_{h,i}‖ for each head h and rotary pair i (dims i, i + rotary_dim/2) of the projection x = h·W + b: (heads,
    rotary_dim/2), the mean over the calibration tokens, or ‖(W_pair; b_pair)‖_F (the RMS under h ~ N(0, I))."""
    dh, half = dims.head_dim, dims.rotary_dim // 2
    if attn_input is None:
        w = p.W if p.b is None else torch.cat([p.W, p.b[None]], 0)  # (d (+1), heads·dh)
        sq = w.pow(2).sum(0).view(heads, dh)
        return (sq[:, :half] + sq[:, half:2 * half]).sqrt()
    x = attn_input.double().reshape(-1, p.W.shape[0]) @ p.W
    x = (x if p.b is None else x + p.b).view(-1, heads, dh)  # (n, heads, dh)
    return (x[..., :half].pow(2) + x[..., half:2 * half].pow(2)).sqrt().mean(0)


def rope_pair_scores(q: Proj, k: Proj, dims: Dims, attn_input: torch.Tensor | None) -> torch.Tensor:
    """score(g, i) = Σ_{h of g} E‖q_{h,i}‖·E‖k_{g,i}‖: (G, rotary_dim/2), MHA2MLA's 2-norm contribution of pair i to
    the logits of KV head g (summed over the query heads it serves)."""
    H, G = dims.num_attention_heads, dims.num_key_value_heads
    qn = _pair_norms(q, H, dims, attn_input).view(G, H // G, -1).sum(1)  # query head h = g·H/G + j
    return qn * _pair_norms(k, G, dims, attn_input)


def select_rope_pairs(scores: torch.Tensor, pairs: int) -> torch.Tensor:
    """The `pairs` highest-scoring frequency pairs of each KV head, ascending: (G, P)."""
    return scores.topk(pairs, dim=1).indices.sort(dim=1).values


def head_layout(selected: torch.Tensor, dims: Dims) -> torch.Tensor:
    """Each KV head's dims reordered [pair firsts | pair seconds | the RoPE-free rest, ascending]: (G, dh)."""
    dh, half = dims.head_dim, dims.rotary_dim // 2
    rows = []
    for sel in selected.tolist():
        rope = sel + [i + half for i in sel]
        rows.append(rope + [j for j in range(dh) if j not in set(rope)])
    return torch.tensor(rows, dtype=torch.long).view(len(rows), dh)


@dataclass
class _RopeSplit:
    """A layer's projections rearranged for --rope-pairs (see head_layout)."""

    q: Proj  # (d, H·dh), each head's columns in its KV head's layout
    k_rope: Proj  # (d, G·2P): the kept pairs' key columns
    k_nope: Proj  # (d, G·e): the RoPE-free key columns, e = dh − 2P
    selected: torch.Tensor  # (G, P) frequency indices
    score_kept: list[float]  # per KV head, the share of its pairs' summed score that the kept pairs hold


def split_rope_pairs(q: Proj, k: Proj, dims: Dims, pairs: int, attn_input: torch.Tensor | None) -> _RopeSplit:
    """Select each KV head's `pairs` pairs by score and split W_K into the kept pairs' columns and the RoPE-free rest;
    W_Q's heads follow their KV head's layout, so every q·k is the same sum of products, reordered."""
    H, G, dh = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
    scores = rope_pair_scores(q, k, dims, attn_input)  # (G, rotary_dim/2)
    selected = select_rope_pairs(scores, pairs)
    layout = head_layout(selected, dims)  # (G, dh)
    cols = layout + torch.arange(G)[:, None] * dh  # absolute key columns per KV head
    q_cols = torch.cat([layout[h // (H // G)] + h * dh for h in range(H)])
    kept = (scores.gather(1, selected).sum(1) / scores.sum(1).clamp_min(1e-300)).tolist()
    return _RopeSplit(_columns(q, q_cols), _columns(k, cols[:, :2 * pairs].reshape(-1)),
                      _columns(k, cols[:, 2 * pairs:].reshape(-1)), selected, kept)


@dataclass
class _Whitened:
    """The whitened SVD of one group: Lᵀ·W·D = U·Σ·Vᵀ, and Lᵀ, D to undo the whitening (D None: the identity)."""

    Lt: torch.Tensor  # (d, d) upper triangular
    U: torch.Tensor  # (d, m)
    S: torch.Tensor  # (m,)
    Vh: torch.Tensor  # (m, 2·Gg·dh)
    D: torch.Tensor | None = None  # (2·Gg·dh, 2·Gg·dh) lower triangular, --fit attention

    def up(self, r: int) -> torch.Tensor:
        """[B_K | B_V] = V_rᵀ·D⁻¹: (r, 2·Gg·dh)."""
        Vr = self.Vh[:r]
        return Vr if self.D is None else torch.linalg.solve_triangular(self.D, Vr, upper=False, left=False)


def _whiten(H: torch.Tensor, W: torch.Tensor, M: torch.Tensor | None = None) -> _Whitened:
    L = torch.linalg.cholesky(H)  # H = L·Lᵀ
    D = None if M is None else torch.linalg.cholesky(M)  # M = D·Dᵀ: ‖e·D‖² = e·M·eᵀ
    U, S, Vh = torch.linalg.svd(L.T @ W if D is None else L.T @ W @ D, full_matrices=False)  # Lᵀ·W·D = U·Σ·Vᵀ
    signs = column_signs(Vh.T)  # each pair (u_j, v_j) with one sign on every device: U·Σ·Vᵀ unchanged
    return _Whitened(L.T, U * signs, S, Vh * signs[:, None], D)


def layer_spectrum(sd: dict, spec: ArchSpec, dims: Dims, i: int, attn_input: torch.Tensor | None,
                   groups: int = 1, rope_pairs: int | None = None, entry: dict | None = None, fit: str = "kv",
                   key_weight: float = KEY_WEIGHT, rope_angles: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> list[torch.Tensor]:
    """Layer i's whitened squared singular values per group, σ_j² (each (min(d, 2·Gg·dh),), float64): what rank j
    removes from E‖h·W − h·A·B‖² (their sum is E‖h·[W_K | W_V]‖², the layer's K/V output energy; [W_K^nope | W_V]
    with rope_pairs; E‖(h·W − h·A·B)·D‖² with fit "attention"). entry: the layer's share-kv entry where the input is
    a share-kv output."""
    q, parts, o, dims, _ = read_kv_source(sd, spec, dims, i, entry)
    if rope_pairs is not None:
        split = split_rope_pairs(q, parts[0], dims, rope_pairs, attn_input)
        q, parts = split.q, [split.k_nope, *parts[1:]]
    H = _gram(attn_input, dims.hidden_size)
    metrics = fit_metrics(sd, spec, i, q, parts, o, dims, attn_input, groups, fit, key_weight, rope_pairs,
                          rope_angles)
    return [_whiten(H, W, M).S.pow(2) for W, M in zip(_group_weights(*_kv(parts), dims, groups), metrics)]


def _kv(parts: list[Proj]) -> tuple[Proj, Proj | None]:
    """(k, v) of [k, v], (s, None) of a K=V layer's [s]."""
    return parts[0], parts[1] if len(parts) > 1 else None


def _split_even(rank: int, groups: int) -> list[int]:
    return [rank // groups + (j < rank % groups) for j in range(groups)]


def allocate_ranks(spectra: list[list[torch.Tensor]], kv_rank: int, min_rank: int | None = None,
                   relative: bool = True) -> list[list[int]]:
    """Greedy rank allocation across layers (and groups): L·kv_rank ranks in all, each layer ≥ min_rank (default
    MIN_RANK_FRACTION·kv_rank, split over its groups), then every further rank goes where it removes the most of its
    layer's relative K/V error, σ_j² / Σ σ² of that layer. Within a group σ_j² does not increase with j, so taking
    the largest marginal reductions one by one is the same as taking the largest remaining ones at once (a heap).
    relative=False: σ_j² as is (the summed, not relative, K/V error). Returns ranks[layer][group]."""
    n_layers, groups = len(spectra), len(spectra[0])
    total = n_layers * kv_rank
    caps = [[len(s) for s in layer] for layer in spectra]
    if total > sum(map(sum, caps)):
        raise TransformError(f"--kv-rank {kv_rank} exceeds the layers' full rank")
    floor = max(groups, round(MIN_RANK_FRACTION * kv_rank) if min_rank is None else min_rank)
    ranks = [[min(f, c) for f, c in zip(_split_even(min(floor, kv_rank), groups), cap)] for cap in caps]
    energy = [(float(sum(s.sum() for s in layer)) or 1.0) if relative else 1.0 for layer in spectra]
    heap = [(-float(spectra[l][g][ranks[l][g]]) / energy[l], l, g) for l in range(n_layers) for g in range(groups)
            if ranks[l][g] < caps[l][g]]
    heapq.heapify(heap)
    for _ in range(total - sum(map(sum, ranks))):
        _, l, g = heapq.heappop(heap)
        ranks[l][g] += 1
        if ranks[l][g] < caps[l][g]:
            heapq.heappush(heap, (-float(spectra[l][g][ranks[l][g]]) / energy[l], l, g))
    return ranks


def rank_ladder(kv_rank: int, top: int, groups: int = 1, factors: tuple[float, ...] = KL_LADDER) -> list[int]:
    """The candidate ranks of one layer for the kl allocation: factor·kv_rank for each factor, rounded to a multiple
    of `groups` (each group gets an equal share), kept within [groups, top] (top: the layer's full rank); kv_rank
    itself is always one of them, so the uniform allocation is always a choice."""
    ladder = {min(top, max(groups, groups * round(f * kv_rank / groups))) for f in factors}
    return sorted(ladder | {kv_rank})


def allocate_ranks_by_kl(kl: list[dict[int, float]], kv_rank: int) -> list[int]:
    """The ranks, one per layer from its measured {rank: KL} (qkvconv.sensitivity: the model's KL to the original
    when only that layer is compressed at that rank), that minimise Σ_i KL_i(r_i) subject to Σ_i r_i = L·kv_rank:
    an exact dynamic programme over the partial sums (a knapsack on the discrete ladder; the summed per-layer KL is
    the additive model of the whole model's KL)."""
    total, n = len(kl) * kv_rank, len(kl)
    lo = [sum(min(c) for c in kl[i:]) for i in range(n)] + [0]  # the least / most the layers from i on can add
    hi = [sum(max(c) for c in kl[i:]) for i in range(n)] + [0]
    if not lo[0] <= total <= hi[0]:
        raise TransformError(f"no rank choice from the measured ladders averages --kv-rank {kv_rank}")
    best: dict[int, float] = {0: 0.0}  # partial sum of ranks -> least summed KL reaching it
    back: list[dict[int, int]] = []  # per layer: partial sum after it -> its rank
    for i, costs in enumerate(kl):
        nxt: dict[int, float] = {}
        choice: dict[int, int] = {}
        for s, cost in best.items():
            for r in sorted(costs):
                t = s + r
                if not lo[i + 1] <= total - t <= hi[i + 1]:
                    continue  # the remaining layers could not make up the total
                if t not in nxt or cost + costs[r] < nxt[t]:
                    nxt[t], choice[t] = cost + costs[r], r
        best = nxt
        back.append(choice)
    ranks, s = [], total
    for choice in reversed(back):
        ranks.append(choice[s])
        s -= choice[s]
    return ranks[::-1]


def uniform_ranks(n_layers: int, kv_rank: int, groups: int = 1) -> list[list[int]]:
    return [_split_even(kv_rank, groups) for _ in range(n_layers)]


def kept_energy(spectra: list[torch.Tensor], ranks: list[int]) -> float:
    """The share of the layer's K/V output energy (activation norm) its ranks keep: Σ_{j<r} σ_j² / Σ σ²."""
    total = sum(float(s.sum()) for s in spectra)
    return sum(float(s[:r].sum()) for s, r in zip(spectra, ranks)) / total if total else 1.0


# ----------------------------------------------------------------------------------------- one layer
def balance_latent(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's factors with each latent coordinate j rescaled, A[:, j]·t_j and B[j]/t_j, so that its down- and
    up-projection entries have one root-mean-square: A·B is unchanged (exactly so in float64), the cache the same
    size. The SVD leaves the whole scale in A (Σ) and none in B (orthonormal rows, divided by D with --fit
    attention), 1e-2…1e-3 against A's 0.3…3 on SmolLM2. A finetune's Adam moves every entry by about its lr, so the
    small factor changed by percents a step: healing from there stalled (the 1/6 heal from --fit attention stayed at
    perplexity ~70 for 300 steps; gradient norms 3× those of --fit kv). Balanced, the relative change a step makes
    in A·B is the least it can be (‖δA‖/‖A‖ + ‖δB‖/‖B‖ at a fixed product is least where the RMSs are equal).
    A: (d, r), B: (r, m)."""
    a, b = A.pow(2).mean(0).sqrt(), B.pow(2).mean(1).sqrt()
    t = torch.where((a > 0) & (b > 0), (b / a.clamp_min(1e-300)).sqrt(), torch.ones_like(a))
    return A * t, B / t[:, None]


def latent_kv_layer(sd: dict[str, torch.Tensor], spec: ArchSpec, dims: Dims, i: int, rank: int | list[int],
                    attn_input: torch.Tensor | None, groups: int = 1, rope_pairs: int | None = None,
                    entry: dict | None = None, fit: str = "kv", key_weight: float = KEY_WEIGHT,
                    rope_angles: tuple[torch.Tensor, torch.Tensor] | None = None) -> LayerResult:
    """Layer i of latent-kv (the unit the streaming driver calls). rank: the layer's latent size (split evenly over
    the groups) or one rank per group; attn_input (n, d): the original's attention inputs (None: plain SVD);
    rope_pairs: P, the MHA2MLA variant (module docstring), None for reconstruct-then-rotate; entry: the layer's entry
    in the input's qkvconv block where the input is a share-kv output (the latent is then over its pooled heads'
    [W_K | W_V], or its shared W_S with B_K = B_V); fit: "kv" (E‖h·W − h·A·B‖²) or "attention" (weighted by what
    attention does with K and V, module docstring; key_weight: λ, the weight of the key errors; rope_angles: the
    relative rotations its query moments are averaged over, rope_distance_angles, None: uniform angles).

    Writes, under the attention block: q_proj, kv_a_proj (A: d → r), k_b_proj (B_K: r → G·dh, b_K),
    v_b_proj (B_V, b_V), o_proj, and the QK-norms; fused QKV families are split (the block is replaced at load).
    With rope_pairs: q_proj in the permuted head layout, k_rope_proj (d → G·2P, b_K of those dims), k_b_proj of the
    G·(dh − 2P) RoPE-free key dims (absent when none are left)."""
    ranks = _split_even(rank, groups) if isinstance(rank, int) else list(rank)
    q, parts, o, dims, removed = read_kv_source(sd, spec, dims, i, entry)
    if rope_pairs is not None and (len(parts) == 1 or (entry is not None and "kv_heads" in entry)):
        raise TransformError(f"layer {i}: {ROPE_PAIRS_AFTER_SHARE_KV}")
    check_latent_options(spec, dims, max(sum(ranks), groups), groups, rope_pairs, len(parts))
    if len(ranks) != groups or min(ranks) < 1:
        raise TransformError(f"layer {i}: {ranks} is not one positive rank per group ({groups} groups)")
    dtype = layer_dtype(sd, f"{spec.layers}.{i}.")
    k, v = _kv(parts)
    split = None
    if rope_pairs is not None:
        check_rope_pairs_layer(sd, spec, i)
        split = split_rope_pairs(q, k, dims, rope_pairs, attn_input)
        q, k = split.q, split.k_nope  # the latent covers the RoPE-free key dims and the values
    H = _gram(attn_input, dims.hidden_size)
    metrics = fit_metrics(sd, spec, i, q, parts if split is None else [k, *parts[1:]], o, dims, attn_input, groups,
                          fit, key_weight, rope_pairs, rope_angles)
    vw = k.W if v is None else v.W  # K=V: the values' up-projection is the keys' (B_V = B_K)
    d, wk, wv, r = dims.hidden_size, k.W.shape[1] // groups, vw.shape[1] // groups, sum(ranks)
    A = torch.zeros(d, r, dtype=torch.float64)
    Bk = torch.zeros(r, k.W.shape[1], dtype=torch.float64)
    Bv = torch.zeros(r, vw.shape[1], dtype=torch.float64)
    kept, start = [], 0
    for j, (W, M, rj) in enumerate(zip(_group_weights(k, v, dims, groups), metrics, ranks)):
        f = _whiten(H, W, M)
        if rj > len(f.S):
            raise TransformError(f"layer {i}: rank {rj} exceeds the group's full rank {len(f.S)}")
        rows = slice(start, start + rj)
        # A = L⁻ᵀ·U_r·Σ_r ; [B_K | B_V] = V_rᵀ·D⁻¹ (K=V: B_K = B_V), balanced
        A[:, rows], B = balance_latent(torch.linalg.solve_triangular(f.Lt, f.U[:, :rj] * f.S[:rj], upper=True),
                                       f.up(rj))
        Bk[rows, j * wk:(j + 1) * wk] = B[:, :wk]
        Bv[rows, j * wv:(j + 1) * wv] = B[:, wk:] if v is not None else B[:, :wk]
        kept.append(float(f.S[:rj].pow(2).sum() / f.S.pow(2).sum().clamp_min(1e-300)))
        start += rj
    attn = _attn_prefix(spec, i)
    out: dict[str, torch.Tensor] = {}
    _put(out, f"{attn}.q_proj", q, dtype)
    _put(out, f"{attn}.kv_a_proj", Proj(A, None), dtype)  # (d, r): c = h·A
    if Bk.shape[1]:
        _put(out, f"{attn}.k_b_proj", Proj(Bk, k.b), dtype)  # (r, G·dh): K = c·B_K + b_K (RoPE-free dims: G·e)
    _put(out, f"{attn}.v_b_proj", Proj(Bv, (v or k).b), dtype)
    if split is not None and split.k_rope.W.shape[1]:
        _put(out, f"{attn}.k_rope_proj", split.k_rope, dtype)  # (d, G·2P): the kept pairs, cached rotated
    _put(out, f"{attn}.o_proj", o, dtype)
    move_qk_norms(sd, spec, i, attn, out, removed)  # a share-kv input has them in place already: nothing moves
    removed = [key for key in removed if key not in out]
    latent: dict = {"rank": r}
    if groups > 1:  # B_K, B_V block-diagonal: the modeling rebuilds each group's keys from its own slice of c
        latent["group_ranks"] = ranks
    stats = {"rank": r, "group_ranks": ranks, "kept_energy": kept, "fit": fit}
    if fit == "attention":
        stats["key_weight"] = key_weight
    if split is not None:
        latent["rope_pairs"] = split.selected.tolist()
        stats |= {"rope_pairs": split.selected.tolist(), "rope_score_kept": split.score_kept}
    entry = {"query": "projection", "attn_input": "norm", "kv_latent": latent}
    return LayerResult(out, removed, entry, {"fit": stats})


def kv_cache_ratio(ranks: list[int], dims: Dims, rope_pairs: int | None = None) -> float:
    """Cache values after / before: Σ (r_l + G·2P) over L·2·G·dh."""
    kept = 2 * (rope_pairs or 0) * dims.num_key_value_heads
    return sum(r + kept for r in ranks) / (len(ranks) * 2 * dims.kv_size)
