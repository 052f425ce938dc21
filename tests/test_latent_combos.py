"""latent-kv after share-kv (issue 16's combinations): the latent over the pooled heads' [W_K | W_V] (--kv-heads) or
over the shared W_S alone (k=v: keys and values rebuilt from one up-projection). Full rank is the share-kv model in
float64; below it the cache holds only the latent (measured bytes = arithmetic) and cached = uncached decoding;
what the latent attention cannot follow is refused in one line; a recipe runs the chain."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import qkvconv
from qkvconv.archs import dims_of, spec_for
from qkvconv.cli import app
from qkvconv.compat import cache_argument, output_cache
from qkvconv.convert import absorb_query_checkpoint, latent_kv_checkpoint, share_kv_checkpoint
from qkvconv.describe import kv_cache_bytes_per_token
from qkvconv.errors import TransformError
from qkvconv.recipe import RecipeError, parse_recipe
from test_share_kv import _check_cached_equals_uncached

FAST = dict(num_seqs=5, seq_len=32, calib="sample")  # text the random model itself writes; 4 fit, 1 held out
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])
# (share-kv mode, kv_heads) -> latent parts: 2 ([W_K | W_V] of the pooled heads), 1 (W_S alone)
CHAINS = {("k=v", None): 1, (None, 1): 2, ("k=v", 1): 1}


@pytest.fixture(scope="module")
def shared(tiny_models, tmp_path_factory):
    """The tiny llama (4 heads, 2 KV heads) after each share-kv of CHAINS, data-free init (fast)."""
    root = tmp_path_factory.mktemp("share")
    out = {}
    for mode, kv_heads in CHAINS:
        out[mode, kv_heads] = root / f"{mode}-{kv_heads}"
        share_kv_checkpoint(tiny_models["llama"], out[mode, kv_heads], mode=mode, kv_heads=kv_heads, init="mean",
                            **FAST)
    return out


def _kv_heads(mode, kv_heads, dims) -> int:
    return kv_heads or dims.num_key_value_heads


@pytest.mark.parametrize("chain", list(CHAINS), ids=lambda c: f"{c[0]}-{c[1]}")
def test_full_rank_after_share_kv_is_the_share_kv_model_in_float64(shared, tmp_path, chain):
    src = shared[chain]
    ref, _ = qkvconv.load(src, dtype=torch.float64)
    spec = spec_for(ref.config.model_type)
    dims = dims_of(ref.config, spec)
    N = _kv_heads(*chain, dims)
    full = CHAINS[chain] * N * dims.head_dim  # 2·N·dh for [W_K | W_V], N·dh for W_S
    out = tmp_path / "full"
    report = latent_kv_checkpoint(src, out, kv_rank=full, dtype=torch.float64, **FAST)
    conv, _ = qkvconv.load(out, dtype=torch.float64)
    assert conv.config.num_key_value_heads == N
    assert sum(type(m).__name__ == "LatentKVAttention" for m in conv.modules()) == dims.num_hidden_layers
    with torch.no_grad():
        a, b = ref(IDS).logits, conv(IDS).logits
    err = (a - b).abs().max().item()
    print(f"share-kv {chain} → latent-kv full rank {full}: float64 max |Δlogit| {err:.2e}")
    assert err < 1e-10 * max(1.0, a.abs().max().item())
    assert report.options["kv_cache_bytes_per_token"]["before"] == report.options["kv_cache_bytes_per_token"]["after"]
    with pytest.raises(TransformError, match="exceeds the full rank"):
        latent_kv_checkpoint(src, tmp_path / "over", kv_rank=full + 1, **FAST)


@pytest.mark.parametrize("chain", list(CHAINS), ids=lambda c: f"{c[0]}-{c[1]}")
def test_low_rank_after_share_kv_caches_only_the_latent(shared, tiny_models, tmp_path, chain):
    r = 6
    out = tmp_path / "r"
    report = latent_kv_checkpoint(shared[chain], out, kv_rank=r, **FAST)
    model, tok = qkvconv.load(out)
    spec = spec_for(model.config.model_type)
    per_token = r * model.config.num_hidden_layers * 4  # float32: r values per token and layer, nothing else
    assert kv_cache_bytes_per_token(model.config, spec, torch.float32) == per_token
    assert report.options["kv_cache_bytes_per_token"]["after"] == per_token
    assert report.decoding is not None and report.decoding.passed
    _check_cached_equals_uncached(model, IDS[:, :5], 8, per_token)  # measured cache bytes = held tokens × per_token
    sd = load_file(out / "model.safetensors")
    layer0 = "model.layers.0.self_attn."
    same = torch.equal(sd[layer0 + "k_b_proj.weight"], sd[layer0 + "v_b_proj.weight"])
    assert same == (CHAINS[chain] == 1)  # K=V: keys and values rebuilt from one up-projection
    assert not any(k.startswith(layer0) and k.split(".")[-2] in ("s_proj", "k_proj", "v_proj") for k in sd)


def test_k_eq_v_latent_is_the_share_kv_model_with_a_low_rank_shared_projection(shared, tmp_path):
    """After k=v, keys = RoPE(c·B + b_S) and values = c·B + b_S: exactly the share-kv model whose s_proj is A·B."""
    from qkvconv.convert import build_converted

    src = shared["k=v", None]
    out = tmp_path / "r5"
    latent_kv_checkpoint(src, out, kv_rank=5, dtype=torch.float64, **FAST)
    model, _ = qkvconv.load(out, dtype=torch.float64)
    ref, _ = qkvconv.load(src, dtype=torch.float64)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    lat = model.state_dict()
    for i in range(ref.config.num_hidden_layers):
        a = f"model.layers.{i}.self_attn."
        sd[a + "s_proj.weight"] = lat[a + "k_b_proj.weight"] @ lat[a + "kv_a_proj.weight"]  # (A·B)ᵀ = Bᵀ·Aᵀ
    composed = build_converted(ref.config, sd, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, composed(IDS).logits, atol=1e-9, rtol=1e-9)
        assert (model(IDS).logits - ref(IDS).logits).abs().max() > 1e-6  # rank 5 < 32: it did lose something


@pytest.mark.parametrize("family_", ["gpt2", "qwen3"])
def test_k_eq_v_then_full_rank_on_other_families(tiny_models, tmp_path, family_):
    """gpt2: fused Conv1D QKV and no num_key_value_heads setting (pooling is refused there, K=V is not); qwen3:
    per-head QK-norms, which share-kv moved under the attention and the latent keeps."""
    share_kv_checkpoint(tiny_models[family_], tmp_path / "kv", mode="k=v", init="mean", **FAST)
    ref, _ = qkvconv.load(tmp_path / "kv", dtype=torch.float64)
    dims = dims_of(ref.config, spec_for(ref.config.model_type))
    latent_kv_checkpoint(tmp_path / "kv", tmp_path / "full", kv_rank=dims.kv_size, dtype=torch.float64, **FAST)
    conv, _ = qkvconv.load(tmp_path / "full", dtype=torch.float64)
    with torch.no_grad():
        a, b = ref(IDS).logits, conv(IDS).logits
    assert (a - b).abs().max().item() < 1e-10 * max(1.0, a.abs().max().item())
    if family_ == "gpt2":
        share_kv_checkpoint(tiny_models[family_], tmp_path / "pool", kv_heads=1, init="mean", **FAST)
        with pytest.raises(TransformError, match="no num_key_value_heads"):
            latent_kv_checkpoint(tmp_path / "pool", tmp_path / "o", kv_rank=4, **FAST)


def test_what_the_latent_attention_cannot_follow_is_refused(tiny_models, tmp_path):
    src = tiny_models["llama"]
    share_kv_checkpoint(src, tmp_path / "qk", mode="q=k", init="mean", **FAST)
    with pytest.raises(TransformError, match="shared query") as e:
        latent_kv_checkpoint(tmp_path / "qk", tmp_path / "o1", kv_rank=4, **FAST)
    assert "\n" not in str(e.value)
    absorb_query_checkpoint(src, tmp_path / "abs", num_seqs=2, seq_len=16, calib="sample")
    with pytest.raises(TransformError, match="already a qkvconv-converted") as e:
        latent_kv_checkpoint(tmp_path / "abs", tmp_path / "o2", kv_rank=4, **FAST)
    assert "\n" not in str(e.value)
    latent_kv_checkpoint(src, tmp_path / "lat", kv_rank=8, **FAST)
    with pytest.raises(TransformError, match="already a qkvconv-converted"):
        latent_kv_checkpoint(tmp_path / "lat", tmp_path / "o3", kv_rank=4, **FAST)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_rope_pairs_after_share_kv_is_refused_at_both_depths(shared, tmp_path):
    """The command refuses before calibrating; a library call of the layer transform refuses the same way."""
    from qkvconv.checkpoint import qkvconv_block, resolve_source
    from qkvconv.stream import open_plan
    from qkvconv.transforms.latent_kv import latent_kv_layer

    src = shared["k=v", None]
    with pytest.raises(TransformError, match="--rope-pairs needs a stock checkpoint, not a share-kv output") as e:
        latent_kv_checkpoint(src, tmp_path / "o", kv_rank=8, rope_pairs=2, **FAST)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()
    plan = open_plan(resolve_source(src))
    layer = {k: plan.tensors.get(k).double() for k in plan.layer_keys(0)}
    entry = qkvconv_block(plan.config)["layers"][0]
    with pytest.raises(TransformError, match="layer 0: --rope-pairs needs a stock checkpoint, not a share-kv output"):
        latent_kv_layer(layer, plan.spec, plan.dims, 0, 8, None, rope_pairs=2, entry=entry)


def test_cli_chain_and_greedy_allocation(shared, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["latent-kv", str(shared[None, 1]), "--output", str(out), "--kv-rank", "8",
                                   "--rank-allocation", "greedy", "--num-seqs", "5", "--seq-len", "32",
                                   "--calib", "sample"])
    assert res.exit_code == 0, res.output
    model, _ = qkvconv.load(out)
    ranks = [b["kv_latent"]["rank"] for b in model.config.qkvconv["layers"]]
    assert sum(ranks) == 8 * model.config.num_hidden_layers and model.config.num_key_value_heads == 1


RECIPE = """
name: combo
base: {base}
seed: 0
device: cpu
eval: {{tasks: [lambada_openai], limit: 2}}
variants:
  - name: v
    steps:
{steps}
"""


@pytest.mark.parametrize("steps, problem", [
    (["share-kv: {mode: k=v}", "latent-kv: {kv_rank: 8}"], None),
    (["latent-kv: {kv_rank: 8}"], None),
    (["latent-kv: {kv_rank: 8}", "share-kv: {mode: k=v}"], "share-kv needs a stock checkpoint"),
    (["absorb-query", "latent-kv: {kv_rank: 8}"], "latent-kv needs a stock or share-kv checkpoint"),
    (["latent-kv: {kv_rank: 8}", "attach-query-mlp"], "cannot follow latent-kv"),
    (["share-kv: {kv_heads: 1}", "latent-kv: {kv_rank: 8}", "latent-kv: {kv_rank: 4}"], "applies once"),
])
def test_recipe_chains(steps, problem):
    text = RECIPE.format(base="default", steps="\n".join(f"      - {s}" for s in steps))
    if problem is None:
        recipe = parse_recipe(text)
        assert [s.transform for s in recipe.variants[0].steps] == [s.split(":")[0] for s in steps]
    else:
        with pytest.raises(RecipeError, match=problem):
            parse_recipe(text)


def test_recipe_runs_the_chain(tiny_models, tmp_path):
    """The runner's convert steps build share-kv then latent-kv on its output (the eval is left to test_runner)."""
    from qkvconv.runner import Runner, make_plan

    text = RECIPE.format(base=tiny_models["llama"], steps="      - share-kv: {kv_heads: 1, init: mean}\n"
                                                           "      - latent-kv: {kv_rank: 8, num_seqs: 5, seq_len: 32, "
                                                           "calib: sample}")
    recipe = parse_recipe(text.replace("share-kv: {kv_heads: 1, init: mean}",
                                       "share-kv: {kv_heads: 1, init: mean, num_seqs: 5, seq_len: 32, calib: sample}"))
    plan = make_plan(recipe)
    runner = Runner(plan, tmp_path / "run", text)
    converts = [s for s in plan.steps if s.kind == "convert"]
    assert [s.options["transform"] for s in converts] == ["share-kv", "latent-kv"]
    runner.steps_dir.mkdir(parents=True)
    for s in converts:
        tmp = runner.steps_dir / f".tmp-{s.dirname}"
        tmp.mkdir()
        runner._convert(s, tmp)
        tmp.rename(runner.steps_dir / s.dirname)
    model, _ = qkvconv.load(runner.model_path(converts[-1].key))
    spec = spec_for(model.config.model_type)
    assert model.config.num_key_value_heads == 1
    assert kv_cache_bytes_per_token(model.config, spec, torch.float32) == 8 * model.config.num_hidden_layers * 4


def test_absorbed_decode_with_attention_sinks_and_value_bias_equals_rebuilding(tmp_path):
    """gpt_oss (learned per-head sinks, v bias, alternating sliding window): the absorbed decode path adds m·b_V with m
    the softmax row mass left after the sink, which must equal rebuilding every cached value (sink-free rows would
    pass with m = 1 as well, so the sinks are made large enough to take a real share of the mass)."""
    from safetensors.torch import save_file
    from test_families_llama_like import build

    src = build("gpt_oss", tmp_path / "oss")
    weights = load_file(src / "model.safetensors")
    sinks = [k for k in weights if k.endswith("self_attn.sinks")]
    v_bias = [k for k in weights if k.endswith("v_proj.bias")]
    assert sinks and v_bias
    g = torch.Generator().manual_seed(0)
    for k in sinks:  # logits of the order of q·k: a sink that takes 5-60 % of each row
        weights[k] = 1.5 * torch.randn(weights[k].shape, generator=g)
    for k in v_bias:
        weights[k] = 0.5 * torch.randn(weights[k].shape, generator=g)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "lk"
    latent_kv_checkpoint(src, out, kv_rank=12, **FAST)  # float32: the family's MoE kernel (grouped_mm) has no float64
    model, _ = qkvconv.load(out, dtype=torch.float32)
    attn = [m for m in model.modules() if type(m).__name__ == "LatentKVAttention"]
    assert attn and all(hasattr(m, "sinks") for m in attn)
    outputs: dict = {}
    for m in attn:
        m.register_forward_hook(lambda mod, args, out: outputs.setdefault(mod.absorb, []).append(out[0]))
    for absorb in (False, True):
        for m in attn:
            m.absorb = absorb
        with torch.no_grad():
            cache = output_cache(model(IDS[:, :6], use_cache=True))
            for i in range(6, IDS.shape[1]):
                model(IDS[:, i:i + 1], use_cache=True, **cache_argument(model, cache))
    assert len(outputs[True]) == len(outputs[False]) == (1 + IDS.shape[1] - 6) * len(attn)
    for rebuilt, absorbed in zip(outputs[False], outputs[True]):
        torch.testing.assert_close(absorbed, rebuilt, atol=1e-5, rtol=1e-5)


def test_float64_on_a_family_without_float64_kernels_is_refused_with_the_reason(tmp_path):
    """gpt_oss's experts run transformers' grouped_mm, which has no float64: latent-kv --dtype float64 fails its decode
    check, and the one line says why and what to do, not only the kernel's message; nothing is written."""
    from test_families_llama_like import build

    src = build("gpt_oss", tmp_path / "oss")
    out = tmp_path / "lk64"
    r = CliRunner().invoke(app, ["latent-kv", str(src), "-o", str(out), "--kv-rank", "12", "--dtype", "float64",
                                 "--num-seqs", "5", "--seq-len", "32", "--calib", "sample", "--decode-check", "always"])
    assert r.exit_code != 0
    line = r.output.strip().splitlines()[-1] if r.output.strip() else ""
    print(line)
    assert "cannot run in float64" in r.output and "--dtype float32" in r.output, r.output
    assert not out.exists()
