"""Families beyond the LLaMA/GPT core (issue 11): phi3, phi, stablelm, olmo2, as tiny random models.

Per family: absorb-query exact (float64 algebra) and drop, attach-* exact at step 0, share-kv (every mode, data-free
and calibrated inits) with cached = uncached greedy decoding and measured cache bytes = arithmetic, the stock export
against the shared-cache model (the family's own transformers code as the independent reference), loading in plain
transformers with remote code, and `inspect`. Where the math does not allow a command, the refusal line is tested.
Run with -s to see the measured numbers.
"""

from __future__ import annotations

import string

import pytest
import torch
import transformers
from typer.testing import CliRunner

import qkvconv
from qkvconv.archs import dims_of, spec_for
from qkvconv.cli import app
from qkvconv.convert import (
    absorb_query_checkpoint,
    attach_preproj_checkpoint,
    attach_query_mlp_checkpoint,
    share_kv_checkpoint,
)
from qkvconv.describe import kv_cache_bytes_per_token
from qkvconv.errors import TransformError
from qkvconv.transforms.share_kv import kv_cache_ratio

from common import SPECIALS, save_random
from test_share_kv import _check_cached_equals_uncached

FAST = dict(num_seqs=2, seq_len=32)
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]])


def _config(name: str):
    vocab = len(SPECIALS) + len(set(string.printable))
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.15,
                  hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    if name == "phi3":  # fused [q | k | v] with GQA sizes, partial rotary, longrope (short factors below 64 tokens)
        return transformers.Phi3Config(
            **common, partial_rotary_factor=0.5, original_max_position_embeddings=64,
            rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                                 short_factor=[1.0, 1.1, 1.2, 1.3], long_factor=[1.5, 2.0, 3.0, 4.0]))
    if name == "phi3_plain":  # Phi-3-mini: full rotary, default rope
        return transformers.Phi3Config(**common)
    if name == "phi":  # Phi-2 shape: parallel attention + MLP on one LayerNorm, dense, partial rotary, QK LayerNorm
        return transformers.PhiConfig(**common, partial_rotary_factor=0.5, qk_layernorm=True)
    if name == "phi_plain":  # Phi-2 as released: no QK norm
        return transformers.PhiConfig(**common, partial_rotary_factor=0.4)
    if name == "stablelm":  # LayerNorm with bias, partial rotary, one QK LayerNorm per head, parallel residual
        return transformers.StableLmConfig(**common, partial_rotary_factor=0.25, qk_layernorm=True,
                                           use_parallel_residual=True, use_qkv_bias=True)
    if name == "stablelm_seq":  # StableLM-2 1.6B shape: sequential residual, q/k/v biases, no QK norm
        return transformers.StableLmConfig(**common, partial_rotary_factor=0.25, use_qkv_bias=True)
    if name == "olmo2":  # post-norm blocks (no pre-attention norm), RMSNorm QK-norm over the whole projection
        return transformers.Olmo2Config(**common)
    raise ValueError(name)


FAMILIES = ("phi3", "phi3_plain", "phi", "phi_plain", "stablelm", "stablelm_seq", "olmo2")


def _build(name: str, path, seed: int = 0):
    return save_random(_config(name), path, seed)


@pytest.fixture(scope="session")
def misc_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("misc")
    return {f: _build(f, root / f) for f in FAMILIES}


def _same_in_plain_transformers(out) -> None:
    """The output loads with AutoModelForCausalLM(trust_remote_code=True) and equals qkvconv.load."""
    ours, _ = qkvconv.load(out)
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, ours(IDS).logits, atol=1e-5, rtol=1e-5)


def _absorb(path, tmp_path, name):
    r = absorb_query_checkpoint(path, tmp_path / "absorb", **FAST)
    print(f"\n{name} absorb-query exact: float64 max |Δlogit| {r.exactness.algebraic_max_abs:.2e} "
          f"(rel {r.exactness.algebraic_rel:.2e}), fp32 max |Δlogit| {r.error.max_abs:.2e}")
    assert r.exactness.passed
    _same_in_plain_transformers(tmp_path / "absorb")
    d = absorb_query_checkpoint(path, tmp_path / "drop", mode="drop", **FAST)
    print(f"{name} absorb-query drop: KL {d.error.kl:.3g}")
    model, _ = qkvconv.load(tmp_path / "drop")
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def _attach(path, tmp_path, name, preproj_refusal: str | None = None):
    q = attach_query_mlp_checkpoint(path, tmp_path / "qmlp", **FAST)
    print(f"{name} attach-query-mlp: float64 max |Δlogit| {q.exactness.algebraic_max_abs:.2e}, "
          f"fp32 {q.error.max_abs:.2e}")
    assert q.exactness.passed and q.error.max_abs <= 1e-6
    _same_in_plain_transformers(tmp_path / "qmlp")
    if preproj_refusal is not None:
        with pytest.raises(TransformError, match=preproj_refusal):
            attach_preproj_checkpoint(path, tmp_path / "pre", **FAST)
        return
    p = attach_preproj_checkpoint(path, tmp_path / "pre", **FAST)
    print(f"{name} attach-preproj: float64 max |Δlogit| {p.exactness.algebraic_max_abs:.2e}, "
          f"fp32 {p.error.max_abs:.2e}")
    assert p.exactness.passed and p.error.max_abs <= 1e-6
    _same_in_plain_transformers(tmp_path / "pre")


SHARE_CASES = [("k=v", None, "key"), ("q=k", None, "mean"), ("q=k=v", None, "key"), (None, 1, "key"),
               ("k=v", 1, "calibrated"), ("q=k", None, "calibrated")]


def _share(path, tmp_path, name, cases=SHARE_CASES):
    orig, tok = qkvconv.load(path)
    spec = spec_for(orig.config.model_type)
    dims = dims_of(orig.config, spec)
    base = kv_cache_bytes_per_token(orig.config, spec, torch.float32)
    ids = tok(["The quick brown fox"], return_tensors="pt").input_ids
    for j, (mode, kvh, init) in enumerate(cases):
        out = tmp_path / f"share{j}"
        r = share_kv_checkpoint(path, out, mode=mode, kv_heads=kvh, init=init, **FAST)
        model, _ = qkvconv.load(out)
        N = kvh or dims.num_key_value_heads
        per_token = kv_cache_bytes_per_token(model.config, spec, torch.float32)
        assert per_token == base * kv_cache_ratio(mode, N, dims) == r.options["kv_cache_bytes_per_token"]["after"]
        _check_cached_equals_uncached(model, ids, 6, per_token)
        print(f"{name} share-kv {mode} kv_heads={kvh} init={init}: KL {r.error.kl:.3g}, "
              f"cache {base} -> {per_token} bytes/token")
    _same_in_plain_transformers(tmp_path / "share0")


EXPORTS = (("k=v", 1), ("q=k", None), ("q=k=v", None))


def _export_stock(path, tmp_path, name, cases=EXPORTS):
    for mode, kvh in cases:
        a, b = tmp_path / f"remote{mode}{kvh}".replace("=", ""), tmp_path / f"stock{mode}{kvh}".replace("=", "")
        share_kv_checkpoint(path, a, mode=mode, kv_heads=kvh, **FAST)
        share_kv_checkpoint(path, b, mode=mode, kv_heads=kvh, export="stock", **FAST)
        assert not (b / "modeling_qkvconv.py").exists()
        stock = transformers.AutoModelForCausalLM.from_pretrained(b)  # the family's own code: no remote code
        remote, _ = qkvconv.load(a)
        assert any(type(m).__name__ == "SharedProjectionAttention" for m in remote.modules())
        with torch.no_grad():
            err = (stock(IDS).logits - remote(IDS).logits).abs().max().item()
        print(f"{name} share-kv {mode} kv_heads={kvh}: stock export vs shared-cache model max |Δlogit| {err:.2e}")
        assert err < 1e-4


def _inspect(path):
    result = CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "cond(W_Q)" in result.stdout


# the second size of a family checks its other quirks with fewer share-kv runs (runtime)
VARIANT_CASES, VARIANT_EXPORTS = [("k=v", 1, "calibrated"), ("q=k=v", None, "key")], (("k=v", 1),)


@pytest.mark.parametrize("name", ["phi3", "phi3_plain"])
def test_phi3(misc_models, tmp_path, name):
    path = misc_models[name]
    _absorb(path, tmp_path, name)
    _attach(path, tmp_path, name)
    _share(path, tmp_path, name, SHARE_CASES if name == "phi3" else VARIANT_CASES)
    _export_stock(path, tmp_path, name, EXPORTS if name == "phi3" else VARIANT_EXPORTS)
    _inspect(path)


@pytest.mark.parametrize("name", ["phi", "phi_plain"])
def test_phi(misc_models, tmp_path, name):
    """The MLP reads the attention's norm: absorb-query puts h·W_Q + b_Q on the attention's input (attn_in), the
    pre-projection MLP hangs there too; the norm and the MLP's input stay as they were."""
    path = misc_models[name]
    _absorb(path, tmp_path, name)
    model, _ = qkvconv.load(tmp_path / "absorb")
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, torch.nn.LayerNorm) and hasattr(layer.self_attn, "attn_in")
    _attach(path, tmp_path, name)
    model, _ = qkvconv.load(tmp_path / "pre")
    assert hasattr(model.model.layers[0].self_attn, "preproj")
    cases, exports = VARIANT_CASES, VARIANT_EXPORTS
    if name == "phi":  # QK LayerNorm: the calibrated fit models RMSNorm only
        cases, exports = [c for c in SHARE_CASES if c[2] != "calibrated"], EXPORTS
        with pytest.raises(TransformError, match="--init calibrated models per-head RMSNorm QK-norms only"):
            share_kv_checkpoint(path, None, mode="k=v", init="calibrated", **FAST)
    _share(path, tmp_path, name, cases)
    _export_stock(path, tmp_path, name, exports)
    _inspect(path)


@pytest.mark.parametrize("name", ["stablelm", "stablelm_seq"])
def test_stablelm(misc_models, tmp_path, name):
    path = misc_models[name]
    parallel = name == "stablelm"
    _absorb(path, tmp_path, name)
    model, _ = qkvconv.load(tmp_path / "absorb")
    assert hasattr(model.model.layers[0].self_attn, "attn_in") == parallel  # parallel: the MLP reads the same norm
    _attach(path, tmp_path, name)
    cases, exports = VARIANT_CASES, VARIANT_EXPORTS
    if parallel:  # one LayerNorm per head on q and k: no pooling, no calibrated fit
        cases = [c for c in SHARE_CASES if c[2] != "calibrated" and c[1] is None]
        exports = (("k=v", None), ("q=k", None), ("q=k=v", None))
        with pytest.raises(TransformError, match="one weight per key/value head; pooling 2 → 1 heads"):
            share_kv_checkpoint(path, None, mode="k=v", kv_heads=1, **FAST)
        with pytest.raises(TransformError, match="--init calibrated models per-head RMSNorm QK-norms only"):
            share_kv_checkpoint(path, None, mode="k=v", init="calibrated", **FAST)
    _share(path, tmp_path, name, cases)
    _export_stock(path, tmp_path, name, exports)
    _inspect(path)


def test_olmo2(misc_models, tmp_path):
    """No pre-attention norm: absorb-query's h·W_Q is an explicit d×d map on the attention's input; the QK-norm over
    the whole projection is kept (q = q_norm(h'), k = k_norm(h'·W_Q⁻¹W_K)). share-kv runs the whole-projection norm
    per token on the cached states; pooling and the calibrated fit are refused."""
    name, path = "olmo2", misc_models["olmo2"]
    _absorb(path, tmp_path, name)
    model, _ = qkvconv.load(tmp_path / "absorb")
    assert hasattr(model.model.layers[0].self_attn, "attn_in")
    _attach(path, tmp_path, name)
    with pytest.raises(TransformError, match="k_norm normalises all 2 key heads of a token together"):
        share_kv_checkpoint(path, None, mode="k=v", kv_heads=1, **FAST)
    with pytest.raises(TransformError, match="whole-projection rmsnorm"):
        share_kv_checkpoint(path, None, mode="q=k", init="calibrated", **FAST)
    cases = [c for c in SHARE_CASES if c[2] != "calibrated" and c[1] is None]
    _share(path, tmp_path, name, cases)
    _export_stock(path, tmp_path, name, (("k=v", None), ("q=k", None), ("q=k=v", None)))
    _inspect(path)
