"""latent-kv --fit attention (issue 16): the latent weighted by what attention does with K and V. Full rank is still
the original (float64; after share-kv k=v / --kv-heads the share-kv model; with every RoPE pair kept too); the fit
minimises exactly its weighted objective; the RoPE average is the mean over rotations; at a reduced rank it leaves
less attention-output error than fit=kv where the heads matter unequally; CLI flag, record, refusals."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import qkvconv
from qkvconv.archs import dims_of, spec_for
from qkvconv.archs.layout import read_qkv
from qkvconv.cli import app
from qkvconv.convert import latent_kv_checkpoint, share_kv_checkpoint
from qkvconv.errors import TransformError
from qkvconv.transforms.latent_kv import (_group_weights, _rope_average, attention_weights, balance_latent,
                                          fit_metrics, full_rank, latent_kv_layer, layer_spectrum, rope_distance_angles)
from qkvconv.transforms.share_kv import read_o

FAST = dict(num_seqs=5, seq_len=32, calib="sample")  # text the random model itself writes; 4 fit, 1 held out
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54]])


def _dims(model):
    spec = spec_for(model.config.model_type)
    return spec, dims_of(model.config, spec)


def _assert_same_logits(ref_path, out, what):
    ref, _ = qkvconv.load(ref_path, dtype=torch.float64)
    conv, _ = qkvconv.load(out, dtype=torch.float64)
    assert any(type(m).__name__ == "LatentKVAttention" for m in conv.modules())
    with torch.no_grad():
        a, b = ref(IDS).logits, conv(IDS).logits
    err = (a - b).abs().max().item()
    print(f"{what}: float64 max |Δlogit| {err:.2e} (max |logit| {a.abs().max().item():.2f})")
    assert err < 1e-10 * max(1.0, a.abs().max().item())


# ------------------------------------------------------------------------------------------ continuity
@pytest.mark.parametrize("family_,groups", [("llama", 1), ("qwen2", 2), ("gpt_neox", 1), ("gpt2", 2)])
def test_full_rank_attention_fit_is_the_original_in_float64(tiny_models, tmp_path, family_, groups):
    """qwen2: biases; gpt_neox: partial rotary (a non-rotary block in M_K); gpt2: no RoPE, fused QKV."""
    src = tiny_models[family_]
    ref, _ = qkvconv.load(src)
    _, dims = _dims(ref)
    out = tmp_path / "full"
    report = latent_kv_checkpoint(src, out, kv_rank=full_rank(dims, groups), groups=groups, fit="attention",
                                  key_weight=0.5, dtype=torch.float64, **FAST)
    assert [x["fit"] for x in report.fit] == ["attention"] * dims.num_hidden_layers
    _assert_same_logits(src, out, f"{family_} groups={groups} fit=attention full rank")


@pytest.mark.parametrize("mode,kv_heads", [("k=v", None), (None, 1)])
def test_full_rank_attention_fit_after_share_kv_is_the_share_kv_model(tiny_models, tmp_path, mode, kv_heads):
    """K=V: the shared block weighted by M_K + M_V; --kv-heads 1: both query heads' statistics on the pooled head."""
    src = tmp_path / "shared"
    share_kv_checkpoint(tiny_models["llama"], src, mode=mode, kv_heads=kv_heads, init="mean", **FAST)
    ref, _ = qkvconv.load(src)
    _, dims = _dims(ref)
    parts = 1 if mode == "k=v" else 2
    top = full_rank(dims, 1, None, parts) if kv_heads is None else parts * kv_heads * dims.head_dim
    out = tmp_path / "full"
    latent_kv_checkpoint(src, out, kv_rank=top, fit="attention", dtype=torch.float64, **FAST)
    _assert_same_logits(src, out, f"share-kv {mode} {kv_heads} → fit=attention full rank {top}")


def test_full_rank_attention_fit_with_every_rope_pair_is_the_original(tiny_models, tmp_path):
    """--rope-pairs: the latent's key dims are RoPE-free, weighted by their full query block (no rotation average)."""
    src = tiny_models["gpt_neox"]
    ref, _ = qkvconv.load(src)
    _, dims = _dims(ref)
    pairs = dims.rotary_dim // 2
    out = tmp_path / "full"
    latent_kv_checkpoint(src, out, kv_rank=full_rank(dims, 1, pairs), rope_pairs=pairs, fit="attention",
                         dtype=torch.float64, **FAST)
    _assert_same_logits(src, out, f"gpt_neox --rope-pairs {pairs} fit=attention full rank")


# ------------------------------------------------------------------------------------------------ the math
def test_rope_average_is_the_mean_over_relative_rotations():
    """E_θ[R_θᵀ·Q·R_θ] with each pair's angle uniform and independent (exact on 4 angles per pair: cos, sin and
    their products average to 0 over 0, π/2, π, 3π/2), rotate-half pairs (i, i + rotary_dim/2), 2 pass-through dims."""
    torch.manual_seed(0)
    dh, rotary = 8, 6
    half = rotary // 2
    X = torch.randn(3, dh, dh, dtype=torch.float64)
    Q = X @ X.transpose(1, 2)  # (heads, dh, dh) PSD
    mean = torch.zeros_like(Q)
    angles = [0, math.pi / 2, math.pi, 3 * math.pi / 2]
    combos = list(itertools.product(angles, repeat=half))
    for thetas in combos:
        R = torch.eye(dh, dtype=torch.float64)
        for i, t in enumerate(thetas):
            c, s = math.cos(t), math.sin(t)
            R[i, i], R[i, i + half], R[i + half, i], R[i + half, i + half] = c, -s, s, c
        mean += R.T @ Q @ R / len(combos)
    torch.testing.assert_close(_rope_average(Q, rotary), mean)


def test_rope_average_over_the_relative_distances_of_a_causal_window():
    """E_Δ[R(Δ)ᵀ·Q·R(Δ)] over the query/key pairs of a window of T tokens (Δ = 0 … −(T − 1), T − |Δ| pairs each),
    summed explicitly with HF's rotate-half RoPE on a vector: fast pairs become isotropic, a pair slow enough not to
    turn over the window keeps its cross terms (here with a non-rotary dim too)."""
    torch.manual_seed(0)
    dh, rotary, T = 8, 6, 32
    half = rotary // 2
    inv_freq = torch.tensor([1.0, 0.05, 1e-4], dtype=torch.float64)
    X = torch.randn(2, dh, dh, dtype=torch.float64)
    Q = X @ X.transpose(1, 2)

    def rope(x, pos):  # HF apply_rotary_pos_emb on the rotary dims of x (..., dh)
        ang = pos * torch.cat([inv_freq, inv_freq])
        r = x[..., :rotary]
        rot = torch.cat([-r[..., half:], r[..., :half]], -1)
        return torch.cat([r * ang.cos() + rot * ang.sin(), x[..., rotary:]], -1)

    mean = torch.zeros_like(Q)
    pairs = [(t, s) for t in range(T) for s in range(t + 1)]  # query t, key s ≤ t
    for t, s in pairs:  # q_t·k_s = rope(q, t)·rope(k, s) = q·R(s − t)·k: R(s − t) = the map k ↦ rope_tᵀ rope_s k
        R = torch.stack([rope(rope(e, s), -t) for e in torch.eye(dh, dtype=torch.float64)], 1)  # columns R·e_j
        mean += R.T @ Q @ R / len(pairs)
    got = _rope_average(Q, rotary, rope_distance_angles(inv_freq, T))
    torch.testing.assert_close(got, mean)
    iso = _rope_average(Q, rotary)
    assert (got[:, 0, 0] - iso[:, 0, 0]).abs().max() < 0.05 * iso[:, 0, 0].abs().max()  # fast: nearly isotropic
    slow = torch.tensor([2, 5, 6])  # the slow pair's two dims and the non-rotary one keep their cross terms
    torch.testing.assert_close(got[:, slow][:, :, slow], Q[:, slow][:, :, slow], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("family_", ["llama", "gpt_neox", "gpt2"])
def test_rope_inv_freq_is_the_models_own(tiny_models, family_):
    """The frequencies the query moments are averaged with are the ones the model rotates by (gpt_neox: partial
    rotary; gpt2: no RoPE, None)."""
    from qkvconv.archs import rope_inv_freq

    model, _ = qkvconv.load(tiny_models[family_])
    _, dims = _dims(model)
    got = rope_inv_freq(model.config, dims)
    own = [m.inv_freq for m in model.modules() if hasattr(m, "inv_freq")]
    if not own:
        assert got is None
        return
    torch.testing.assert_close(got, own[0].double(), rtol=1e-6, atol=0)


def test_fit_minimises_the_weighted_error_exactly(tiny_models):
    """Eckart–Young in the whitened, right-weighted space: E‖(h·W − h·A·B)·D‖² is exactly the dropped σ² of
    layer_spectrum(fit="attention"), and no more than the fit=kv latent leaves in the same norm."""
    from qkvconv.verify import attention_inputs, calibration_ids

    loaded = qkvconv.checkpoint.load(tiny_models["qwen2"])
    spec, dims = _dims(loaded.model)
    ids, _ = calibration_ids(loaded.model, loaded.tokenizer, calib="sample", num_seqs=4, seq_len=32)
    x = attention_inputs(loaded.model, spec, ids)[1].double()
    sd = {k: v.double() for k, v in loaded.model.state_dict().items()}
    q, k, v = read_qkv(sd, spec, dims, 1)
    W = _group_weights(k, v, dims, 1)[0]  # (d, 2·G·dh)
    M = fit_metrics(sd, spec, 1, q, [k, v], read_o(sd, spec, dims, 1), dims, x, 1, "attention", 0.5, None)[0]

    def weighted_error(fit):
        res = latent_kv_layer(sd, spec, dims, 1, 12, x, fit=fit, key_weight=0.5)
        a = "model.layers.1.self_attn."
        A, Bk, Bv = (res.tensors[a + n + ".weight"].T for n in ("kv_a_proj", "k_b_proj", "v_b_proj"))
        E = x @ W - x @ A @ torch.cat([Bk, Bv], 1)  # (n, 2·G·dh)
        return float(((E @ M) * E).sum() / len(x))

    spectrum = layer_spectrum(sd, spec, dims, 1, x, fit="attention", key_weight=0.5)[0]
    weighted, plain = weighted_error("attention"), weighted_error("kv")
    print(f"E‖(hW − hAB)·D‖²: fit=attention {weighted:.4g}, fit=kv {plain:.4g}")
    assert weighted == pytest.approx(float(spectrum[12:].sum()), rel=1e-3)  # the ridges move it by ~1e-6
    assert weighted < plain


def test_attention_weights_blocks(tiny_models):
    """M_V of KV head g is Σ_h W_O[h]·W_O[h]ᵀ over its query heads; M_K scales with key_weight; K=V is the sum."""
    loaded = qkvconv.checkpoint.load(tiny_models["llama"])
    spec, dims = _dims(loaded.model)
    sd = {k: v.double() for k, v in loaded.model.state_dict().items()}
    q, k, v = read_qkv(sd, spec, dims, 0)
    o = read_o(sd, spec, dims, 0)
    dh, H, G = dims.head_dim, dims.num_attention_heads, dims.num_key_value_heads
    w1 = attention_weights(q, [k, v], o, dims, None, 1.0)
    w2 = attention_weights(q, [k, v], o, dims, None, 2.0)
    wo = o.W.reshape(H, dh, -1)
    for g in range(G):
        heads = range(g * H // G, (g + 1) * H // G)
        torch.testing.assert_close(w1[g][1], sum(wo[h] @ wo[h].T for h in heads))
        torch.testing.assert_close(w2[g][0], 2 * w1[g][0])
        assert torch.linalg.eigvalsh(w1[g][0]).min() > 0  # random queries: every key dim matters
    shared = attention_weights(q, [v], o, dims, None, 1.0)  # as if K=V with S = v
    kv_of_v = attention_weights(q, [v, v], o, dims, None, 1.0)
    for g in range(G):
        torch.testing.assert_close(shared[g][0], kv_of_v[g][0] + kv_of_v[g][1])


@pytest.mark.parametrize("fit,groups", [("kv", 1), ("attention", 1), ("attention", 2)])
def test_latent_factors_are_balanced(tiny_models, fit, groups):
    """Each latent coordinate's down-projection column and up-projection row ([B_K | B_V], its group's block) have
    one RMS, whatever the fit put in each (a finetune's Adam moves every entry by about its lr); the product A·B is
    what it was before the rescaling, to float64 rounding."""
    from qkvconv.verify import attention_inputs, calibration_ids

    loaded = qkvconv.checkpoint.load(tiny_models["qwen2"])
    spec, dims = _dims(loaded.model)
    ids, _ = calibration_ids(loaded.model, loaded.tokenizer, calib="sample", num_seqs=4, seq_len=32)
    x = attention_inputs(loaded.model, spec, ids)[1].double()
    sd = {k: v.double() for k, v in loaded.model.state_dict().items()}
    res = latent_kv_layer(sd, spec, dims, 1, 12, x, groups=groups, fit=fit)
    a = "model.layers.1.self_attn."
    A, Bk, Bv = (res.tensors[a + n + ".weight"].T for n in ("kv_a_proj", "k_b_proj", "v_b_proj"))
    B = torch.cat([Bk, Bv], 1)
    rms_a = A.pow(2).mean(0).sqrt()
    rms_b = (B.pow(2).sum(1) / (B != 0).sum(1)).sqrt()
    print(f"fit={fit} groups={groups}: RMS(A[:, j]) / RMS(B[j]) in [{(rms_a / rms_b).min():.6f}, "
          f"{(rms_a / rms_b).max():.6f}]")
    torch.testing.assert_close(rms_a, rms_b, rtol=1e-12, atol=0)
    gen = torch.Generator().manual_seed(0)
    A0 = torch.randn(40, 6, dtype=torch.float64, generator=gen) * torch.logspace(-3, 1, 6, dtype=torch.float64)
    B0 = torch.randn(6, 16, dtype=torch.float64, generator=gen)
    A1, B1 = balance_latent(A0, B0)
    torch.testing.assert_close(A1 @ B1, A0 @ B0, rtol=1e-13, atol=1e-15)
    assert not torch.allclose(A1, A0)


# --------------------------------------------------------------------------------- what it buys
def _attention_output_errors(model, spec, dims, ids, attn_inputs, rank, fit):
    """Per layer, ‖attn_out(layer i's K/V replaced by its latent) − attn_out‖² / ‖attn_out‖² on `ids`, every other
    layer original (the stock model with k_proj = A·B_K, v_proj = A·B_V in layer i: rebuilt, then rotated)."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    errors = []
    for i in range(dims.num_hidden_layers):
        res = latent_kv_layer(sd, spec, dims, i, rank, attn_inputs[i], fit=fit)
        a = f"model.layers.{i}.self_attn."
        A = res.tensors[a + "kv_a_proj.weight"].T  # (d, r)
        low = copy.deepcopy(model)
        attn = low.model.layers[i].self_attn
        with torch.no_grad():
            for proj, up in (("k_proj", "k_b_proj"), ("v_proj", "v_b_proj")):
                getattr(attn, proj).weight.copy_((A @ res.tensors[a + up + ".weight"].T).T)
        outs = []
        for m in (model, low):
            got = []
            hook = m.model.layers[i].self_attn.register_forward_hook(lambda mod, args, out: got.append(out[0]))
            with torch.no_grad():
                m(ids)
            hook.remove()
            outs.append(got[0])
        errors.append(float((outs[1] - outs[0]).pow(2).sum() / outs[0].pow(2).sum()))
    return errors


def test_attention_fit_leaves_less_attention_output_error(tiny_models):
    """A tiny llama whose heads matter unequally (the output projection of KV head 0's two query heads scaled by 0.1,
    as a trained model's heads differ): at rank 16 of 64 the attention-weighted latent spends its rank where the
    output reads it and leaves less attention-output error than fit=kv, per layer, on the fitting tokens and on
    held-out ones."""
    from qkvconv.verify import attention_inputs, calibration_ids

    model, tok = qkvconv.load(tiny_models["llama"], dtype=torch.float64)
    spec, dims = _dims(model)
    dh = dims.head_dim
    with torch.no_grad():
        for layer in model.model.layers:  # o_proj (d, H·dh): query heads 0 and 1 (KV head 0's) damped
            for h in (0, 1):
                layer.self_attn.o_proj.weight[:, h * dh:(h + 1) * dh] *= 0.1
    ids, _ = calibration_ids(model, tok, calib="sample", num_seqs=8, seq_len=32)
    fit_ids, held = ids[:4], ids[4:]
    x = [t.double() for t in attention_inputs(model, spec, fit_ids)]
    for name, on in (("fitting", fit_ids), ("held-out", held)):
        kv = _attention_output_errors(model, spec, dims, on, x, 16, "kv")
        att = _attention_output_errors(model, spec, dims, on, x, 16, "attention")
        print(f"relative attention-output error per layer, {name} tokens: fit=kv {kv}, fit=attention {att}")
        assert all(a < k for a, k in zip(att, kv))


# ---------------------------------------------------------------------------------------- CLI, refusals
def test_cli_fit_attention_records_the_fit(tiny_models, tmp_path):
    from qkvconv.options import TRANSFORMS

    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["latent-kv", str(tiny_models["qwen2"]), "-o", str(out), "--kv-rank", "16",
                                 "--fit", "attention", "--key-weight", "0.5", "--num-seqs", "5", "--seq-len", "32"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "fit: attention (key weight 0.5)" in result.stdout and "KL (nats/token)" in result.stdout
    record = json.loads((out / "qkvconv.json").read_text())["history"][-1]
    assert record["fit"] == ["attention", "attention"] and record["key_weight"] == 0.5
    assert record["rope_average"] == "relative positions of a 32-token causal window"  # the model's own frequencies
    assert record["options"]["fit"] == "attention" and record["options"]["key_weight"] == 0.5
    assert TRANSFORMS["latent-kv"](kv_rank=8, fit="attention", key_weight=0.3).key_weight == 0.3  # recipe step
    kv = runner.invoke(app, ["latent-kv", str(tiny_models["qwen2"]), "-o", str(tmp_path / "kv"), "--kv-rank", "16",
                             "--num-seqs", "5", "--seq-len", "32"], env={"COLUMNS": "200"})
    assert kv.exit_code == 0 and "fit: attention" not in kv.stdout
    assert json.loads((tmp_path / "kv" / "qkvconv.json").read_text())["history"][-1]["fit"] == ["kv", "kv"]
    for args, msg in ((["--fit", "output"], "--fit"), (["--key-weight", "2"], "--key-weight"),
                      (["--fit", "attention", "--key-weight", "-1"], "--key-weight")):
        bad = runner.invoke(app, ["latent-kv", str(tiny_models["qwen2"]), "-o", str(tmp_path / "bad"), "--kv-rank",
                                  "16", *args, "--num-seqs", "5", "--seq-len", "32"])
        assert bad.exit_code == 1 and msg in bad.output and not (tmp_path / "bad").exists(), bad.output


@pytest.mark.parametrize("kw,msg", [
    (dict(fit="output"), "unknown --fit 'output'"),
    (dict(key_weight=2.0), "--key-weight 2.0: .* with --fit attention only"),
    (dict(fit="attention", key_weight=-1.0), "--key-weight -1.0: a non-negative number"),
    (dict(key_weight=0.3), "--key-weight 0.3: .* with --fit attention only"),
])
def test_refusals(tiny_models, tmp_path, kw, msg):
    with pytest.raises(TransformError, match=msg):
        latent_kv_checkpoint(tiny_models["llama"], tmp_path / "x", kv_rank=8, **kw, **FAST)
    assert not (tmp_path / "x").exists()


def test_qk_norm_refused(tiny_models, tmp_path):
    """qwen3 normalises keys per head between the rebuilt key and the logit: the weighting does not model it."""
    with pytest.raises(TransformError, match="--fit attention: layer 0 normalises queries/keys per head"):
        latent_kv_checkpoint(tiny_models["qwen3"], tmp_path / "x", kv_rank=8, fit="attention", **FAST)
    assert not (tmp_path / "x").exists()
    latent_kv_checkpoint(tiny_models["qwen3"], None, kv_rank=8, **FAST)  # fit=kv still works there
