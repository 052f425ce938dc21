"""latent-kv --rank-allocation kl (issue 16): the measured per-layer KL equals an independent in-memory measurement,
the exchange picks the least summed KL at mean kv_rank (brute force agrees), a layer made sensitive gets more rank,
full rank everywhere is still the original (float64), the memory refusal, the CLI."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from typer.testing import CliRunner

import qkvconv
from qkvconv.archs import dims_of, spec_for
from qkvconv.cli import app
from qkvconv.convert import latent_kv_checkpoint
from qkvconv.errors import TransformError
from qkvconv.transforms.latent_kv import allocate_ranks_by_kl, full_rank, latent_kv_layer, rank_ladder
from common import save_random, tiny_config

FAST = dict(num_seqs=10, seq_len=32, calib="sample")  # text the random model itself writes; 8 fit, 2 held out


# ------------------------------------------------------------------------------------------- the choice
def test_rank_ladder():
    assert rank_ladder(128, 384) == [64, 96, 128, 160, 192, 256]
    assert rank_ladder(128, 200) == [64, 96, 128, 160, 192, 200]  # capped at the full rank
    assert rank_ladder(10, 64, groups=2) == [4, 8, 10, 12, 16, 20]  # multiples of the groups (and kv_rank itself)
    assert rank_ladder(9, 64, groups=2) == [4, 6, 8, 9, 12, 14, 18]
    assert rank_ladder(64, 64) == [32, 48, 64]
    assert rank_ladder(1, 64) == [1, 2]


def test_kl_allocation_is_the_least_summed_kl_at_mean_kv_rank():
    rng = random.Random(0)
    for trial in range(30):
        n, kv_rank = rng.randint(1, 5), rng.choice([4, 8, 10])
        ladder = rank_ladder(kv_rank, 2 * kv_rank)
        # decreasing in the rank, like a real measurement, but with layers of very different scales
        kl = []
        for _ in range(n):
            scale = 10 ** rng.uniform(-3, 1)
            kl.append({r: scale * rng.uniform(0.5, 1.5) * 2.0 ** (-r / kv_rank) for r in ladder})
        ranks = allocate_ranks_by_kl(kl, kv_rank)
        assert sum(ranks) == n * kv_rank and all(r in ladder for r in ranks)
        best = min(sum(k[r] for k, r in zip(kl, rs)) for rs in itertools.product(ladder, repeat=n)
                   if sum(rs) == n * kv_rank)
        assert sum(k[r] for k, r in zip(kl, ranks)) == pytest.approx(best, rel=1e-12)
    # the clear case: the sensitive layer takes rank from the insensitive ones
    kl = [{4: 1.0, 8: 0.5, 12: 0.1}, {4: 0.011, 8: 0.01, 12: 0.009}, {4: 0.011, 8: 0.01, 12: 0.009}]
    assert allocate_ranks_by_kl(kl, 8) in ([12, 4, 8], [12, 8, 4])
    with pytest.raises(TransformError, match="averages --kv-rank 9"):
        allocate_ranks_by_kl([{4: 1.0, 8: 0.5}], 9)


# -------------------------------------------------------------------------------------- the measurement
def _model(tmp_path, layers=4, sensitive=None):
    """A tiny llama with `layers` layers; with `sensitive`, every OTHER layer's W_O is scaled by 0.01 (their attention
    output, so their K/V, barely matters), which makes compressing layer `sensitive` hurt the most."""
    config = tiny_config("llama")
    config.num_hidden_layers = layers
    path = save_random(config, tmp_path / f"llama{layers}-{sensitive}")
    if sensitive is not None:
        from safetensors.torch import load_file, save_file

        sd = load_file(path / "model.safetensors")
        for i in range(layers):
            if i != sensitive:
                sd[f"model.layers.{i}.self_attn.o_proj.weight"] *= 0.01
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_measured_kl_equals_one_compressed_layer_in_plain_transformers(tmp_path):
    """KL_i(r) from the streamed pass = the KL of the stock model (plain transformers) whose layer i alone has
    k_proj = A·B_K, v_proj = A·B_V (its rank-r latent, fitted on the same attention inputs), every other layer
    original (reconstruct-then-rotate is that model: test_latent_kv.py)."""
    import transformers

    from qkvconv.checkpoint import resolve_source
    from qkvconv.sensitivity import layer_sensitivity
    from qkvconv.stream import open_plan
    from qkvconv.verify import attention_inputs

    path = _model(tmp_path, layers=3)
    plan = open_plan(resolve_source(str(path)))
    torch.manual_seed(0)
    ids = torch.randint(3, 99, (6, 24))
    fit, probe = [0, 1, 2, 3, 4], [1, 4]
    ranks = [8, 20, 40, 64]  # 64: the full rank

    def candidates(sd, i, x):
        return {r: latent_kv_layer(sd, plan.spec, plan.dims, i, r, x) for r in ranks}

    from qkvconv.convert import _converted

    kl, timings = layer_sensitivity(plan, ids, fit, probe, candidates,
                                    lambda entries: _converted(plan, entries, torch.float32))
    assert set(timings) >= {"original", "candidates", "logits", "total"}

    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    spec = spec_for(model.config.model_type)
    dims = dims_of(model.config, spec)
    X = attention_inputs(model, spec, ids[fit])
    sd = {k: v.double() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(ids[probe]).logits.double().log_softmax(-1)
    for i in range(3):
        for r in ranks:
            new = latent_kv_layer(sd, spec, dims, i, r, X[i]).tensors
            a = f"model.layers.{i}.self_attn."
            A = new[a + "kv_a_proj.weight"].T  # (d, r)
            stock = {k: v.clone() for k, v in model.state_dict().items()}
            for proj, b in (("k_proj", "k_b_proj"), ("v_proj", "v_b_proj")):
                stock[a + proj + ".weight"] = (A @ new[a + b + ".weight"].T).T.float()
            one = transformers.AutoModelForCausalLM.from_config(model.config, attn_implementation="eager").eval()
            one.load_state_dict(stock)
            with torch.no_grad():
                out = one(ids[probe]).logits.double().log_softmax(-1)
            direct = float((ref.exp() * (ref - out)).sum(-1).mean())
            assert kl[i][r] == pytest.approx(direct, rel=1e-3, abs=1e-7), (i, r)
        assert kl[i][8] > kl[i][20] > kl[i][40] > 1e-3  # more rank, less KL: the measurement is not flat
        assert kl[i][64] < 1e-8  # full rank: the original up to float32 rounding


@pytest.mark.parametrize("sensitive", [1, 3])
def test_a_layer_made_sensitive_gets_more_rank(tmp_path, sensitive):
    path = _model(tmp_path, layers=4, sensitive=sensitive)
    out = tmp_path / "kl"
    report = latent_kv_checkpoint(path, out, kv_rank=16, rank_allocation="kl", kl_probe_seqs=4, **FAST)
    ranks = report.options["kv_ranks"]
    record = json.loads((out / "qkvconv.json").read_text())["history"][-1]
    sens = record["kl_sensitivity"]
    print("ranks", ranks, "KL at kv_rank per layer", [k[sens["ladder"].index(16)] for k in sens["per_layer"]])
    assert sum(ranks) == 4 * 16 and record["kv_ranks"] == ranks and record["rank_allocation"] == "kl"
    others = ranks[:sensitive] + ranks[sensitive + 1:]
    assert ranks[sensitive] > 16 and ranks[sensitive] > max(others)
    assert sens["ladder"] == [8, 12, 16, 20, 24, 32] and len(sens["per_layer"]) == 4
    at = sens["ladder"].index(16)
    assert sens["per_layer"][sensitive][at] == max(k[at] for k in sens["per_layer"])  # the measurement saw it
    assert sens["probe"] == "4 fitting sequences × 32 tokens"
    assert sens["summed"]["chosen"] < sens["summed"]["uniform"]  # what the choice minimised
    assert sens["summed"]["chosen"] == pytest.approx(sum(k[sens["ladder"].index(r)]
                                                         for k, r in zip(sens["per_layer"], ranks)))
    uniform = latent_kv_checkpoint(path, None, kv_rank=16, **FAST)
    print(f"held-out KL: uniform {uniform.error.kl:.4f}, kl {report.error.kl:.4f}")
    assert report.error.kl < uniform.error.kl  # on the held-out sequences, which the probes never saw


def test_kl_allocation_at_full_rank_is_the_original_in_float64(tiny_models, tmp_path):
    src = tiny_models["qwen2"]
    loaded = qkvconv.checkpoint.load(src)
    spec = spec_for(loaded.model.config.model_type)
    top = full_rank(dims_of(loaded.model.config, spec))
    out = tmp_path / "full"
    report = latent_kv_checkpoint(src, out, kv_rank=top, rank_allocation="kl", dtype=torch.float64, **FAST)
    assert report.options["kv_ranks"] == [top, top]
    conv, tok = qkvconv.load(out, dtype=torch.float64)
    ref, _ = qkvconv.load(src, dtype=torch.float64)
    ids = tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ref(ids).logits, conv(ids).logits
    assert (a - b).abs().max().item() < 1e-10 * max(1.0, a.abs().max().item())


def test_kl_refusals(tiny_models, tmp_path, monkeypatch):
    import qkvconv.convert as convert

    with pytest.raises(TransformError, match="--kl-probe-seqs 2: .* with --rank-allocation kl only"):
        latent_kv_checkpoint(tiny_models["llama"], tmp_path / "x", kv_rank=8, kl_probe_seqs=2, **FAST)
    monkeypatch.setattr(convert, "_available_memory", lambda: 1 << 16)  # 64 KiB: the probes need 2·6·128·64·4 B = 393 KB
    with pytest.raises(TransformError, match=r"probe hidden states \(2 layers × 6 ranks × 4×32 tokens\), more than "
                                             r"50% of the free memory"):
        latent_kv_checkpoint(tiny_models["llama"], tmp_path / "x", kv_rank=16, rank_allocation="kl", **FAST)
    assert not (tmp_path / "x").exists()


def test_cli_rank_allocation_kl(tiny_models, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["latent-kv", str(tiny_models["qwen2"]), "-o", str(out), "--kv-rank", "16",
                                 "--groups", "2", "--rank-allocation", "kl", "--kl-probe-seqs", "2",
                                 "--num-seqs", "5", "--seq-len", "32"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "ranks per layer (kl, mean 16)" in result.stdout and "KL (nats/token)" in result.stdout
    assert "measured per-layer KL (2 fitting sequences × 32 tokens), summed: " in result.stdout
    record = json.loads((out / "qkvconv.json").read_text())["history"][-1]
    assert record["options"]["kl_probe_seqs"] == 2 and record["kl_sensitivity"]["probe"].startswith("2 fitting")
    assert all(len(g) == 2 for g in record["group_ranks"])
    bad = runner.invoke(app, ["latent-kv", str(tiny_models["qwen2"]), "-o", str(tmp_path / "bad"), "--kv-rank", "16",
                              "--rank-allocation", "kl", "--kl-probe-seqs", "0"])
    assert bad.exit_code == 1 and "--kl-probe-seqs" in bad.output and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("before,kw", [(dict(kv_heads=1), {}), (dict(mode="k=v"), {}), (None, dict(rope_pairs=2))])
def test_kl_allocation_after_share_kv_and_with_rope_pairs(tiny_models, tmp_path, before, kw):
    """The candidates are the layers the conversion writes in each variant: a latent over share-kv's pooled heads or
    its shared K=V, or beside kept RoPE pairs."""
    from qkvconv.convert import share_kv_checkpoint

    src = tiny_models["llama"]
    if before is not None:
        src = tmp_path / "shared"
        share_kv_checkpoint(tiny_models["llama"], src, init="calibrated", **before, **FAST)
    report = latent_kv_checkpoint(src, None, kv_rank=8, rank_allocation="kl", **kw, **FAST)
    ranks, kl = report.options["kv_ranks"], report.kl_sensitivity
    assert sum(ranks) == 2 * 8 and kl["ladder"] == [4, 6, 8, 10, 12, 16]
    assert all(k[0] > k[-1] for k in kl["per_layer"])  # rank 4 hurts more than rank 16 in every layer
    assert kl["summed"]["chosen"] <= kl["summed"]["uniform"]
