"""Families with llama/qwen-style attention (issue 11): rope variants on llama, granite, smollm3, gpt_oss (the MoE
families mixtral, qwen2_moe, qwen3_moe: tests/test_families_moe.py, with the configs here). Each tiny random model
goes through absorb-query (exact in float64, drop), the attach commands (exact at step 0), share-kv (cached =
uncached, cache bytes = arithmetic, --export stock = the shared-cache model), plain-transformers loading and inspect.
Measured numbers are printed (pytest -s)."""

from __future__ import annotations

import json

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

from common import SPECIALS, save_random, tiny_tokenizer
from qkvconv.compat import cache_bytes, output_cache

FAST = dict(num_seqs=2, seq_len=32)
VOCAB = len(tiny_tokenizer())
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.15,
              hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
assert len(SPECIALS) == 3


def _rope(rope_type: str, **kw) -> dict:
    return {"rope_type": rope_type, "rope_theta": 10000.0, **kw}


# original lengths of 16-24 tokens: the 40-token forwards go past them (check_family decodes 19 + 6 tokens, within
# 24, where the frequencies of dynamic and longrope do not change yet; test_rope_beyond_original_length goes past)
ROPES = {
    "linear": dict(rope_parameters=_rope("linear", factor=2.0)),
    "dynamic": dict(rope_parameters=_rope("dynamic", factor=2.0), max_position_embeddings=24),
    "yarn": dict(rope_parameters=_rope("yarn", factor=2.0, original_max_position_embeddings=24),
                 max_position_embeddings=48),
    "llama3": dict(rope_parameters=_rope("llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=16)),
    "longrope": dict(rope_parameters=_rope("longrope", short_factor=[1.0 + 0.1 * i for i in range(8)],
                                           long_factor=[2.0 + 0.5 * i for i in range(8)],
                                           original_max_position_embeddings=24),
                     max_position_embeddings=48),
    # llama's code ignores partial_rotary_factor with the default rope: every dim rotates (dims_of must agree)
    "partial": dict(rope_parameters=_rope("default", partial_rotary_factor=0.5)),
}


MOE = dict(num_experts_per_tok=2, intermediate_size=32)


def tiny_config(name: str):
    if name.startswith("llama-"):
        return transformers.LlamaConfig(**(COMMON | ROPES[name.removeprefix("llama-")]))
    if name == "mixtral":
        return transformers.MixtralConfig(**(COMMON | MOE), num_local_experts=4, sliding_window=None)
    if name == "qwen2_moe":  # q/k/v biases, a shared expert
        return transformers.Qwen2MoeConfig(**(COMMON | MOE), num_experts=4, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=48)
    if name == "qwen3_moe":  # per-head q/k norms
        return transformers.Qwen3MoeConfig(**(COMMON | MOE), head_dim=16, num_experts=4, moe_intermediate_size=32)
    if name == "granite":
        return transformers.GraniteConfig(**COMMON, attention_multiplier=0.3, embedding_multiplier=3.0,
                                          residual_multiplier=0.5, logits_scaling=2.0)
    if name == "smollm3":  # RoPE off on every fourth layer (layer 3)
        return transformers.SmolLM3Config(**(COMMON | dict(num_hidden_layers=4)), no_rope_layer_interval=4)
    if name == "gpt_oss":  # attention sinks, alternating sliding window (32), biases, 4 experts
        return transformers.GptOssConfig(**(COMMON | MOE), num_local_experts=4, head_dim=16, sliding_window=32,
                                         attention_bias=True)
    raise ValueError(name)


def build(name: str, path, seed: int = 0):
    return save_random(tiny_config(name), path, seed)


NAMES = [f"llama-{r}" for r in ROPES] + ["granite", "smollm3", "gpt_oss"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_like")
    built = {}

    def get(name):
        if name not in built:
            built[name] = build(name, root / name)
        return built[name]

    return get


def _ids(n: int = 40) -> torch.Tensor:
    return torch.tensor([[1] + [4 + (7 * i) % 90 for i in range(n - 1)]])


@torch.no_grad()
def _per_step_recompute(model, seq: torch.Tensor, prompt: int) -> torch.Tensor:
    """Step logits of uncached decoding the literal way: the whole prefix recomputed from scratch at every step
    (for rope types whose frequencies depend on the sequence length, one forward over the final sequence is not it)."""
    return torch.stack([model(seq[:, :t], use_cache=False).logits[0, -1] for t in range(prompt, seq.shape[1])])[None]


@torch.no_grad()
def check_cached_equals_uncached(model, ids: torch.Tensor, n_new: int, per_token: int) -> float:
    """Greedy generate() with the shared cache against uncached decoding recomputed from scratch at every step: same
    step logits and tokens, and the cache holds exactly the arithmetic. Returns max |Δlogit|."""
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                         do_sample=False, return_dict_in_generate=True, output_logits=True)
    held = ids.shape[1] + n_new - 1  # the last token is sampled, never fed back
    cache = output_cache(gen)
    assert cache.get_seq_length() == held and cache_bytes(cache) == held * per_token
    cached = torch.stack(gen.logits, 1)  # (1, n_new, vocab)
    uncached = _per_step_recompute(model, gen.sequences, ids.shape[1])
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)
    gap = (cached - uncached).abs().max().item()
    uncached[..., model.generation_config.eos_token_id] = float("-inf")  # min_new_tokens suppresses EOS
    assert (uncached.argmax(-1) == gen.sequences[:, ids.shape[1]:]).all()
    return gap


def check_family(name: str, src, tmp_path, modes=(("k=v", None), ("q=k", None), ("q=k=v", None), (None, 1)),
                 calibrated=(("k=v", 1),), export=("k=v", None), n_new=6, full=True):
    orig, tok = qkvconv.load(src)
    spec = spec_for(orig.config.model_type)
    dims = dims_of(orig.config, spec)
    rotary = next((m for n, m in orig.named_modules() if n.endswith("rotary_emb")), None)
    if rotary is not None:  # dims_of's rotary_dim is the width the model's own RoPE really rotates
        cos, _ = rotary(torch.zeros(1), torch.arange(4)[None])
        assert dims.rotary_dim == cos.shape[-1] * (2 if spec.rope_table == "half" else 1), (dims.rotary_dim, cos.shape)
    ids = _ids()
    # 1. absorb-query exact (float64 algebra) and drop
    r = absorb_query_checkpoint(src, tmp_path / "aq", **FAST)
    assert r.exactness.passed
    print(f"\n{name}: absorb-query exact float64 max|Δlogit| {r.exactness.algebraic_max_abs:.2e} "
          f"(fp32 {r.error.max_abs:.2e})")
    if full:
        dropped = absorb_query_checkpoint(src, tmp_path / "aq-drop", mode="drop", **FAST)
        qkvconv.load(tmp_path / "aq-drop")
        # 2. attach at step 0
        qm = attach_query_mlp_checkpoint(src, tmp_path / "qm", **FAST)
        pp = attach_preproj_checkpoint(src, tmp_path / "pp", **FAST)
        assert qm.exactness.passed and pp.exactness.passed
        print(f"{name}: drop KL {dropped.error.kl:.3f}; at step 0 float64 max|Δlogit| attach-query-mlp "
              f"{qm.exactness.algebraic_max_abs:.2e}, attach-preproj {pp.exactness.algebraic_max_abs:.2e}")
        # 4. plain transformers loads what qkvconv loads
        for out in ("aq", "pp"):
            plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / out, trust_remote_code=True).eval()
            mine, _ = qkvconv.load(tmp_path / out)
            with torch.no_grad():
                torch.testing.assert_close(plain(ids).logits, mine(ids).logits, atol=1e-5, rtol=1e-5)
    # 3. share-kv
    base = kv_cache_bytes_per_token(orig.config, spec, torch.float32)
    prompt = tok(["The quick brown fox"], return_tensors="pt").input_ids
    for init, cases in (("key", modes), ("calibrated", calibrated)):
        for mode, kvh in cases:
            out = tmp_path / f"skv-{init}-{mode}-{kvh}"
            rep = share_kv_checkpoint(src, out, mode=mode, kv_heads=kvh, init=init, **FAST)
            model, _ = qkvconv.load(out)
            per_token = kv_cache_bytes_per_token(model.config, spec, torch.float32)
            assert per_token == rep.options["kv_cache_bytes_per_token"]["after"]
            gap = check_cached_equals_uncached(model, prompt, n_new, per_token)
            print(f"{name} share-kv {mode} kv_heads={kvh} init={init}: KL {rep.error.kl:.3f}, cache {base} -> "
                  f"{per_token} B/token, cached vs per-step uncached max|Δlogit| {gap:.1e}")
    mode, kvh = export
    share_kv_checkpoint(src, tmp_path / "stock", mode=mode, kv_heads=kvh, export="stock", **FAST)
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    remote, _ = qkvconv.load(tmp_path / f"skv-key-{mode}-{kvh}")
    with torch.no_grad():
        err = (stock(ids).logits - remote(ids).logits).abs().max().item()
    print(f"{name} share-kv {mode} kv_heads={kvh} --export stock vs shared-cache model: max|Δlogit| {err:.2e}")
    assert err < 1e-4
    # 5. inspect
    res = CliRunner().invoke(app, ["inspect", str(src)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    info = json.loads(CliRunner().invoke(app, ["inspect", str(tmp_path / f"skv-key-{mode}-{kvh}"), "--json"]).stdout)
    assert info["kv_cache_bytes_per_token"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_family(tiny, tmp_path, name):
    check_family(name, tiny(name), tmp_path)


@torch.no_grad()
def _generate(model, prompt, n_new):
    gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, min_new_tokens=n_new,
                         do_sample=False, return_dict_in_generate=True, output_logits=True)
    return gen.sequences, torch.stack(gen.logits, 1)


@pytest.mark.parametrize("name", ["llama-dynamic", "llama-longrope"])
def test_rope_beyond_original_length(tiny, tmp_path, name):
    """Frequencies that change with the sequence length: past original_max_position_embeddings no KV cache (the
    family's own included) equals recomputing the prefix at every step, since cached states were computed with the
    old frequencies. Modes that cache post-RoPE keys (q=k, pooled heads) decode exactly like the --export stock
    model runs in the family's own code; k=v caches S pre-RoPE and rotates every key at the current frequencies."""
    src = tiny(name)
    prompt, n_new = _ids(19), 14  # decodes to 32 tokens, past the original 24
    for mode, kvh in (("q=k", None), (None, 1), ("k=v", None)):
        share_kv_checkpoint(src, tmp_path / "remote", mode=mode, kv_heads=kvh, force=True, **FAST)
        share_kv_checkpoint(src, tmp_path / "stock", mode=mode, kv_heads=kvh, export="stock", force=True, **FAST)
        remote, _ = qkvconv.load(tmp_path / "remote")
        stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
        seq, cached = _generate(remote, prompt, n_new)
        seq_s, cached_s = _generate(stock, prompt, n_new)
        gap = (cached - _per_step_recompute(remote, seq, prompt.shape[1])).abs().max().item()
        gap_s = (cached_s - _per_step_recompute(stock, seq_s, prompt.shape[1])).abs().max().item()
        vs_stock = (cached - cached_s).abs().max().item()
        print(f"\n{name} {mode} kv_heads={kvh}: cached vs per-step recompute max|Δlogit| {gap:.2e} (stock export "
              f"{gap_s:.2e}); cached shared-cache vs cached stock {vs_stock:.2e}")
        if mode != "k=v":
            assert vs_stock < 1e-4 and seq.tolist() == seq_s.tolist()
        assert gap_s > 1e-3  # the frequencies did change within the decoded length
