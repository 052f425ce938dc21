"""gemma, gemma2, gemma3 (text): (1 + γ) RMSNorm gains, sandwich norms, query_pre_attn_scalar, attention and final
logit soft-capping, alternating sliding-window / global layers (one RoPE per layer type in gemma3), QK-norm, tied
embeddings scaled by √d. Every command on tiny random models; the stock export runs transformers' own gemma code."""

from __future__ import annotations

import importlib
import json
import string

import pytest
import torch
import transformers
from common import SPECIALS, save_random, tiny_tokenizer
from typer.testing import CliRunner

import qkvconv
from qkvconv.archs import dims_of, spec_for
from qkvconv.cli import app
from qkvconv.convert import (absorb_query_checkpoint, attach_preproj_checkpoint, attach_query_mlp_checkpoint,
                             share_kv_checkpoint)
from qkvconv.describe import kv_cache_bytes_per_token
from qkvconv.transforms.share_kv import kv_cache_ratio
from qkvconv.verify import ALGEBRAIC_REL_BOUND
from test_share_kv import _check_cached_equals_uncached

GEMMAS = ("gemma", "gemma2", "gemma3")
FAST = dict(num_seqs=2, seq_len=32)  # 32 tokens > sliding_window 8: the window matters
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def gemma_config(family: str):
    vocab = len(SPECIALS) + len(set(string.printable))
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.15,
                  hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256)  # tie_word_embeddings: gemma's default, True
    if family == "gemma":
        return transformers.GemmaConfig(num_hidden_layers=2, **common)
    windowed = dict(num_hidden_layers=4, sliding_window=8, layer_types=LAYER_TYPES, query_pre_attn_scalar=24)
    if family == "gemma2":  # soft-capping small enough to bend tiny random logits
        return transformers.Gemma2Config(attn_logit_softcapping=5.0, final_logit_softcapping=10.0, **windowed, **common)
    if family == "gemma3":  # one RoPE per layer type
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
        return transformers.Gemma3TextConfig(rope_parameters=rope, **windowed, **common)
    raise ValueError(family)


def build_gemma(family: str, path, seed: int = 0):
    return save_random(gemma_config(family), path, seed)


@pytest.fixture(scope="session")
def gemmas(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gemma")
    return {f: build_gemma(f, root / f) for f in GEMMAS}


@pytest.fixture(params=GEMMAS)
def fam(request) -> str:
    return request.param


IDS = torch.tensor([[1] + list(range(40, 60))])  # 21 tokens > sliding_window 8


def _same_in_plain_transformers(out, atol=1e-5):
    """The converted checkpoint in plain transformers (remote code) computes what qkvconv.load gives."""
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ours, _ = qkvconv.load(out)
    with torch.no_grad():
        a, b = plain(IDS).logits, ours(IDS).logits
    torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()  # still tied
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    from safetensors import safe_open

    for shard in out.glob("*.safetensors"):  # the tied head is not written
        with safe_open(shard, "pt") as f:
            assert "lm_head.weight" not in f.keys()


def test_absorb_query_exact_and_drop(gemmas, fam, tmp_path):
    r = absorb_query_checkpoint(gemmas[fam], tmp_path / "x", **FAST)
    x = r.exactness
    print(f"\n{fam} absorb-query exact: float64 max |Δlogit| {x.algebraic_max_abs:.3g} (rel {x.algebraic_rel:.2g}), "
          f"fp32 rounding {x.rounding_ratio:.3f}× of the original's")
    assert x.passed and x.algebraic_rel <= ALGEBRAIC_REL_BOUND
    norm = qkvconv.load(tmp_path / "x")[0].model.layers[0].input_layernorm
    assert torch.all(norm.norm.weight == 0)  # unit gain of a (1 + γ) norm is γ = 0
    _same_in_plain_transformers(tmp_path / "x")
    drop = absorb_query_checkpoint(gemmas[fam], tmp_path / "d", mode="drop", **FAST)
    print(f"{fam} absorb-query drop: KL {drop.error.kl:.4g}")
    _same_in_plain_transformers(tmp_path / "d")


def test_attach_exact_at_step_0(gemmas, fam, tmp_path):
    q = attach_query_mlp_checkpoint(gemmas[fam], tmp_path / "q", **FAST)
    p = attach_preproj_checkpoint(gemmas[fam], tmp_path / "p", **FAST)
    for name, r in (("attach-query-mlp", q), ("attach-preproj", p)):
        print(f"\n{fam} {name}: float64 max |Δlogit| {r.exactness.algebraic_max_abs:.3g}")
        assert r.exactness.passed
    _same_in_plain_transformers(tmp_path / "p")


KEY_CASES = [("k=v", None), ("q=k", None), ("q=k=v", 1), (None, 1)]


def test_share_kv_shared_cache(gemmas, fam, tmp_path):
    orig, tok = qkvconv.load(gemmas[fam])
    spec = spec_for(orig.config.model_type)
    dims = dims_of(orig.config, spec)
    base = kv_cache_bytes_per_token(orig.config, spec, torch.float32)
    ids = IDS[:, :12]  # prompt 12 + 10 new tokens: the sliding cache drops tokens while decoding
    for init in ("key", "calibrated"):
        for mode, kv_heads in KEY_CASES if init == "key" else [("k=v", 1)]:
            out = tmp_path / f"{init}-{mode}-{kv_heads}"
            r = share_kv_checkpoint(gemmas[fam], out, mode=mode, kv_heads=kv_heads, init=init, **FAST)
            assert 0 < r.error.kl < float("inf")
            model, _ = qkvconv.load(out)
            N = kv_heads or dims.num_key_value_heads
            per_token = kv_cache_bytes_per_token(model.config, spec, torch.float32)
            assert per_token == base * kv_cache_ratio(mode, N, dims)
            print(f"\n{fam} share-kv {mode} kv_heads={N} init={init}: KL {r.error.kl:.4g}, "
                  f"cache {base} → {per_token} bytes/token")
            _check_cached_equals_uncached(model, ids, 10, per_token,
                                          lambda held: _held_bytes(model.config, per_token, held))


@torch.no_grad()
def _held_bytes(config, per_token: int, held: int) -> int:
    """Bytes the cache holds after `held` tokens: sliding layers keep their last sliding_window − 1 only."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    per_layer = per_token // config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    return sum(per_layer * (min(held, window - 1) if t == "sliding_attention" else held) for t in types)


EXPORTS = {"gemma": ("q=k=v", 1), "gemma2": ("k=v", None), "gemma3": ("q=k", None)}


def test_export_stock_equals_shared_cache_model(gemmas, fam, tmp_path):
    mode, kvh = EXPORTS[fam]
    a, b = tmp_path / "remote", tmp_path / "stock"
    share_kv_checkpoint(gemmas[fam], a, mode=mode, kv_heads=kvh, **FAST)
    share_kv_checkpoint(gemmas[fam], b, mode=mode, kv_heads=kvh, export="stock", **FAST)
    assert "qkvconv" not in json.loads((b / "config.json").read_text())
    remote, _ = qkvconv.load(a)
    # gemma's own code, under the same attention kernel (transformers 5.0 loads gemma2 with sdpa, which ignores
    # soft-capping in the stock model as in ours; 5.24 picks eager)
    stock = transformers.AutoModelForCausalLM.from_pretrained(
        b, attn_implementation=remote.config._attn_implementation).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(IDS).logits, remote(IDS).logits, atol=1e-5, rtol=1e-5)
        cached = stock.generate(IDS[:, :6], attention_mask=torch.ones_like(IDS[:, :6]), max_new_tokens=12,
                                min_new_tokens=12, do_sample=False)
        ours = remote.generate(IDS[:, :6], attention_mask=torch.ones_like(IDS[:, :6]), max_new_tokens=12,
                               min_new_tokens=12, do_sample=False)
    assert torch.equal(cached, ours)
    _same_in_plain_transformers(a)


def test_inspect(gemmas, fam, tmp_path):
    runner = CliRunner()
    for path in (gemmas[fam], _converted(gemmas[fam], tmp_path)):
        result = runner.invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        info = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).stdout)
        assert info["tied_embeddings"] is True


def _converted(path, tmp_path):
    share_kv_checkpoint(path, tmp_path / "kv", mode="k=v", **FAST)
    return tmp_path / "kv"


def test_calibration_attention_is_the_stock_attention(gemmas, fam):
    """share-kv --init calibrated fits against its own model of each layer's attention: with gemma's scaling,
    soft-capping, sliding window, per-type RoPE and (1 + γ) QK norms it equals the stock module's output."""
    from qkvconv.checkpoint import load
    from qkvconv.convert import _attention_facts, _rope_table
    skv = importlib.import_module("qkvconv.transforms.share_kv")  # the module (the package exports the function)

    loaded = load(gemmas[fam])
    model, spec = loaded.model.double(), loaded.spec
    model.set_attn_implementation("eager")  # gemma2's soft-capping (transformers 5.0 loads sdpa, which drops it)
    dims = dims_of(loaded.config, spec)
    ids = torch.randint(3, 103, (2, 24), generator=torch.Generator().manual_seed(0))  # 24 tokens > window 8
    inputs, outputs = {}, {}

    def keep(i):
        def hook(module, args, kwargs, out):
            inputs[i], outputs[i] = kwargs["hidden_states"].reshape(-1, 64), out[0].reshape(-1, 64)
        return hook

    hooks = [layer.self_attn.register_forward_hook(keep(i), with_kwargs=True)
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for i in range(dims.num_hidden_layers):
        cos, sin = _rope_table(model, 24, i)
        cal = skv.Calibration({i: inputs[i]}, 24, cos, sin, loaded.config.rms_norm_eps,
                              **_attention_facts(model, spec, i))
        L = skv._read_layer(model.state_dict(), spec, dims, i)
        _, y = skv._candidates(L, None, skv._Calib(cal, i, dims), dims, dims.num_key_value_heads)
        # gemma2/3 run eager attention, whose softmax is float32 even for float64 inputs: agreement to ~1e-7
        torch.testing.assert_close(y, outputs[i], atol=1e-6, rtol=1e-5)


def test_refusals(tmp_path):
    """Real gemma checkpoints mostly have heads·head_dim ≠ hidden_size (gemma-7b 16·256 vs 3072, gemma2-2b 8·256 vs
    2304, gemma3-1b 4·256 vs 1152): absorb-query is refused there, the other commands still apply. The multimodal
    gemma3 wrapper (model_type gemma3) is refused by name."""
    from qkvconv.errors import TransformError, UnsupportedArchitecture

    torch.manual_seed(0)
    config = gemma_config("gemma2")
    config.head_dim, config.num_hidden_layers, config.layer_types = 24, 2, LAYER_TYPES[:2]  # 4·24 = 96 ≠ 64
    path = tmp_path / "wide"
    transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    with pytest.raises(TransformError) as e:
        absorb_query_checkpoint(path, tmp_path / "x", **FAST)
    print(f"\nrefused: {e.value}")
    assert str(e.value) == ("W_Q is not square (hidden_size 64 × heads·head_dim 96); absorb-query needs "
                            "num_attention_heads·head_dim == hidden_size")
    assert attach_query_mlp_checkpoint(path, None, **FAST).exactness.passed
    share_kv_checkpoint(path, tmp_path / "kv", mode="k=v", **FAST)
    _same_in_plain_transformers(tmp_path / "kv")
    with pytest.raises(UnsupportedArchitecture) as e:
        spec_for("gemma3")
    print(f"refused: {e.value}")
    assert str(e.value).startswith("unsupported architecture 'gemma3'; qkvconv supports:")
    assert "gemma3_text" in str(e.value)
