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

  calibrated (data-aware), per layer, on calibration attention inputs h of the original model:
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

Precision: activations and attention are computed in the calibration inputs' dtype (float32 from a float32 or bf16
model, the precision the inputs were captured in), once per candidate; the weights, the small per-head fits
(alignments, T, value directions) and every solve are float64, and the new weights are cast once at the end. Step 4
scores all candidates with float32 Gram matrices on at most SCORE_WINDOWS calibration windows, then refits the best
(and any near-tie) on every window with a float64 Gram: a float32 Gram's rounding (~1e-7·√n relative) can exceed the
ridge (1e-6), which the winner's W_O would feel, the ranking hardly. (SmolLM2 k=v, 16 of the 32 fit windows scored:
the same choice as full scoring in all 30 layers; with a 2 % margin, another value fraction in 2 layers.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Callable

import torch
import torch.nn.functional as F

from qkvconv.archs import ArchSpec, Dims
from qkvconv.archs.layout import Proj, qkv_keys, read_qkv
from qkvconv.errors import TransformError
from qkvconv.stream import trim_heap
from qkvconv.transforms.absorb_query import _rope_commuting_refit
from qkvconv.transforms.layer import LayerResult, column_signs, layer_dtype

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
    # the layer's attention, as its stock module computes it (None: 1/√d_h, no soft-capping, no window)
    scaling: float | None = None
    softcap: float | None = None  # logits → softcap·tanh(logits/softcap)
    sliding_window: int | None = None  # query i sees keys j with i − j < sliding_window
    norm_gain_offset: float = 0.0  # the QK norms scale by (offset + weight) (ArchSpec.norm_gain_offset)


@dataclass
class _Layer:
    """One layer's attention weights in math convention (float64); W_O is read on first use (the data-free inits
    pass it through, see _untouched)."""

    q: Proj  # (d, H·dh)
    k: Proj  # (d, G·dh)
    v: Proj
    read_o: Callable[[], Proj]
    q_norm: torch.Tensor | None  # (dh,)
    k_norm: torch.Tensor | None

    @cached_property
    def o(self) -> Proj:  # (H·dh, d)
        return self.read_o()

    def forget_o(self) -> None:
        """Drop W_O (read again on next use): a calibrated fit refits it, and needs the original only for y."""
        self.__dict__.pop("o", None)


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


def read_o(sd: dict, spec: ArchSpec, dims: Dims, i: int, kept: bool = True) -> Proj:
    """Layer i's output projection, W_O: (H·dh, d). GPT-2 Conv1D stores W itself, nn.Linear stores Wᵀ.
    kept=False: where `sd` is a streamed layer's Float64View, the float64 weight is not kept in it (fresh), so it is
    freed with the returned Proj."""
    key = _o_key(spec, i)
    read = sd.fresh if not kept and hasattr(sd, "fresh") else sd.__getitem__
    w, b = read(f"{key}.weight").double(), sd.get(f"{key}.bias")
    W = w if spec.qkv_layout == "fused_concat_conv1d" else w.T  # the Conv1D families store (d_in, d_out)
    if tuple(W.shape) != (dims.q_size, dims.hidden_size):
        raise ValueError(f"{key}: expected W_O of shape {(dims.q_size, dims.hidden_size)}, found {tuple(W.shape)}")
    # a view of the state dict's float64 weight: a contiguous copy was a second float64 W_O through the whole
    # transform (32 MiB at a 2048-wide layer)
    return Proj(W, None if b is None else b.double())


def join_fused_qkv(q: Proj, k: Proj, v: Proj, layout: str, dims: Dims) -> Proj:
    """Inverse of layout.split_fused_qkv: W (d, fused_qkv_size).

    fused_concat_conv1d (GPT-2): [q | k | v], H heads each;  fused_per_head (GPT-NeoX): per head [q_h k_h v_h],
    (H, 3, dh);  fused_concat_linear (Phi-3): [q (H·dh) | k (G·dh) | v (G·dh)], G = the written KV heads.
    """
    d, H, dh = dims.hidden_size, dims.num_attention_heads, dims.head_dim
    has_b = q.b is not None
    if layout == "fused_concat_linear":
        return Proj(torch.cat([q.W, k.W, v.W], 1), torch.cat([q.b, k.b, v.b]) if has_b else None)
    for p in (q, k, v):
        if tuple(p.W.shape) != (d, H * dh):
            raise ValueError(f"fused qkv needs {H} heads per projection, found W of shape {tuple(p.W.shape)}")
    if layout == "fused_concat_conv1d":
        return Proj(torch.cat([q.W, k.W, v.W], 1), torch.cat([q.b, k.b, v.b]) if has_b else None)
    W = torch.stack([p.W.reshape(d, H, dh) for p in (q, k, v)], 2).reshape(d, 3 * H * dh)
    b = torch.stack([p.b.reshape(H, dh) for p in (q, k, v)], 1).reshape(3 * H * dh) if has_b else None
    return Proj(W, b)


def _read_layer(sd: dict, spec: ArchSpec, dims: Dims, i: int) -> _Layer:
    q, k, v = read_qkv(sd, spec, dims, i)
    norms = [sd.get(f"{spec.layer(i, n)}.weight") for n in spec.qk_norm]
    qn, kn = (norms + [None, None])[:2]
    return _Layer(q, k, v, lambda: read_o(sd, spec, dims, i, kept=False), None if qn is None else qn.double(),
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
    align(member, reference) -> T (dh, dh), head indices of `p`: the member head is mapped onto the group's first
    head (the reference) as member·T first."""
    out = []
    for n in range(N):
        idx = _members(H, G, N, n)
        members = [_head(p, g, dh) for g in idx]
        if align is not None:
            members = [members[0]] + [_times(m, align(g, idx[0])) for m, g in zip(members[1:], idx[1:])]
        out.append(_combine([(1 / len(members), m) for m in members]))
    return _cat(out)


# ------------------------------------------------------------------------------ calibration helpers
def _act(h: torch.Tensor, p: Proj) -> torch.Tensor:  # h·W + b in h's dtype (W, b are float64 weights)
    return h @ p.W.to(h.dtype) + (p.b.to(h.dtype) if p.b is not None else 0)


def _rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float, gain_offset: float = 0.0) -> torch.Tensor:
    if w is None:
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (gain_offset + w).to(x.dtype)


class _Calib:
    """Calibration activations of one layer, shaped for attention: (C·B, n, L, dh) for C candidates at once."""

    def __init__(self, c: Calibration, i: int, dims: Dims):
        h = c.attn_inputs[i]
        self.dtype = torch.promote_types(h.dtype, torch.float32)  # the activations' dtype (module docstring)
        self.h = h  # as captured (a bf16 model's in bf16): act() casts ACT_ROWS rows at a time
        self.L, self.dh, self.eps, self.gain_offset = c.seq_len, dims.head_dim, c.norm_eps, c.norm_gain_offset
        self.scale = c.scaling if c.scaling is not None else dims.head_dim**-0.5
        self.softcap, self.window = c.softcap, c.sliding_window
        self.B = self.h.shape[0] // self.L
        self.cos = None if c.cos is None else c.cos.to(self.dtype)
        self.sin = None if c.sin is None else c.sin.to(self.dtype)
        self.rotary = dims.rotary_dim

    def act(self, p: Proj, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """h[rows]·W + b in the activations' dtype. Inputs held in a half dtype are cast ACT_ROWS rows at a time into
        the product's output, so no float32 copy of them is made (67 MB at a 2048-wide layer on 32 × 256 fitting
        tokens): the same products, summed in float32 in whatever order the BLAS picks for the chunk's size."""
        h = self.h[rows]
        if h.dtype == self.dtype:
            return _act(h, p)
        W = p.W.to(self.dtype)
        out = torch.empty(len(h), W.shape[1], dtype=self.dtype, device=h.device)
        for a in range(0, len(h), ACT_ROWS):
            torch.matmul(h[a : a + ACT_ROWS].to(self.dtype), W, out=out[a : a + ACT_ROWS])
        if p.b is not None:
            out += p.b.to(self.dtype)
        return out

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # (C, B·L, n·dh) or (B·L, n·dh) -> (C·B, n, L, dh)
        return x.reshape(-1, self.L, x.shape[-1] // self.dh, self.dh).transpose(1, 2)

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        if self.cos is None or not self.rotary:
            return x
        r, f = self.cos.shape[-1], self.cos.shape[-1] // 2
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)  # (L, r)
        out = x.clone() if r < x.shape[-1] else torch.empty_like(x)  # dims past r pass through
        # HF rotate_half pairs (u, u + r/2): (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin), written in place
        x1, x2, o1, o2 = x[..., :f], x[..., f:r], out[..., :f], out[..., f:r]
        torch.mul(x1, cos[:, :f], out=o1).addcmul_(x2, sin[:, :f], value=-1)
        torch.mul(x2, cos[:, f:], out=o2).addcmul_(x1, sin[:, f:])
        return out

    def window_rows(self, windows: list[int]) -> torch.Tensor | slice:
        """The token rows of these calibration windows: a slice (a view) where they are consecutive."""
        if windows == list(range(windows[0], windows[-1] + 1)):
            return slice(windows[0] * self.L, (windows[-1] + 1) * self.L)
        return (torch.tensor(windows)[:, None] * self.L + torch.arange(self.L)).reshape(-1)

    def chunks(self, windows: list[int], per: int) -> list[torch.Tensor | slice]:
        """The token rows of `windows`, `per` windows at a time (window_rows)."""
        return [self.window_rows(windows[a : a + per]) for a in range(0, len(windows), per)]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal softmax attention; q (C·B, Hq, L, dh), k/v (C·B, N, L, dh) -> head outputs (C·B, L, Hq·dh)."""
        rep = q.shape[1] // k.shape[1]
        if self.softcap is None and self.window is None:  # softmax(q·kᵀ·scale + causal)·v, query heads grouped
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=rep > 1)
        else:
            if rep > 1:
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            logits = q @ k.transpose(-1, -2) * scale
            if self.softcap is not None:
                logits = self.softcap * torch.tanh(logits / self.softcap)
            i = torch.arange(self.L)
            seen = (i[None] <= i[:, None]) & (i[:, None] - i[None] < (self.window or self.L + 1))  # (L, L) query, key
            o = logits.masked_fill(~seen, float("-inf")).softmax(-1) @ v
        return o.transpose(1, 2).reshape(q.shape[0], self.L, q.shape[1] * self.dh)


@dataclass
class _Candidate:
    """One choice of projections (W_O still to be refit) and what attention reads from it on the calibration tokens,
    before RoPE, in the activations' dtype: q (n, Hq, dh) after q_norm (Hq = H, or N where queries come from S: one
    per group); k, v (n, N, dh), k after k_norm. The original queries are not stored: where a candidate keeps them,
    `q` is a function of the token rows that computes them (shared by the candidates, computed once per chunk of
    rows, see _head_outputs), and `q_map` the per-head maps T of refitted queries, applied to the rows in use."""

    w: dict  # name -> Proj, or a function returning it (built only if the candidate wins)
    info: dict
    q: torch.Tensor | Callable[[torch.Tensor | slice], torch.Tensor]
    k: torch.Tensor
    v: torch.Tensor
    q_map: torch.Tensor | None = None  # (Hq, dh, dh): the queries are q·Tᵀ per head

    def at(self, rows: torch.Tensor | slice, made: dict | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v on these token rows; `made` keeps computed queries for the other candidates on the same rows."""
        made = {} if made is None else made
        if callable(self.q):
            q = made[self.q] = made[self.q] if self.q in made else self.q(rows)
        else:
            q = self.q[rows]
        if self.q_map is not None:
            q = torch.einsum("nhd,hed->nhe", q, self.q_map.to(q.dtype))
        return q, self.k[rows], self.v[rows]


def _head_outputs(c: _Calib, cands: list[_Candidate], H: int, dtype: torch.dtype,
                  rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """Attention outputs of all candidates on these token rows (whole windows) in one batched causal attention in
    `dtype`: (C, rows, H·dh)."""
    made: dict = {}
    qkv = [cd.at(rows, made) for cd in cands]
    del made
    n = len(qkv[0][0])

    def stack(j: int) -> torch.Tensor:
        return c.heads(torch.stack([x[j].reshape(n, -1) for x in qkv]).to(dtype))

    q, k = c.rope(stack(0)), c.rope(stack(1))
    o = c.attend(q, k, stack(2), c.scale).reshape(len(cands), n, -1)  # (C, n, Hq·dh)
    Hq = o.shape[-1] // c.dh
    if Hq < H:  # queries shared from S: the H/Hq query heads of a group see the same logits and values
        o = o.reshape(len(cands), -1, Hq, 1, c.dh).expand(-1, -1, -1, H // Hq, -1).reshape(len(cands), -1, H * c.dh)
    return o


GRAM_BLOCKS = 3  # XᵀX from its upper block triangle: 2/3 of a full batched matmul's products (see _Normal.add)


def _gram_edges(p: int) -> list[tuple[int, int]]:
    edges = [round(i * p / GRAM_BLOCKS) for i in range(GRAM_BLOCKS + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b (batched): summed by the GEMM itself where the dtypes match (baddbmm_, no product beside out),
    else the product in a's dtype (float32 scoring) added into out (float64 equations)."""
    if a.dtype == out.dtype:
        out.baddbmm_(a, b)
    else:
        out += a @ b


@dataclass
class _Normal:
    """The normal equations of X_c·W + b ≈ y for C candidates, summed in float64 over chunks of rows: XᵀX (C, p, p),
    Xᵀy (C, p, d), Xᵀ1 (C, p), the row count, ‖y‖² and 1ᵀy (d,). With a bias, XᵀX and Xᵀy are allocated one row
    (and column) larger from the start, and solve() writes the column of ones' border (Xᵀ1, n, 1ᵀy) into it: the
    bordered system is the same, without a (C, p+1, p+1) and a (C, p+1, d) copy beside the equations (64 MiB at a
    2048-wide layer)."""

    A: torch.Tensor
    b: torch.Tensor
    s: torch.Tensor
    n: int
    yy: torch.Tensor
    y1: torch.Tensor
    p: int

    @classmethod
    def zeros(cls, C: int, p: int, d: int, bias: bool = False) -> "_Normal":
        z, e = dict(dtype=torch.float64), int(bias)
        return cls(torch.zeros(C, p + e, p + e, **z), torch.zeros(C, p + e, d, **z), torch.zeros(C, p, **z), 0,
                   torch.zeros((), **z), torch.zeros(d, **z), p)

    def add(self, X: torch.Tensor, y: torch.Tensor) -> "_Normal":
        """Add rows X (C, n, p), y (n, d): the products in X's dtype (float32 only to score candidates), summed in
        place. XᵀX gets only its upper block triangle (column blocks i ≤ j; solve mirrors it): the Gram's cost
        dominates the fit. Float64 products are accumulated by the GEMM itself (baddbmm_ into the equations): a
        product formed and then added was a (p, d) float64 temporary at the fit's peak (32 MiB at a 2048-wide layer;
        the add's peak 67 -> 31 MiB above its inputs there, and 20 % faster)."""
        p = self.p
        ys = y.to(X.dtype).expand(len(X), -1, -1)
        for a, b in _gram_edges(p):
            _add_product(self.A[:, a:b, a:p], X[:, :, a:b].transpose(1, 2), X[:, :, a:])
        _add_product(self.b[:, :p], X.transpose(1, 2), ys)
        del ys
        self.s += X.sum(1)
        self.n += X.shape[1]
        y64 = y.to(torch.float64, copy=True)  # a copy even of a float64 y (a view of the target), squared in place
        # below: y.double() returned y itself there, and a float64 model's later fits saw the squared target
        self.y1 += y64.sum(0)
        self.yy += y64.pow_(2).sum()
        return self

    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ridge solutions (C, p(+1 with a bias), d) and relative errors ‖Δy‖²/‖y‖² (C,), the latter from the normal
        equations: ‖X·W − y‖² = ‖y‖² − 2⟨W, Xᵀy⟩ + ⟨W, XᵀX·W⟩, and XᵀX·W = Xᵀy − ridge·W at the ridge solution.
        With a bias where the equations were allocated with its border (zeros). The Gram's memory is reused for the
        regularised system (the equations are spent), and freed once factored."""
        A, b, p = self.A, self.b, self.p
        bias = A.shape[-1] > p
        for a, e in _gram_edges(p)[:-1]:  # the lower block triangle from the upper (no overlap)
            A[:, e:p, a:e] = A[:, a:e, e:p].transpose(1, 2)
        if bias:  # the border of a column of ones: Xᵀ1, 1ᵀ1 = n, and 1ᵀy
            A[:, :p, p] = self.s
            A[:, p, :p] = self.s
            A[:, p, p] = float(self.n)
            b[:, p] = self.y1
        self.A = self.b = None  # their memory now belongs to A and b alone
        ridge = 1e-6 * A.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)  # (C,)
        A.diagonal(dim1=1, dim2=2).add_(ridge[:, None])  # positive definite: Cholesky (LU if rounding broke it)
        chol, info = torch.linalg.cholesky_ex(A)
        if not info.any():
            del A  # only the LU fallback needs it
            sol = torch.cholesky_solve(b, chol)
        else:
            sol = torch.linalg.solve(A, b)
            del A
        del chol
        fit, norm = (torch.einsum("cpd,cpd->c", sol, x) for x in (b, sol))  # ⟨W, Xᵀy⟩, ‖W‖²: no (C, p, d) temporary
        err = (self.yy - fit - ridge * norm) / self.yy.clamp_min(1e-30)
        return sol, err


def _fit_o(X: torch.Tensor, y: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares X_c·W + b ≈ y for each of C candidates at once; X (C, n, p), y (n, d). Returns the
    solutions (C, p+1 with bias, d) and the relative errors ‖Δy‖²/‖y‖² (C,): see _Normal."""
    return _Normal.zeros(X.shape[0], X.shape[-1], y.shape[-1], bias).add(X, y).solve()


ACT_ROWS = 1024  # calibration rows cast and projected at a time (_Calib.act)
SCORE_TIE = 1e-3  # candidates scored (float32) within this relative margin (+ score_rounding) of the best: float64
SCORE_WINDOWS = 16  # candidates are scored on at most this many calibration windows (every k-th), see _choose
SCORE_TIE_SAMPLED = 0.03  # ... and those within this relative margin of the best are refit on all windows,
REFIT_MAX = 2  # the best REFIT_MAX of them by their score (see _choose)
SCORE_BATCH_BYTES = 256 << 20  # a fit's working memory: candidates × (normal equations + a chunk of windows' outputs)
WIDE_CHUNK_BYTES = 32 << 20  # a wide layer's chunk of windows is at most this (_batches)


def _batches(C: int, L: int, p: int, d: int, itemsize: int) -> tuple[int, int]:
    """How many candidates to fit at once, and over how many calibration windows at a time, within SCORE_BATCH_BYTES.
    Each candidate holds float64 normal equations XᵀX (p, p) and Xᵀy (p, d), about as much again while solving,
    and a chunk's products (a third of XᵀX and Xᵀy) in the Gram's dtype; each window of its attention outputs (L, p)
    is held three times in float32 (stacked queries, rotated, attended) and once in the Gram's dtype.
    SmolLM2 (p = d = 576): all 5 k=v candidates at once, 13–17 windows at a time (float64 / float32 Grams); a
    2048-wide layer: one candidate (five at once over every window held 3 GB beside a 92 MB layer), 3–4 windows at a
    time (WIDE_CHUNK_BYTES: with the budget's 8–13, a float64 chunk's X, y and XᵀX temporaries set the peak of the
    4 GiB benchmark's calibrated share-kv, 1.22–1.36 GiB of RssAnon in every layer)."""
    eq = 8 * p * (2 * p + 2 * d) + itemsize * p * (p // GRAM_BLOCKS + d)
    window = (3 * 4 + itemsize) * L * p
    step = max(1, min(C, SCORE_BATCH_BYTES // (eq + window)))
    per = max(1, (SCORE_BATCH_BYTES - step * eq) // (step * window))
    if 2 * eq > SCORE_BATCH_BYTES:  # a wide layer (one candidate's equations take most of the budget): the chunk's
        per = min(per, max(1, WIDE_CHUNK_BYTES // window))  # temporaries bound the peak, so they are kept small
    return step, per


def _fit_windows(c: _Calib, cands: list[_Candidate], y: torch.Tensor, H: int, dtype: torch.dtype,
                 windows: list[int], bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """W_O fits (_fit_o) of these candidates on these calibration windows, with Grams in `dtype`: the attention
    outputs are formed and their normal equations summed a chunk of windows at a time (_batches)."""
    _, per = _batches(len(cands), c.L, H * c.dh, y.shape[-1], torch.finfo(dtype).bits // 8)
    eq = _Normal.zeros(len(cands), H * c.dh, y.shape[-1], bias)
    for rows in c.chunks(windows, per):
        eq.add(_head_outputs(c, cands, H, c.dtype, rows).to(dtype), y[rows])
    trim_heap()  # the chunks' outputs are spent; the solve needs about as much again as the equations
    return eq.solve()


def score_rounding(rows: int) -> float:
    """How far apart two float32 scores (relative errors from Grams summed over `rows` rows) must be to be ranked
    without a float64 refit: a score ‖y‖² − ⟨W, Xᵀy⟩ − … cancels, so its rounding relative to ‖y‖² is up to
    rows·ε₃₂, the bound of a sum taken one row after another, as a GPU GEMM may do (2.4e-4 at 16 windows of 256
    tokens). It matters only where fits are close to exact: SmolLM2's layers (relative errors 6e-4 to 0.19) choose
    as before. Measured on an H200 with 1e-6 in its place: on a random-weight SmolLM2-shaped model (errors ~1e-4)
    cpu and cuda chose different candidates in 20 of 30 layers, cuda's float64 error up to 2.4× cpu's, and cpu's
    float32 ranking had missed the float64 best in 6 (13-19 % higher error there)."""
    return rows * torch.finfo(torch.float32).eps


def _choose(c: _Calib, cands: list[_Candidate], y: torch.Tensor, H: int, bias: bool) -> tuple[dict, dict]:
    """The candidate whose refit W_O leaves the smallest relative error, with that W_O (step 4).

    The candidates are scored with float32 Grams on at most SCORE_WINDOWS of the calibration windows, every k-th;
    the best — and any within SCORE_TIE_SAMPLED of it (SCORE_TIE when every window was scored, where only float32
    rounding could decide), plus the scores' rounding bound (score_rounding) — are refit on every window with
    float64 Grams, which pick the winner and give its W_O: at most REFIT_MAX of them, the best scored. On SmolLM2 (k=v)
    the float64 winner was the best scored in 25 of 30 layers and the second in the other 5, so two refits chose as
    up to five did; on a random-weight 2048-wide layer every candidate scored within SCORE_TIE_SAMPLED of the best,
    and each float64 refit took 3.8 s of the layer's 30 s (the 4 GiB benchmark's share-kv --kv-heads 1). Where the
    scored rows do not outnumber the weights, no candidate is ranked in float32: all are refit.
    At 40×256 calibration tokens the candidates are scored on half the fitting tokens; the winner's W_O still sees
    every token. Both passes go a batch of candidates and a chunk of windows at a time (_batches), so their memory
    is bounded by SCORE_BATCH_BYTES, not by the number of calibration tokens."""
    keep, p, d = list(range(len(cands))), H * c.dh, y.shape[-1]
    every = list(range(c.B))
    k = -(-c.B // SCORE_WINDOWS)
    scored = every[::k]
    # no float32 ranking where the scored rows do not outnumber the weights: the Gram is singular but for the ridge,
    # and its float32 scores are noise (the tiny test models' moved by 4e-5 between a batched and a one-candidate GEMM)
    if len(cands) > 1 and c.dtype != torch.float64 and len(scored) * c.L > p:
        step, _ = _batches(len(cands), c.L, p, d, 4)
        score = torch.cat([_fit_windows(c, cands[a : a + step], y, H, c.dtype, scored, bias)[1]
                           for a in range(0, len(cands), step)])
        best = float(score.min())  # near 0 float32 scores can even come out < 0
        margin = (SCORE_TIE if k == 1 else SCORE_TIE_SAMPLED) * abs(best) + score_rounding(len(scored) * c.L)
        close = score <= best + margin
        if close.any():  # else keep them all: a score is not finite
            best_scored = sorted((j for j in keep if close[j]), key=lambda j: float(score[j]))[:REFIT_MAX]
            keep = sorted(best_scored)  # in candidate order: a float64 tie goes to the earlier candidate, as before
    step, _ = _batches(len(keep), c.L, p, d, 8)
    rank, best_err, best, s = float("inf"), float("nan"), keep[0], None  # rank: the error with NaN as +inf
    for a in range(0, len(keep), step):  # the float64 refit
        idx = keep[a : a + step]
        sol, err = _fit_windows(c, [cands[j] for j in idx], y, H, torch.float64, every, bias)
        finite = torch.nan_to_num(err, nan=float("inf"))
        j = int(finite.argmin())
        if s is None or float(finite[j]) < rank:
            rank, best_err, best, s = float(finite[j]), float(err[j]), idx[j], sol[j]
        del sol
    o = Proj(s[:-1], s[-1]) if bias else Proj(s, None)
    chosen = cands[best]
    w = {name: p() if callable(p) else p for name, p in chosen.w.items()}  # deferred weights (W_Q') now
    return w | {"o": o}, chosen.info | {"relative_error": best_err}


def _value_directions(x: torch.Tensor) -> torch.Tensor:
    """(dh, dh) principal directions of one value head's calibration activations x (n, dh), strongest first."""
    x = x.double()
    x = x - x.mean(0)
    _, vecs = torch.linalg.eigh(x.T @ x)
    vecs = vecs.flip(1)
    return vecs * column_signs(vecs)  # one sign on every device (see column_signs)


def _key_units(dh: int, rotary: int) -> list[list[int]]:
    """Units a key is edited in: rotary pairs (f, f + r/2) (RoPE mixes them) and single non-rotary dims."""
    half = rotary // 2
    return [[f, f + half] for f in range(half)] + [[u] for u in range(rotary, dh)]


def _swap_in_values(base: Proj, s: torch.Tensor, v: Proj, vx: torch.Tensor, E: torch.Tensor, q2: torch.Tensor,
                    frac: float, rotary: int) -> tuple[Proj, torch.Tensor]:
    """Replace the least logit-important units of `base` (one head, (d, dh)) with the top value directions E of `v`.

    s = h·base, vx = h·v (n, dh): calibration activations; q2 (dh,): E q_u² over the query heads the head serves.
    Returns the new head and its activations (n, dh)."""
    dh = base.W.shape[1]
    if frac == 0:
        return base, s
    units = _key_units(dh, rotary)
    s2 = s.pow(2).mean(0)  # (dh,) E s_u²
    importance = torch.tensor([float(s2[u].sum() * q2[u].sum()) for u in units])  # E|q_u|²·E|k_u|² per unit
    dims_out: list[int] = []
    for idx in importance.argsort().tolist():
        if len(dims_out) >= round(frac * dh):
            break
        dims_out += units[idx]
    Em = E[:, : len(dims_out)]  # (dh, m)
    vW, vb, vxm = v.W @ Em, None if v.b is None else v.b @ Em, vx @ Em.to(vx.dtype)  # vxm = h·vW + vb
    scale = float(s.std().clamp_min(1e-12) / vxm.std().clamp_min(1e-12))
    W, b, x = base.W.clone(), None if base.b is None else base.b.clone(), s.clone()
    W[:, dims_out] = scale * vW
    x[:, dims_out] = scale * vxm
    if b is not None:
        b[dims_out] = scale * vb
    return Proj(W, b), x


# ------------------------------------------------------------------------------------- one layer
def _data_free(L: _Layer, mode: str | None, init: str, H: int, G: int, N: int, dh: int) -> dict:
    K, V = _pool(L.k, H, G, N, dh), _pool(L.v, H, G, N, dh)
    out = {"q": L.q}  # W_O unchanged (share_kv_layer passes it through or writes L.o)
    if mode is None:
        return out | {"k": K, "v": V}
    Q = _pool(L.q, H, H, N, dh) if mode != "k=v" else None  # group-mean query, for q=k
    pick = {
        "k=v": {"key": [K], "value": [V], "mean": [K, V]},
        "q=k": {"key": [K], "mean": [Q, K]},
        "q=k=v": {"key": [K], "value": [V], "mean": [Q, K, V]},
    }[mode][init]
    S = _combine([(1 / len(pick), p) for p in pick])
    if mode == "k=v":
        return out | {"s": S}
    if mode == "q=k":
        return {"s": S, "v": V}
    return {"s": S}


def _calibrated(L: _Layer, mode: str | None, c: _Calib, dims: Dims, N: int,
                target: torch.Tensor | None = None) -> tuple[dict, dict]:
    cands, y = _candidates(L, mode, c, dims, N, target)
    bias = L.o.b is not None
    L.forget_o()  # W_O is refit: the original's float64 copy (32 MiB at a 2048-wide layer) is spent once y is made
    trim_heap()
    return _choose(c, cands, y, dims.num_attention_heads, bias)


def _candidates(L: _Layer, mode: str | None, c: _Calib, dims: Dims, N: int,
                target: torch.Tensor | None = None) -> tuple[list[_Candidate], torch.Tensor]:
    """Steps 1–3 for every candidate of the family, and the original layer's attention output y (n, d)."""
    H, G, dh, r = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim, dims.rotary_dim
    n = len(c.h)

    def split(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:  # (k, m·dh) -> (k, m, dh), normed by w
        return _rms_norm(x.reshape(len(x), -1, dh), w, c.eps, c.gain_offset)

    def cols(x: torch.Tensor, g: int) -> torch.Tensor:  # head g of (n, m·dh)
        return x[:, g * dh : (g + 1) * dh]

    # the original layer's keys and values (each computed once), its attention output y; its queries (n, H·dh, as
    # wide as y) are computed where they are used, a chunk of rows at a time: stored, they would be a third of the fit's
    # activations (67 MB at a 2048-wide layer on 32 × 256 fitting tokens)
    k_act, v_act = c.act(L.k), c.act(L.v)  # (n, G·dh)
    k_old = split(k_act, L.k_norm)  # (n, G, dh) keys before RoPE

    def q_old(rows: torch.Tensor | slice) -> torch.Tensor:  # (rows, H, dh) after q_norm
        return split(c.act(L.q, rows), L.q_norm)

    @cache
    def align_key(g: int, ref: int) -> torch.Tensor:
        return _rope_commuting_refit(k_old[:, g].double(), k_old[:, ref].double(), r)

    @cache
    def align_value(g: int, ref: int) -> torch.Tensor:
        return torch.linalg.lstsq(cols(v_act, g).double(), cols(v_act, ref).double()).solution

    K = _pool(L.k, H, G, N, dh, align_key) if G > N else L.k
    V = _pool(L.v, H, G, N, dh, align_value) if G > N else L.v
    K_act = c.act(K) if G > N else k_act  # (n, N·dh)
    V_act = c.act(V) if G > N else v_act

    def refit_queries(s_keys: torch.Tensor) -> tuple[Callable[[], Proj], torch.Tensor | None]:
        """Per query head, W_Q·Tᵀ with k_orig ≈ k_new·T (RoPE-commuting); identity under QK-norm.
        s_keys (n, N, dh): the new keys before RoPE. Returns W_Q' (deferred) and the maps T (H, dh, dh) that give
        its queries from the original ones, q' = q·Tᵀ per head (None: the same queries)."""
        if L.q_norm is not None:
            return lambda: L.q, None
        T = {pair: _rope_commuting_refit(s_keys[:, pair[0]].double(), k_old[:, pair[1]].double(), r)
             for pair in {(j // (H // N), j // (H // G)) for j in range(H)}}
        Tj = torch.stack([T[j // (H // N), j // (H // G)] for j in range(H)])  # (H, dh, dh)

        def weights() -> Proj:  # built for the chosen candidate only
            return _cat([_times(_head(L.q, j, dh), Tj[j].T) for j in range(H)])

        return weights, Tj

    # one pass over the original queries, a chunk of windows at a time (_batches): the original attention output y
    # (n, d) unless a target is given, E q_u² over each group's query heads (N, dh) summed in float64 (k=v, q=k=v), and
    # each group's mean query (n, N·dh) = h·Q̄ + b̄ (q=k, q=k=v)
    q2 = torch.zeros(N, dh, dtype=torch.float64, device=c.h.device) if mode in ("k=v", "q=k=v") else None
    Qbar_act = torch.empty(n, N * dh, dtype=c.dtype, device=c.h.device) if mode in ("q=k", "q=k=v") else None
    # y is held in the captured dtype: a bf16 model's o_proj returns bf16 (33.5 MB less than float32 at 2048 wide)
    y = torch.empty(n, dims.hidden_size, dtype=c.h.dtype, device=c.h.device) if target is None else target.to(c.h.dtype)
    per = _batches(1, c.L, H * dh, dims.hidden_size, 4)[1]
    for rows in c.chunks(list(range(c.B)), per) if target is None or q2 is not None or Qbar_act is not None else ():
        q = c.act(L.q, rows)  # (rows, H·dh)
        grouped = q.reshape(len(q), N, H // N, dh)
        for a in range(0, len(q), ACT_ROWS) if q2 is not None else ():  # in float64, ACT_ROWS rows at a time (a
            q2 += grouped[a : a + ACT_ROWS].double().pow_(2).sum((0, 2))  # reduction over 8k rows at once: 2.4× slower)
        if Qbar_act is not None:
            Qbar_act[rows] = grouped.mean(2).flatten(1)
        if target is None:
            o = c.attend(c.rope(c.heads(split(q, L.q_norm).flatten(1))), c.rope(c.heads(k_old[rows].flatten(1))),
                         c.heads(v_act[rows]), c.scale).flatten(0, 1)
            y[rows] = _act(o, L.o)
        del q, grouped
    if q2 is not None:
        q2 /= n * (H // N)

    def mix(lam: float) -> tuple[Proj, torch.Tensor]:  # q=k: between keys and group-mean queries at the logit scale
        Qbar = _pool(L.q, H, H, N, dh)
        heads, acts = [], []
        for g in range(N):
            ka, qa = cols(K_act, g), cols(Qbar_act, g)
            rk, rq = ka.pow(2).mean().sqrt(), qa.pow(2).mean().sqrt()
            s = (rk * rq).sqrt()
            a, b = float(s * (1 - lam) / rk), float(s * lam / rq)
            heads.append(_combine([(a, _head(K, g, dh)), (b, _head(Qbar, g, dh))]))
            acts.append(a * ka + b * qa)
        return _cat(heads), torch.cat(acts, 1)

    E = [_value_directions(cols(V_act, g)) for g in range(N)] if mode in ("k=v", "q=k=v") else []

    def with_values(base: Proj, base_act: torch.Tensor, frac: float) -> tuple[Proj, torch.Tensor]:
        heads = [_swap_in_values(_head(base, g, dh), cols(base_act, g), _head(V, g, dh), cols(V_act, g), E[g], q2[g],
                                 frac, r) for g in range(N)]
        return _cat([p for p, _ in heads]), torch.cat([x for _, x in heads], 1)

    cands: list[_Candidate] = []
    if mode is None:
        Q, T = refit_queries(split(K_act, L.k_norm))
        cands.append(_Candidate({"q": Q, "k": K, "v": V}, {}, q_old, split(K_act, L.k_norm), split(V_act), T))
    elif mode == "k=v":
        for frac in REPLACE_FRACTIONS:
            S, S_act = with_values(K, K_act, frac)
            Q, T = refit_queries(split(S_act, L.k_norm))
            cands.append(_Candidate({"q": Q, "s": S}, {"value_fraction": frac}, q_old, split(S_act, L.k_norm),
                                    split(S_act), T))
    elif mode == "q=k":
        for lam in QK_MIX:
            S, S_act = mix(lam)
            cands.append(_Candidate({"s": S, "v": V}, {"query_weight": lam}, split(S_act, L.q_norm),
                                    split(S_act, L.k_norm), split(V_act)))
    else:
        for lam in (0.0, 0.5):
            base, base_act = mix(lam)
            for frac in REPLACE_FRACTIONS:
                S, S_act = with_values(base, base_act, frac)
                cands.append(_Candidate({"s": S}, {"query_weight": lam, "value_fraction": frac},
                                        split(S_act, L.q_norm), split(S_act, L.k_norm), split(S_act)))
    trim_heap()  # the projections' and the original attention's temporaries are spent
    return cands, y


# ------------------------------------------------------------------------------------ state dicts
def _attn_prefix(spec: ArchSpec, i: int) -> str:
    return spec.layer(i, spec.o_proj.rsplit(".", 1)[0])


def _put(out: dict, key: str, p: Proj, dtype: torch.dtype, conv1d: bool = False) -> None:
    out[f"{key}.weight"] = (p.W if conv1d else p.W.T).contiguous().to(dtype)  # Linear stores (d_out, d_in)
    if p.b is not None:
        out[f"{key}.bias"] = p.b.contiguous().to(dtype)


def move_qk_norms(sd: dict, spec: ArchSpec, i: int, attn: str, out: dict, removed: list[str]) -> None:
    """Layer i's QK norms (every tensor: weight, bias, per-head) under the converted attention module `attn` as
    q_norm / k_norm; the keys they leave are appended to `removed`."""
    for norm, new in zip(spec.qk_norm, ("q_norm", "k_norm")):
        prefix = f"{spec.layer(i, norm)}."
        for key in [k for k in sd if k.startswith(prefix)]:
            moved = f"{attn}.{new}.{key.removeprefix(prefix)}"
            if moved != key:
                out[moved] = sd[key]
                removed.append(key)


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


def _untouched(w: dict, L: _Layer, spec: ArchSpec, i: int, attn: str) -> set[str]:
    """The modules of layer i that keep their tensors and their names: W_Q where the transform returns it as read,
    W_O where it returns none (the data-free inits). The checkpoint's own tensors pass through, bit for bit, instead
    of a float64 round trip and a transposed copy (~5 s of a 4 GiB LLaMA's ~34 s data-free share-kv)."""
    if spec.qkv_layout != "separate":  # the query is part of a fused tensor that is rewritten
        return set()
    source = {"q": spec.layer(i, spec.q_proj), "o": _o_key(spec, i)}
    same = {"q": w.get("q") is L.q, "o": "o" not in w}
    return {key for name, key in source.items() if same[name] and key == f"{attn}.{name}_proj"}


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
    has_qk_norm = any(k.startswith(tuple(f"{spec.layer(i, n)}." for n in spec.qk_norm)) for k in sd)
    if has_qk_norm and N < G and spec.qk_norm_scope == "each_head":
        raise TransformError(f"{spec.family}: the QK-norms have one weight per key/value head; pooling {G} → {N} heads "
                             "leaves no exact place for them, so --kv-heads is refused (k=v, q=k, q=k=v work)")
    if has_qk_norm and N < G and spec.qk_norm_scope == "projection":
        raise TransformError(f"{spec.family}: k_norm normalises all {G} key heads of a token together (one RMS over "
                             f"{G}·head_dim); pooled heads change that statistic, so --kv-heads is refused "
                             "(k=v, q=k, q=k=v work: the norm runs per token on the cached states)")
    if init == "calibrated":
        if has_qk_norm and (spec.norm_kind != "rmsnorm" or spec.qk_norm_scope != "head"):
            raise TransformError(
                f"{spec.family}: --init calibrated models per-head RMSNorm QK-norms only, this model's are "
                f"{'whole-projection ' if spec.qk_norm_scope == 'projection' else ''}{spec.norm_kind}; "
                "use --init key, value or mean")
        if calibration is None:
            raise TransformError("--init calibrated needs calibration attention inputs for every layer")
        w, info = _calibrated(L, mode, _Calib(calibration, i, dims), dims, N)
    else:
        w = _data_free(L, mode, init, H, G, N, dh)
    removed = qkv_keys(sd, spec, i) + [k for k in sd if k.startswith(_o_key(spec, i) + ".")]
    out: dict[str, torch.Tensor] = {}
    if stock_kv_heads is not None:
        _write_stock(out, w if "o" in w else {"o": L.o} | w, spec, dims, i, N, stock_kv_heads, dtype)
        return LayerResult(out, removed, {"query": "projection", "attn_input": "norm"}, {"fit": info})
    attn = _attn_prefix(spec, i)
    untouched = _untouched(w, L, spec, i, attn)
    removed = [key for key in removed if key.rpartition(".")[0] not in untouched]
    w = w if "o" in w or _o_key(spec, i) in untouched else w | {"o": L.o}
    for name, p in w.items():  # q, k, v, s, o -> q_proj, k_proj, v_proj, s_proj, o_proj
        if f"{attn}.{name}_proj" not in untouched:
            _put(out, f"{attn}.{name}_proj", p, dtype)
    move_qk_norms(sd, spec, i, attn, out, removed)
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
