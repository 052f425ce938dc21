"""share-kv: share projections (K=V, Q=K, Q=K=V) and pool KV heads (METHODS.md §3, §4; arXiv 2606.04032, 2305.19129).

One shared projection S = h·W_S + b_S with N heads replaces two or three of W_Q, W_K, W_V:

    k=v:    keys = RoPE(k_norm(S)), values = S            (the cache holds S once: −50%)
    q=k:    queries = keys = RoPE(norm(S)), S head g serves query heads g·H/N … (symmetric logits);
            pos2d=p adds the learned asymmetric 2D positional term of arXiv 2305.19129, zero-started
    q=k=v:  all three from S
    --kv-heads N pools G → N key/value heads (N | H, N ≤ G): cache × N/G.

Nothing here is lossless on a pretrained model. Inits:

  key | value | mean (data-free)  W_S := W_K, W_V, or the mean of the merged projections (for q=k: W_K, -, mean of
      W_Q and W_K); pooled heads are averaged (the GQA paper's uptraining start); W_Q and W_O are kept.

  calibrated (data-aware), per layer, on calibration attention inputs h of the original model, float64:
   1. pool with alignment: each head merged into a new head is first mapped onto the group's first head by
      least squares (a RoPE-commuting map on rotary dims — one complex scale per frequency — and a full linear
      map elsewhere; values: a full linear map), then averaged;
   2. choose W_S from a small family of candidates, by the layer's own output error (step 4):
      k=v     keys K̃ whose least logit-important units (rotary pairs / other dims, importance E|q_u|²·E|k_u|²)
              are replaced by the top principal directions of the values Ṽ — fractions 0, 1/8, 1/4, 3/8, 1/2 of
              head_dim — so S carries the key directions that matter and as much value content as fits;
      q=k     S = √(ρ_Q ρ_K)·((1−λ)·K̃/ρ_K + λ·Q̄/ρ_Q), λ ∈ {0, ¼, ½, ¾, 1} (ρ: RMS of the projected heads, Q̄ the
              group-mean query), i.e. between the keys and the queries at the logit scale of the original;
      q=k=v   the q=k mix (λ ∈ {0, ½}) with value directions swapped in as for k=v;
   3. refit each query head (where W_Q survives and there is no QK-norm) so its logits stay close:
      k_orig ≈ k_new·T with T RoPE-commuting (absorb_query._rope_commuting_refit) ⇒ q' = q·Tᵀ, W_Q' = W_Q·Tᵀ;
   4. refit W_O (and b_O where the model has it) by ridge least squares so that the layer's attention output
      o_new·W_O' + b_O' matches the original's o·W_O + b_O on the calibration tokens; the candidate with the
      smallest relative error ‖Δy‖²/‖y‖² wins.
  Layers are fitted independently on the original model's inputs (no error propagation is modelled).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qkvconv.archs import ArchSpec, Dims
from qkvconv.archs.layout import Proj, qkv_keys, read_qkv
from qkvconv.errors import TransformError
from qkvconv.transforms.absorb_query import _rope_commuting_refit
from qkvconv.transforms.layer import LayerResult, layer_dtype

MODES = ("k=v", "q=k", "q=k=v")
INITS = ("key", "value", "mean", "calibrated")
REPLACE_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5)
QK_MIX = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class ShareResult:
    state_dict: dict[str, torch.Tensor]
    layers: list[dict]  # per-layer layout block for the loader (modeling_qkvconv)
    kv_heads: int
    fit: list[dict] = field(default_factory=list)  # calibrated: the chosen candidate and relative error per layer


@dataclass(frozen=True)
class Calibration:
    """What `--init calibrated` needs: attention inputs per layer (n_seqs·seq_len, d) and the RoPE table."""

    attn_inputs: list[torch.Tensor]
    seq_len: int
    cos: torch.Tensor | None  # (seq_len, rotary_dim), None without RoPE
    sin: torch.Tensor | None
    norm_eps: float = 1e-6


@dataclass
class _Layer:
    """One layer's attention weights in math convention (float64)."""

    q: Proj  # (d, H·dh)
    k: Proj  # (d, G·dh)
    v: Proj
    o: Proj  # (H·dh, d)
    q_norm: torch.Tensor | None  # (dh,)
    k_norm: torch.Tensor | None


def check_share_options(mode: str | None, kv_heads: int | None, init: str, dims: Dims, pos2d: int | None = None) -> int:
    """Validate the request; returns the number of key/value heads after the transform."""
    H, G = dims.num_attention_heads, dims.num_key_value_heads
    if pos2d is not None and mode not in ("q=k", "q=k=v"):
        raise TransformError("--pos2d is the asymmetric term of symmetric attention: it needs --mode q=k or q=k=v")
    if pos2d is not None and (pos2d < 4 or pos2d % 4):
        raise TransformError(f"--pos2d {pos2d}: the number of channels must be a positive multiple of 4 (e.g. 16)")
    if mode is not None and mode not in MODES:
        raise TransformError(f"unknown --mode {mode!r}; use one of {', '.join(MODES)}")
    if init not in INITS:
        raise TransformError(f"unknown --init {init!r}; use one of {', '.join(INITS)}")
    if mode is None and kv_heads is None:
        raise TransformError("nothing to do: give --mode k=v|q=k|q=k=v and/or --kv-heads N")
    if mode == "q=k" and init == "value":
        raise TransformError("--init value does not apply to --mode q=k (values stay separate); use key, mean or calibrated")
    N = G if kv_heads is None else kv_heads
    if N < 1 or H % N:
        raise TransformError(f"--kv-heads {N} must divide the {H} query heads (try one of "
                             f"{', '.join(str(n) for n in range(1, G + 1) if H % n == 0)})")
    if N > G:
        raise TransformError(f"--kv-heads {N} exceeds the model's {G} key/value heads; heads can only be pooled")
    return N


# ------------------------------------------------------------------------------------ layout helpers
def _o_key(spec: ArchSpec, i: int) -> str:
    return spec.layer(i, spec.o_proj)


def read_o(sd: dict, spec: ArchSpec, dims: Dims, i: int) -> Proj:
    """Layer i's output projection, W_O: (H·dh, d). GPT-2 Conv1D stores W itself, nn.Linear stores Wᵀ."""
    key = _o_key(spec, i)
    w, b = sd[f"{key}.weight"].double(), sd.get(f"{key}.bias")
    W = w if spec.qkv_layout == "fused_concat_conv1d" else w.T  # the Conv1D families store (d_in, d_out)
    if tuple(W.shape) != (dims.q_size, dims.hidden_size):
        raise ValueError(f"{key}: expected W_O of shape {(dims.q_size, dims.hidden_size)}, found {tuple(W.shape)}")
    return Proj(W.contiguous(), None if b is None else b.double())


def join_fused_qkv(q: Proj, k: Proj, v: Proj, layout: str, dims: Dims) -> Proj:
    """Inverse of layout.split_fused_qkv (all three with H heads): W (d, 3·H·dh).

    fused_concat_conv1d (GPT-2): [q | k | v];  fused_per_head (GPT-NeoX): per head [q_h k_h v_h], (H, 3, dh).
    """
    d, H, dh = dims.hidden_size, dims.num_attention_heads, dims.head_dim
    for p in (q, k, v):
        if tuple(p.W.shape) != (d, H * dh):
            raise ValueError(f"fused qkv needs {H} heads per projection, found W of shape {tuple(p.W.shape)}")
    has_b = q.b is not None
    if layout == "fused_concat_conv1d":
        return Proj(torch.cat([q.W, k.W, v.W], 1), torch.cat([q.b, k.b, v.b]) if has_b else None)
    W = torch.stack([p.W.reshape(d, H, dh) for p in (q, k, v)], 2).reshape(d, 3 * H * dh)
    b = torch.stack([p.b.reshape(H, dh) for p in (q, k, v)], 1).reshape(3 * H * dh) if has_b else None
    return Proj(W, b)


def _read_layer(sd: dict, spec: ArchSpec, dims: Dims, i: int) -> _Layer:
    q, k, v = read_qkv(sd, spec, dims, i)
    norms = [sd.get(f"{spec.layer(i, n)}.weight") for n in spec.qk_norm]
    qn, kn = (norms + [None, None])[:2]
    return _Layer(q, k, v, read_o(sd, spec, dims, i), None if qn is None else qn.double(),
                  None if kn is None else kn.double())


# ------------------------------------------------------------------------------------ head algebra
def _head(p: Proj, j: int, dh: int) -> Proj:
    cols = slice(j * dh, (j + 1) * dh)
    return Proj(p.W[:, cols], None if p.b is None else p.b[cols])


def _cat(heads: list[Proj]) -> Proj:
    return Proj(torch.cat([h.W for h in heads], 1), None if heads[0].b is None else torch.cat([h.b for h in heads]))


def _combine(terms: list[tuple[float, Proj]]) -> Proj:
    W = sum(c * p.W for c, p in terms)
    b = None if terms[0][1].b is None else sum(c * p.b for c, p in terms)
    return Proj(W, b)


def _times(p: Proj, T: torch.Tensor) -> Proj:  # (h·W + b)·T
    return Proj(p.W @ T, None if p.b is None else p.b @ T)


def _members(H: int, G: int, N: int, n: int) -> list[int]:
    """Original heads (of G) serving the query heads of new head n (of N), one entry per query head."""
    return [j // (H // G) for j in range(n * (H // N), (n + 1) * (H // N))]


def _pool(p: Proj, H: int, G: int, N: int, dh: int, align=None) -> Proj:
    """G heads → N heads by averaging the heads serving each new group (weighted by query heads served).
    align(member, reference) -> Proj maps a member head onto the reference's coordinates first."""
    out = []
    for n in range(N):
        members = [_head(p, g, dh) for g in _members(H, G, N, n)]
        if align is not None:
            members = [members[0]] + [align(m, members[0]) for m in members[1:]]
        out.append(_combine([(1 / len(members), m) for m in members]))
    return _cat(out)


# ------------------------------------------------------------------------------ calibration helpers
def _act(h: torch.Tensor, p: Proj) -> torch.Tensor:
    return h @ p.W + (p.b if p.b is not None else 0)


def _rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    if w is None:
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class _Calib:
    """Calibration activations of one layer, shaped for attention: (B, n, L, dh)."""

    def __init__(self, c: Calibration, i: int, dims: Dims):
        self.h = c.attn_inputs[i].double()
        self.L, self.dh, self.eps = c.seq_len, dims.head_dim, c.norm_eps
        self.B = self.h.shape[0] // self.L
        self.cos, self.sin = c.cos, c.sin
        self.rotary = dims.rotary_dim

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # (B·L, n·dh) -> (B, n, L, dh)
        return x.reshape(self.B, self.L, -1, self.dh).transpose(1, 2)

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        if self.cos is None or not self.rotary:
            return x
        r = self.cos.shape[-1]
        cos, sin = self.cos.double(), self.sin.double()
        xr = x[..., :r]
        rot = torch.cat([-xr[..., r // 2 :], xr[..., : r // 2]], -1)
        return torch.cat([xr * cos + rot * sin, x[..., r:]], -1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal softmax attention; q (B, H, L, dh), k/v (B, N, L, dh) -> head outputs (B·L, H·dh)."""
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        logits = q @ k.transpose(-1, -2) * scale
        mask = torch.ones(self.L, self.L, dtype=torch.bool).triu(1)
        probs = logits.masked_fill(mask, float("-inf")).softmax(-1)
        return (probs @ v).transpose(1, 2).reshape(self.B * self.L, -1)


def _fit_o(o_new: torch.Tensor, y: torch.Tensor, bias: bool) -> tuple[Proj, float]:
    """Ridge least squares o_new·W + b ≈ y; returns (W_O', b_O') and the relative error ‖Δy‖²/‖y‖²."""
    X = torch.cat([o_new, torch.ones(len(o_new), 1, dtype=o_new.dtype)], 1) if bias else o_new
    A = X.T @ X
    A = A + 1e-6 * A.diagonal().mean().clamp_min(1e-30) * torch.eye(len(A), dtype=A.dtype)  # (p, p)
    sol = torch.linalg.solve(A, X.T @ y)
    err = float((X @ sol - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))
    return (Proj(sol[:-1], sol[-1]) if bias else Proj(sol, None)), err


def _value_directions(c: _Calib, v: Proj) -> torch.Tensor:
    """(dh, dh) principal directions of one value head's calibration activations, strongest first."""
    x = _act(c.h, v)
    x = x - x.mean(0)
    _, vecs = torch.linalg.eigh(x.T @ x)
    return vecs.flip(1)


def _key_units(dh: int, rotary: int) -> list[list[int]]:
    """Units a key is edited in: rotary pairs (f, f + r/2) (RoPE mixes them) and single non-rotary dims."""
    half = rotary // 2
    return [[f, f + half] for f in range(half)] + [[u] for u in range(rotary, dh)]


def _swap_in_values(c: _Calib, base: Proj, v: Proj, q_rows: torch.Tensor, frac: float) -> Proj:
    """Replace the least logit-important units of `base` (one head, (d, dh)) with the top value directions."""
    dh = base.W.shape[1]
    if frac == 0:
        return base
    s, qq = _act(c.h, base), q_rows
    units = _key_units(dh, c.rotary)
    importance = torch.tensor([float(s[:, u].pow(2).mean(0).sum() * qq[:, u].pow(2).mean(0).sum()) for u in units])
    dims_out: list[int] = []
    for idx in importance.argsort().tolist():
        if len(dims_out) >= round(frac * dh):
            break
        dims_out += units[idx]
    E = _value_directions(c, v)[:, : len(dims_out)]  # (dh, m)
    vW, vb = v.W @ E, None if v.b is None else v.b @ E
    scale = _act(c.h, base).std().clamp_min(1e-12) / _act(c.h, Proj(vW, vb)).std().clamp_min(1e-12)
    W, b = base.W.clone(), None if base.b is None else base.b.clone()
    W[:, dims_out] = scale * vW
    if b is not None:
        b[dims_out] = scale * vb
    return Proj(W, b)


# ------------------------------------------------------------------------------------- one layer
def _data_free(L: _Layer, mode: str | None, init: str, H: int, G: int, N: int, dh: int) -> dict:
    K, V = _pool(L.k, H, G, N, dh), _pool(L.v, H, G, N, dh)
    Q = _pool(L.q, H, H, N, dh)  # group-mean query, for q=k
    out = {"q": L.q, "o": L.o}
    if mode is None:
        return out | {"k": K, "v": V}
    pick = {
        "k=v": {"key": [K], "value": [V], "mean": [K, V]},
        "q=k": {"key": [K], "mean": [Q, K]},
        "q=k=v": {"key": [K], "value": [V], "mean": [Q, K, V]},
    }[mode][init]
    S = _combine([(1 / len(pick), p) for p in pick])
    if mode == "k=v":
        return out | {"s": S}
    if mode == "q=k":
        return {"s": S, "v": V, "o": L.o}
    return {"s": S, "o": L.o}


def _calibrated(L: _Layer, mode: str | None, c: _Calib, dims: Dims, N: int,
                target: torch.Tensor | None = None) -> tuple[dict, dict]:
    H, G, dh, r = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim, dims.rotary_dim
    eps, scale = c.eps, dh**-0.5
    h = c.h

    def keys_of(p: Proj) -> torch.Tensor:  # pre-RoPE keys (B·L, n, dh)
        return _rms_norm(_act(h, p).reshape(len(h), -1, dh), L.k_norm, eps)

    def align_key(m: Proj, ref: Proj) -> Proj:
        return _times(m, _rope_commuting_refit(keys_of(m)[:, 0], keys_of(ref)[:, 0], r))

    def align_value(m: Proj, ref: Proj) -> Proj:
        return _times(m, torch.linalg.lstsq(_act(h, m), _act(h, ref)).solution)

    # the original layer's attention output y
    q0 = c.rope(c.heads(_rms_norm(_act(h, L.q).reshape(len(h), H, dh), L.q_norm, eps).reshape(len(h), -1)))
    k0 = c.rope(c.heads(keys_of(L.k).reshape(len(h), -1)))
    y = _act(c.attend(q0, k0, c.heads(_act(h, L.v)), scale), L.o) if target is None else target.double()  # (B·L, d)
    K = _pool(L.k, H, G, N, dh, align_key) if G > N else L.k
    V = _pool(L.v, H, G, N, dh, align_value) if G > N else L.v
    Qbar = _pool(L.q, H, H, N, dh)
    q_flat = _act(h, L.q)

    def group_q_rows(n: int) -> torch.Tensor:  # the query activations of the heads served by new head n
        return torch.cat([q_flat[:, j * dh : (j + 1) * dh] for j in range(n * (H // N), (n + 1) * (H // N))])

    def refit_queries(S_keys: Proj) -> Proj:
        """Per query head, W_Q·Tᵀ with k_orig ≈ k_new·T (RoPE-commuting); identity under QK-norm."""
        if L.q_norm is not None:
            return L.q
        old, new = keys_of(L.k), keys_of(S_keys)
        heads = []
        for j in range(H):
            T = _rope_commuting_refit(new[:, j // (H // N)], old[:, j // (H // G)], r)
            heads.append(_times(_head(L.q, j, dh), T.T))
        return _cat(heads)

    def evaluate(w: dict) -> tuple[dict, float]:
        S = w.get("s")
        kp = w.get("k", S)
        vp = w.get("v", S)
        if "q" in w:
            qa = _rms_norm(_act(h, w["q"]).reshape(len(h), H, dh), L.q_norm, eps)
        else:  # queries from S, expanded over the groups
            qa = _rms_norm(_act(h, S).reshape(len(h), N, dh), L.q_norm, eps).repeat_interleave(H // N, 1)
        qh = c.rope(c.heads(qa.reshape(len(h), -1)))
        kh = c.rope(c.heads(keys_of(kp).reshape(len(h), -1)))
        o_new = c.attend(qh, kh, c.heads(_act(h, vp)), scale)
        o, err = _fit_o(o_new, y, L.o.b is not None)
        return w | {"o": o}, err

    def mix(lam: float) -> Proj:  # q=k: between keys and group-mean queries at the original logit scale
        heads = []
        for n in range(N):
            kn, qn = _head(K, n, dh), _head(Qbar, n, dh)
            rk, rq = _act(h, kn).pow(2).mean().sqrt(), _act(h, qn).pow(2).mean().sqrt()
            g = (rk * rq).sqrt()
            heads.append(_combine([(float(g * (1 - lam) / rk), kn), (float(g * lam / rq), qn)]))
        return _cat(heads)

    def with_values(base: Proj, frac: float) -> Proj:
        return _cat([_swap_in_values(c, _head(base, n, dh), _head(V, n, dh), group_q_rows(n), frac) for n in range(N)])

    candidates: list[tuple[dict, dict]] = []
    if mode is None:
        candidates.append(({"q": refit_queries(K), "k": K, "v": V}, {}))
    elif mode == "k=v":
        for frac in REPLACE_FRACTIONS:
            S = with_values(K, frac)
            candidates.append(({"q": refit_queries(S), "s": S}, {"value_fraction": frac}))
    elif mode == "q=k":
        candidates += [({"s": mix(lam), "v": V}, {"query_weight": lam}) for lam in QK_MIX]
    else:
        for lam in (0.0, 0.5):
            for frac in REPLACE_FRACTIONS:
                candidates.append(({"s": with_values(mix(lam), frac)}, {"query_weight": lam, "value_fraction": frac}))
    best = None
    for w, info in candidates:
        fitted, err = evaluate(w)
        if best is None or err < best[2]:
            best = (fitted, info, err)
    fitted, info, err = best
    return fitted, info | {"relative_error": err}


# ------------------------------------------------------------------------------------ state dicts
def _attn_prefix(spec: ArchSpec, i: int) -> str:
    return spec.layer(i, spec.o_proj.rsplit(".", 1)[0])


def _put(out: dict, key: str, p: Proj, dtype: torch.dtype, conv1d: bool = False) -> None:
    out[f"{key}.weight"] = (p.W if conv1d else p.W.T).contiguous().to(dtype)  # Linear stores (d_out, d_in)
    if p.b is not None:
        out[f"{key}.bias"] = p.b.contiguous().to(dtype)


def _expand(p: Proj, N: int, H: int, dh: int) -> Proj:
    """N heads → H heads, head g repeated for its H/N query heads (the stock layout of pooled/shared heads)."""
    return _cat([_head(p, j // (H // N), dh) for j in range(H)])


def _write_stock(out: dict, w: dict, spec: ArchSpec, dims: Dims, i: int, N: int, stock_kv_heads: int, dtype) -> None:
    """The layer as the stock architecture's weights: shared tensors duplicated, pooled heads as num_key_value_heads
    (or repeated to every query head where the family has no such setting)."""
    H, dh = dims.num_attention_heads, dims.head_dim
    S = w.get("s")
    q = w["q"] if "q" in w else _expand(S, N, H, dh)
    k, v = w.get("k", S), w.get("v", S)
    if stock_kv_heads != N:
        k, v = _expand(k, N, H, dh), _expand(v, N, H, dh)
    if spec.qkv_layout == "separate":
        _put(out, spec.layer(i, spec.q_proj), q, dtype)
        _put(out, spec.layer(i, spec.k_proj), k, dtype)
        _put(out, spec.layer(i, spec.v_proj), v, dtype)
    else:
        conv1d = spec.qkv_layout == "fused_concat_conv1d"
        _put(out, spec.layer(i, spec.fused_qkv), join_fused_qkv(q, k, v, spec.qkv_layout, dims), dtype, conv1d)
    _put(out, _o_key(spec, i), w["o"], dtype, spec.qkv_layout == "fused_concat_conv1d")


def share_kv_layer(
    sd: dict[str, torch.Tensor], spec: ArchSpec, dims: Dims, i: int, *, mode: str | None, kv_heads: int | None = None,
    init: str = "key", calibration: Calibration | None = None, stock_kv_heads: int | None = None,
    pos2d: int | None = None,
) -> LayerResult:
    """Layer i of share-kv (the unit the streaming driver calls): `sd` holds at least layer i's tensors;
    `calibration` (init="calibrated") needs only layer i's attention inputs: attn_inputs may be a {i: (n, d)} dict."""
    N = check_share_options(mode, kv_heads, init, dims, pos2d)
    H, G, dh = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
    dtype = layer_dtype(sd, f"{spec.layers}.{i}.")
    L = _read_layer(sd, spec, dims, i)
    info: dict = {}
    if init == "calibrated":
        if calibration is None:
            raise TransformError("--init calibrated needs calibration attention inputs for every layer")
        w, info = _calibrated(L, mode, _Calib(calibration, i, dims), dims, N)
    else:
        w = _data_free(L, mode, init, H, G, N, dh)
    removed = qkv_keys(sd, spec, i) + [k for k in sd if k.startswith(_o_key(spec, i) + ".")]
    out: dict[str, torch.Tensor] = {}
    if stock_kv_heads is not None:
        _write_stock(out, w, spec, dims, i, N, stock_kv_heads, dtype)
        return LayerResult(out, removed, {"query": "projection", "attn_input": "norm"}, {"fit": info})
    attn = _attn_prefix(spec, i)
    for name, p in w.items():  # q, k, v, s, o -> q_proj, k_proj, v_proj, s_proj, o_proj
        _put(out, f"{attn}.{name}_proj", p, dtype)
    for norm, new in zip(spec.qk_norm, ("q_norm", "k_norm")):
        key = f"{spec.layer(i, norm)}.weight"
        if key in sd and f"{attn}.{new}.weight" != key:
            out[f"{attn}.{new}.weight"] = sd[key]
            removed.append(key)
    layer = {"query": "projection", "attn_input": "norm", "kv_heads": N}
    if mode in ("k=v", "q=k=v"):
        layer["kv"] = "shared"
    if mode in ("q=k", "q=k=v"):
        layer["qk"] = "shared"
    if pos2d is not None:  # zero-started: the converted model is unchanged by it until finetuned
        layer["pos2d"] = {"channels": pos2d}
        out[f"{attn}.pos2d.weight"] = torch.zeros(H, pos2d, dtype=dtype)
    return LayerResult(out, removed, layer, {"fit": info})


def share_kv(
    state_dict: dict[str, torch.Tensor],
    spec: ArchSpec,
    dims: Dims,
    *,
    mode: str | None,
    kv_heads: int | None = None,
    init: str = "key",
    calibration: Calibration | None = None,
    stock_kv_heads: int | None = None,
    pos2d: int | None = None,
) -> ShareResult:
    """Return a new state dict with shared projections / pooled heads; the input dict is not modified.

    stock_kv_heads: None writes the qkvconv layout (SharedProjectionAttention, a real shared cache); an int writes
    the stock architecture's weight names with that many key/value heads (N, or H where pooling is inexpressible).
    """
    N = check_share_options(mode, kv_heads, init, dims, pos2d)
    if pos2d is not None and stock_kv_heads is not None:
        raise TransformError("--pos2d has no stock equivalent; leave out --export stock")
    if init == "calibrated" and (calibration is None or len(calibration.attn_inputs) != dims.num_hidden_layers):
        raise TransformError("--init calibrated needs calibration attention inputs for every layer")
    out = dict(state_dict)
    layers, fit = [], []
    for i in range(dims.num_hidden_layers):
        res = share_kv_layer(state_dict, spec, dims, i, mode=mode, kv_heads=kv_heads, init=init,
                             calibration=calibration, stock_kv_heads=stock_kv_heads, pos2d=pos2d)
        res.apply(out)
        if stock_kv_heads is None:
            layers.append(res.entry)
        if init == "calibrated":
            fit.append(res.info["fit"])
    return ShareResult(out, layers, N, fit)


def kv_cache_ratio(mode: str | None, kv_heads: int, dims: Dims) -> float:
    """Cache bytes after / before: (1 tensor if K=V else 2) · N heads over 2 · G heads."""
    return (1 if mode in ("k=v", "q=k=v") else 2) * kv_heads / (2 * dims.num_key_value_heads)
