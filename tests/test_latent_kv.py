"""latent-kv: full rank is the original (float64), a low-rank latent model is the stock model with the composed
low-rank K/V weights, its cache holds only the latent (measured bytes = arithmetic), cached = uncached decoding,
plain transformers with remote code = qkvconv.load, the rank allocation, refusals, CLI. --rope-pairs (MHA2MLA): every
pair kept at full rank is the original (float64), its cache holds r + 2P·G values, the pair selection, and the
absorbed decode paths of both variants equal rebuilding keys and values (float64)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

import qkvconv
from qkvconv.archs import dims_of, spec_for
from qkvconv.archs.layout import read_qkv
from qkvconv.cli import app
from qkvconv.compat import cache_argument, output_cache
from qkvconv.convert import latent_kv_checkpoint
from qkvconv.describe import kv_cache_bytes_per_token
from qkvconv.errors import QkvconvError, TransformError
from qkvconv.archs.layout import Proj
from qkvconv.transforms.latent_kv import (_group_weights, allocate_ranks, full_rank, kept_energy,
                                          latent_kv_layer, layer_spectrum, rope_pair_scores, select_rope_pairs)
from test_share_kv import _check_cached_equals_uncached

FAST = dict(num_seqs=5, seq_len=32, calib="sample")  # text the random model itself writes; 4 fit, 1 held out
FAMILIES3 = ("llama", "qwen2", "mistral")  # mistral: sliding-window config; qwen2: q/k/v biases


def _dims(path):
    from qkvconv.checkpoint import load

    loaded = load(path)
    spec = spec_for(loaded.model.config.model_type)
    return loaded, spec, dims_of(loaded.model.config, spec)


# ------------------------------------------------------------------------------------------ continuity
@pytest.mark.parametrize("family_", [*FAMILIES3, "qwen3", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("groups", [1, 2])
def test_full_rank_is_the_original_in_float64(tiny_models, tmp_path, family_, groups):
    src = tiny_models[family_]
    loaded, spec, dims = _dims(src)
    tok = loaded.tokenizer
    if dims.num_key_value_heads % groups:
        pytest.skip("groups must divide the KV heads")
    out = tmp_path / "full"
    latent_kv_checkpoint(src, out, kv_rank=full_rank(dims, groups), groups=groups, dtype=torch.float64, **FAST)
    conv, _ = qkvconv.load(out, dtype=torch.float64)
    ref, _ = qkvconv.load(src, dtype=torch.float64)
    assert any(type(m).__name__ == "LatentKVAttention" for m in conv.modules())
    ids = tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ref(ids).logits, conv(ids).logits
    err = (a - b).abs().max().item()
    print(f"{family_} groups={groups}: full rank {full_rank(dims, groups)}, float64 max |Δlogit| {err:.2e} "
          f"(max |logit| {a.abs().max().item():.2f})")
    assert err < 1e-10 * max(1.0, a.abs().max().item())


# ---------------------------------------------------------------------------- the latent is what it says
def test_low_rank_model_equals_stock_model_with_composed_weights(tiny_models, tmp_path):
    """keys = RoPE(c·B_K + b_K) with c = h·A: the same as the stock model (plain transformers, no remote code) whose
    k_proj is A·B_K (bias b_K) and v_proj A·B_V: rebuilt, THEN rotated."""
    import transformers
    from safetensors.torch import load_file

    out = tmp_path / "r12"
    latent_kv_checkpoint(tiny_models["qwen2"], out, kv_rank=12, **FAST)
    model, tok = qkvconv.load(out)
    sd = load_file(out / "model.safetensors")
    stock_sd = {}
    for k, t in sd.items():
        if ".kv_a_proj." in k or ".k_b_proj." in k or ".v_b_proj." in k:
            continue
        stock_sd[k] = t
    for i in range(model.config.num_hidden_layers):
        a = f"model.layers.{i}.self_attn."
        A = sd[a + "kv_a_proj.weight"].double().T  # (d, r)
        for new, b in (("k_proj", "k_b_proj"), ("v_proj", "v_b_proj")):
            stock_sd[a + new + ".weight"] = (A @ sd[a + b + ".weight"].double().T).T.float()
            stock_sd[a + new + ".bias"] = sd[a + b + ".bias"]
    config = transformers.AutoConfig.from_pretrained(tiny_models["qwen2"])
    stock = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    missing, unexpected = stock.load_state_dict(stock_sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family_", FAMILIES3)
def test_cache_holds_only_the_latent_and_cached_equals_uncached(tiny_models, tmp_path, family_):
    out = tmp_path / "r"
    report = latent_kv_checkpoint(tiny_models[family_], out, kv_rank=10, groups=2, rank_allocation="greedy", **FAST)
    model, tok = qkvconv.load(out)
    spec = spec_for(model.config.model_type)
    ranks = report.options["kv_ranks"]
    assert sum(ranks) == 10 * model.config.num_hidden_layers  # per-layer ranks may differ: one cache width each
    per_token = sum(ranks) * 4  # float32: r values per token and layer, nothing else
    assert kv_cache_bytes_per_token(model.config, spec, torch.float32) == per_token
    assert report.options["kv_cache_bytes_per_token"]["after"] == per_token
    assert report.decoding is not None and report.decoding.passed
    ids = tok(["The quick brown fox"], return_tensors="pt").input_ids
    _check_cached_equals_uncached(model, ids, 8, per_token)  # measured cache bytes = held tokens × per_token


def test_grouped_latent_rebuilds_keys_per_group_as_the_dense_block_diagonal_weights(tiny_models, tmp_path):
    """--groups records each layer's group ranks; the modeling then rebuilds each group's keys from its own latent
    slice (fewer products). The same weights read as one dense latent (no "group_ranks") give the same model: the
    off-diagonal blocks are zeros. Compared in float64, prefill and cached decoding."""
    out = tmp_path / "g2"
    report = latent_kv_checkpoint(tiny_models["qwen2"], out, kv_rank=9, groups=2, dtype=torch.float64, **FAST)
    block = json.loads((out / "config.json").read_text())["qkvconv"]
    group_ranks = [layer["kv_latent"]["group_ranks"] for layer in block["layers"]]
    assert [sum(r) for r in group_ranks] == report.options["kv_ranks"] and all(len(r) == 2 for r in group_ranks)
    assert all(r == [5, 4] for r in group_ranks), group_ranks  # uneven: the blocks are not one batched product
    grouped, tok = qkvconv.load(out)
    for layer in block["layers"]:
        del layer["kv_latent"]["group_ranks"]
    config = json.loads((out / "config.json").read_text())
    config["qkvconv"] = block
    (out / "config.json").write_text(json.dumps(config))
    dense, _ = qkvconv.load(out)
    assert all(m.group_ranks is None for m in dense.modules() if hasattr(m, "group_ranks"))
    assert sum(m.group_ranks is not None for m in grouped.modules() if hasattr(m, "group_ranks")) == len(group_ranks)
    ids = tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = grouped(ids).logits, dense(ids).logits
        err = (a - b).abs().max().item()
        ga = grouped.generate(ids, max_new_tokens=8, do_sample=False)
        gb = dense.generate(ids, max_new_tokens=8, do_sample=False)
    print(f"grouped vs dense rebuild, float64: max |Δlogit| {err:.2e}")
    assert err < 1e-10 * max(1.0, a.abs().max().item())
    assert torch.equal(ga, gb)


def test_plain_transformers_with_remote_code_equals_qkvconv_load(tiny_models, tmp_path):
    cases = {"llama": dict(kv_rank=8), "qwen2": dict(kv_rank=16), "gpt_neox": dict(kv_rank=24),
             "qwen2-rp": dict(kv_rank=12, rope_pairs=3), "gpt_neox-rp": dict(kv_rank=20, rope_pairs=2)}
    logits = {}
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    for name, kw in cases.items():
        latent_kv_checkpoint(tiny_models[name.split("-")[0]], tmp_path / name, **kw, **FAST)
        with torch.no_grad():
            logits[name] = qkvconv.load(tmp_path / name)[0](ids).logits
    script = textwrap.dedent(
        f"""
        import sys, torch, transformers
        out = {{}}
        for f in {list(cases)!r}:
            m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + f, trust_remote_code=True)
            assert any(type(x).__name__ == "LatentKVAttention" for x in m.modules()), f
            ids = torch.tensor({ids.tolist()!r})
            with torch.no_grad():
                out[f] = m(ids).logits
            g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                           do_sample=False)
            full = m(g, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
            full[..., m.generation_config.eos_token_id] = float("-inf")
            assert (full.argmax(-1) == g[:, ids.shape[1] :]).all(), f
        assert "qkvconv" not in sys.modules
        torch.save(out, {str(tmp_path / "remote.pt")!r})
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    remote = torch.load(tmp_path / "remote.pt")
    for f in cases:
        torch.testing.assert_close(remote[f], logits[f], atol=0, rtol=0)


# ---------------------------------------------------------------------------------- --rope-pairs (MHA2MLA)
ROPE_FAMILIES = ("llama", "qwen2", "mistral", "gpt_neox")  # gpt_neox: partial rotary (rotary_pct 0.5)


@pytest.mark.parametrize("family_", ROPE_FAMILIES)
def test_rope_pairs_all_pairs_at_full_rank_is_the_original_in_float64(tiny_models, tmp_path, family_):
    """Every rotary pair kept (as rotated keys) and the latent of the rest (partial rotary: the pass-through dims)
    and the values at full rank: the original model, with the query heads permuted to the kept layout."""
    src = tiny_models[family_]
    loaded, spec, dims = _dims(src)
    pairs = dims.rotary_dim // 2
    groups = 2 if family_ == "qwen2" else 1
    out = tmp_path / "full"
    latent_kv_checkpoint(src, out, kv_rank=full_rank(dims, groups, pairs), groups=groups, rope_pairs=pairs,
                         dtype=torch.float64, **FAST)
    conv, _ = qkvconv.load(out, dtype=torch.float64)
    ref, _ = qkvconv.load(src, dtype=torch.float64)
    assert all(m.rope_pairs is not None for m in conv.modules() if type(m).__name__ == "LatentKVAttention")
    ids = loaded.tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ref(ids).logits, conv(ids).logits
    err = (a - b).abs().max().item()
    print(f"{family_} --rope-pairs {pairs} (all), rank {full_rank(dims, groups, pairs)}: float64 max |Δlogit| {err:.2e}")
    assert err < 1e-10 * max(1.0, a.abs().max().item())


@pytest.mark.parametrize("family_", ROPE_FAMILIES)
def test_rope_pairs_cache_holds_latent_and_kept_pairs_and_cached_equals_uncached(tiny_models, tmp_path, family_):
    out = tmp_path / "rp"
    report = latent_kv_checkpoint(tiny_models[family_], out, kv_rank=8, rope_pairs=2, **FAST)
    model, tok = qkvconv.load(out)
    spec = spec_for(model.config.model_type)
    G, L = dims_of(model.config, spec).num_key_value_heads, model.config.num_hidden_layers
    per_token = L * (8 + 2 * 2 * G) * 4  # float32: r latent values + 2P rotated key dims per KV head, per layer
    assert kv_cache_bytes_per_token(model.config, spec, torch.float32) == per_token
    assert report.options["kv_cache_bytes_per_token"]["after"] == per_token
    assert report.decoding is not None and report.decoding.passed
    assert [len(p) for x in report.fit for p in x["rope_pairs"]] == [2] * (G * L)
    ids = tok(["The quick brown fox"], return_tensors="pt").input_ids
    _check_cached_equals_uncached(model, ids, 8, per_token)  # measured cache bytes = held tokens × per_token


@pytest.mark.parametrize("rope_pairs", [None, 2])
def test_absorbed_decode_equals_rebuilding_keys_and_values_in_float64(tiny_models, tmp_path, rope_pairs):
    """The decode path ((p·c)·B_V + m·b_V; with --rope-pairs also (q·B_Kᵀ)·cᵀ + q·b_K) against rebuilding every
    cached key and value and running the family's kernel, per attention layer output, prefill and cached steps."""
    out = tmp_path / "lk"
    latent_kv_checkpoint(tiny_models["qwen2"], out, kv_rank=10, rope_pairs=rope_pairs, dtype=torch.float64, **FAST)
    model, _ = qkvconv.load(out, dtype=torch.float64)
    attn = [m for m in model.modules() if type(m).__name__ == "LatentKVAttention"]
    outputs: dict = {}
    for m in attn:
        m.register_forward_hook(lambda mod, args, out: outputs.setdefault(mod.absorb, []).append(out[0]))
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    for absorb in (False, True):
        for m in attn:
            m.absorb = absorb
        with torch.no_grad():
            cache = output_cache(model(ids[:, :6], use_cache=True))
            for i in range(6, 10):
                model(ids[:, i:i + 1], use_cache=True, **cache_argument(model, cache))
    assert len(outputs[True]) == len(outputs[False]) == 5 * len(attn)
    for rebuilt, absorbed in zip(outputs[False], outputs[True]):
        torch.testing.assert_close(absorbed, rebuilt, atol=1e-12, rtol=1e-12)
    for m in attn:  # by default: absorbed while H·T < G·dh (4·T < 32 here), rebuilt for a longer prompt
        m.absorb = None
    calls = []
    for m in attn:
        m.register_forward_hook(lambda mod, args, out: calls.append(out[1] is not None))
    with torch.no_grad():  # (sdpa, the kernel qkvconv.load picks, returns no probabilities)
        cache = output_cache(model(ids, use_cache=True))
        model(ids[:, :1], use_cache=True, **cache_argument(model, cache))
    assert calls == [False] * len(attn) + [True] * len(attn)  # only the absorbed path returns its probabilities


def test_rope_pair_selection_by_two_norm_score():
    """score(g, i) = Σ_{h of g} E‖q_{h,i}‖·E‖k_{g,i}‖ over the rotary pairs (i, i + rotary/2); GQA sums a KV head's
    query heads; the top P per KV head are kept."""
    from qkvconv.archs import Dims

    dims = Dims(num_hidden_layers=1, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                rotary_dim=8)
    torch.manual_seed(0)
    q = Proj(torch.randn(16, 32, dtype=torch.float64) * 0.01, None)
    k = Proj(torch.randn(16, 16, dtype=torch.float64) * 0.01, None)
    k.W[:, [0 * 8 + 1, 0 * 8 + 5]] *= 300  # KV head 0, pair 1: big keys
    q.W[:, [8 + 2, 8 + 6]] *= 300  # query head 1 (KV head 0), pair 2: big queries
    k.W[:, [8 + 3, 8 + 7]] *= 300  # KV head 1, pair 3 ...
    q.W[:, [3 * 8 + 3, 3 * 8 + 7]] *= 300  # ... with big queries on query head 3 (KV head 1): the product wins
    q.W[:, [2 * 8 + 0, 2 * 8 + 4]] *= 100  # KV head 1, pair 0: big queries, small keys
    h = torch.randn(256, 16, dtype=torch.float64)
    scores = rope_pair_scores(q, k, dims, h)
    assert scores.shape == (2, 4)
    assert select_rope_pairs(scores, 2).tolist() == [[1, 2], [0, 3]]
    assert select_rope_pairs(scores, 1).tolist() == [[1], [3]]
    plain = rope_pair_scores(q, k, dims, None)  # without calibration: the weights' norms
    assert select_rope_pairs(plain, 1).tolist() == [[1], [3]]


@pytest.mark.parametrize("family_,kw,msg", [
    ("llama", dict(kv_rank=8, rope_pairs=9), "between 0 and the model's 8 rotary pairs per head"),
    # partial rotary: transformers 5.24 reloads the tiny config's 0.5 (4 pairs), 5.0 its default 0.25 (2 pairs)
    ("gpt_neox", dict(kv_rank=8, rope_pairs=5), r"[24] rotary pairs per head \([48] of its 16 dims rotate\)"),
    ("gpt2", dict(kv_rank=8, rope_pairs=1), "no RoPE: use --rope-pairs 0"),
    ("llama", dict(kv_rank=57, rope_pairs=2), r"exceeds the full rank 56 of \[W_K\^nope \| W_V\]"),
    ("qwen3", dict(kv_rank=8, rope_pairs=2), "normalises keys per head"),
])
def test_rope_pairs_refusals(tiny_models, tmp_path, family_, kw, msg):
    with pytest.raises(TransformError, match=msg):
        latent_kv_checkpoint(tiny_models[family_], tmp_path / "x", **kw, **FAST)
    assert not (tmp_path / "x").exists()


def test_rope_pairs_zero_on_a_model_without_rope_is_a_fully_absorbed_latent(tiny_models, tmp_path):
    """gpt2 (learned positions): --rope-pairs 0 caches the latent alone and decodes without rebuilding keys;
    cached = uncached."""
    out = tmp_path / "g0"
    latent_kv_checkpoint(tiny_models["gpt2"], out, kv_rank=12, rope_pairs=0, **FAST)
    model, tok = qkvconv.load(out)
    per_token = 12 * model.config.num_hidden_layers * 4
    assert kv_cache_bytes_per_token(model.config, spec_for(model.config.model_type), torch.float32) == per_token
    _check_cached_equals_uncached(model, tok(["The quick"], return_tensors="pt").input_ids, 6, per_token)


# ------------------------------------------------------------------------------------------------ the fit
def test_whitened_fit_beats_plain_svd_in_the_activation_norm(tiny_models):
    """Eckart–Young in the whitened space: on the calibration activations the activation-aware latent leaves less
    K/V error than the plain SVD of [W_K | W_V] at the same rank, and the error is exactly the dropped σ²."""
    from qkvconv.verify import attention_inputs, calibration_ids

    loaded, spec, dims = _dims(tiny_models["llama"])
    ids, _ = calibration_ids(loaded.model, loaded.tokenizer, calib="sample", num_seqs=4, seq_len=32)
    x = attention_inputs(loaded.model, spec, ids)[1].double()
    sd = {k: v.double() for k, v in loaded.model.state_dict().items()}
    _, k, v = read_qkv(sd, spec, dims, 1)
    W = _group_weights(k, v, dims, 1)[0]  # (d, 2·G·dh)

    def error(attn_input):
        res = latent_kv_layer(sd, spec, dims, 1, 12, attn_input)
        a = "model.layers.1.self_attn."
        A, Bk, Bv = (res.tensors[a + n + ".weight"].T for n in ("kv_a_proj", "k_b_proj", "v_b_proj"))
        return float((x @ W - x @ A @ torch.cat([Bk, Bv], 1)).pow(2).sum() / len(x))

    spectrum = layer_spectrum(sd, spec, dims, 1, x)[0]
    whitened, plain = error(x), error(None)
    print(f"E‖hW − hAB‖²: whitened {whitened:.4g}, plain SVD {plain:.4g}")
    assert whitened < plain
    assert whitened == pytest.approx(float(spectrum[12:].sum()), rel=1e-3)  # the ridge moves it by ~1e-6


# ----------------------------------------------------------------------------------------- rank allocation
def test_greedy_allocation_sums_keeps_floor_and_is_optimal():
    torch.manual_seed(0)
    heavy = torch.linspace(1.0, 0.5, 16)  # a flat spectrum: every rank matters
    light = 0.5 ** torch.arange(16.0)  # a steep one: a few ranks hold it all
    spectra = [[light], [heavy], [light * 3], [heavy * 0.1]]
    ranks = allocate_ranks(spectra, 6, min_rank=2)
    flat = [r[0] for r in ranks]
    assert sum(flat) == 4 * 6 and min(flat) >= 2
    assert flat[1] > flat[0] and flat[3] > flat[2]  # heavier spectra get more, whatever their scale
    assert flat[1] == flat[3] and flat[0] == flat[2]  # relative: a layer's scale does not matter

    def score(rs):
        return sum(kept_energy(s, [r]) for s, r in zip(spectra, rs))

    best = max(score(rs) for rs in itertools.product(range(2, 17), repeat=4) if sum(rs) == 24)
    assert score(flat) == pytest.approx(best)


def test_greedy_allocation_over_groups():
    spectra = [[torch.linspace(1, 0.5, 8), 0.5 ** torch.arange(8.0)], [0.5 ** torch.arange(8.0)] * 2]
    ranks = allocate_ranks(spectra, 6, min_rank=2)
    assert sum(map(sum, ranks)) == 12 and all(min(r) >= 1 for r in ranks)
    assert ranks[0][0] > ranks[0][1]


def test_checkpoint_reports_allocation(tiny_models, tmp_path):
    out = tmp_path / "g"
    report = latent_kv_checkpoint(tiny_models["llama"], out, kv_rank=16, rank_allocation="greedy", **FAST)
    record = json.loads((out / "qkvconv.json").read_text())["history"][-1]
    assert record["transform"] == "latent-kv" and record["rank_allocation"] == "greedy"
    assert record["kv_ranks"] == report.options["kv_ranks"] and sum(record["kv_ranks"]) == 32
    assert all(0 < e[0] < 1 for e in record["kept_energy"])
    uniform = latent_kv_checkpoint(tiny_models["llama"], None, kv_rank=16, **FAST)  # the default
    assert uniform.options["kv_ranks"] == [16, 16]


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kw,msg", [
    (dict(kv_rank=65), "exceeds the full rank 64"),
    (dict(kv_rank=8, groups=3), "must divide the model's 2 key/value heads"),
    (dict(kv_rank=1, groups=2), "below --groups 2"),
    (dict(kv_rank=8, rank_allocation="fisher"), "unknown --rank-allocation"),
])
def test_refusals(tiny_models, tmp_path, kw, msg):
    with pytest.raises(TransformError, match=msg):
        latent_kv_checkpoint(tiny_models["llama"], tmp_path / "x", **kw, **FAST)
    assert not (tmp_path / "x").exists()


def test_converted_checkpoint_refused(tiny_models, tmp_path):
    latent_kv_checkpoint(tiny_models["llama"], tmp_path / "a", kv_rank=8, **FAST)
    with pytest.raises(QkvconvError, match="already a qkvconv-converted"):
        latent_kv_checkpoint(tmp_path / "a", tmp_path / "b", kv_rank=8, **FAST)


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_latent_kv_and_recipe_step(tiny_models, tmp_path):
    from qkvconv.options import TRANSFORMS

    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["latent-kv", str(tiny_models["qwen2"]), "-o", str(out), "--kv-rank", "16",
                                 "--groups", "2", "--rank-allocation", "greedy", "--num-seqs", "5", "--seq-len", "32"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "KL (nats/token)" in result.stdout and "512 → 128 bytes/token" in result.stdout
    assert "ranks per layer (greedy, mean 16)" in result.stdout
    info = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert info["kv_cache_bytes_per_token"] == 128
    bad = runner.invoke(app, ["latent-kv", str(tiny_models["qwen2"]), "-o", str(tmp_path / "bad"), "--kv-rank", "0"])
    assert bad.exit_code == 1 and "--kv-rank" in bad.output and not (tmp_path / "bad").exists()
    assert TRANSFORMS["latent-kv"](kv_rank=192).kv_rank == 192  # a recipe's `- latent-kv: {kv_rank: 192}`
    rp = runner.invoke(app, ["latent-kv", str(tiny_models["llama"]), "-o", str(tmp_path / "rp"), "--kv-rank", "8",
                             "--rope-pairs", "2", "--num-seqs", "5", "--seq-len", "32"], env={"COLUMNS": "200"})
    assert rp.exit_code == 0, rp.output
    assert "RoPE pairs kept per KV head: 2" in rp.stdout and "512 → 128 bytes/token" in rp.stdout  # 2·(8 + 2·2·2)·4
    assert TRANSFORMS["latent-kv"](kv_rank=96, rope_pairs=16).rope_pairs == 16


# ------------------------------------------------------------------------------------------------- heal
def test_finetune_new_trains_only_the_latent_projections_and_lowers_the_loss(tiny_models, tmp_path):
    import random

    from safetensors.torch import load_file

    from qkvconv.finetune import FinetuneConfig, finetune

    rng = random.Random(0)
    words = "the cat sat on a mat and the dog ran to the park while small birds sang".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(400)))
    latent_kv_checkpoint(tiny_models["llama"], tmp_path / "r8", kv_rank=8, **FAST)
    res = finetune(tmp_path / "r8", tmp_path / "healed", FinetuneConfig(
        data=str(corpus), train="new", steps=8, seq_len=32, batch_size=4, lr=1e-2, eval_every=4, eval_seqs=4,
        save_every=0))
    print(f"latent rank 8, --train new: held-out {res.first_eval:.4f} -> {res.last_eval:.4f}")
    assert res.last_eval < res.first_eval
    before, after = load_file(tmp_path / "r8" / "model.safetensors"), load_file(tmp_path / "healed" / "model.safetensors")
    moved = {k for k in after if not torch.equal(before[k], after[k])}
    assert moved and all(any(m in k for m in (".kv_a_proj.", ".k_b_proj.", ".v_b_proj.")) for k in moved)
    model, tok = qkvconv.load(tmp_path / "healed")
    per_token = kv_cache_bytes_per_token(model.config, spec_for(model.config.model_type), torch.float32)
    assert per_token == 8 * 2 * 4
    _check_cached_equals_uncached(model, tok(["the cat"], return_tensors="pt").input_ids, 4, per_token)
