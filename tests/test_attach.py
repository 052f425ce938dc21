"""attach-query-mlp and attach-preproj: exact at step 0 on every family, and the modules really act."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import qkvconv
from qkvconv.archs import dims_of
from qkvconv.checkpoint import load
from qkvconv.cli import app
from qkvconv.convert import (
    absorb_query_checkpoint,
    attach_preproj_checkpoint,
    attach_query_mlp_checkpoint,
    base_class_of,
    build_converted,
    converted_config,
)
from qkvconv.errors import TransformError, VerificationError
from qkvconv.transforms import attach_preproj, attach_query_mlp
from qkvconv.transforms.attach import stock_layers

runner = CliRunner()
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])


def _built(loaded, attach, **kw):
    dims = dims_of(loaded.config, loaded.spec)
    res = attach(loaded.model.state_dict(), loaded.spec, dims, stock_layers(dims), **kw)
    config = converted_config(loaded.config, loaded.spec, base_class_of(loaded), res.layers)
    return build_converted(config, res.state_dict, torch.float32), res


def test_attach_is_exact_at_step_0(tiny_models, family):
    """Both attach commands, verified by the pipeline itself (max |Δlogit| over sampled text), every family."""
    q = attach_query_mlp_checkpoint(tiny_models[family], None, num_seqs=1, seq_len=24)
    p = attach_preproj_checkpoint(tiny_models[family], None, skip=family != "mistral", num_seqs=1, seq_len=24)
    print(f"{family}: max|Δlogit| query-mlp {q.error.max_abs:.3g}, preproj {p.error.max_abs:.3g}; added {q.added} {p.added}")
    for report in (q, p):
        assert report.error.max_abs <= 1e-6 and report.error.top1_agreement == 1.0
    d = tiny_models[family]
    loaded = load(d)
    for attach in (attach_query_mlp, attach_preproj):  # and the added count is what the model gained
        model, res = _built(loaded, attach)
        gained = sum(x.numel() for x in model.parameters()) - sum(x.numel() for x in loaded.model.parameters())
        assert gained == sum(res.added.values())
        torch.testing.assert_close(model(IDS).logits, loaded.model(IDS).logits, atol=0, rtol=0)


def test_query_mlp_default_rank_and_size(tiny_models):
    loaded = load(tiny_models["qwen3"])
    _, res = _built(loaded, attach_query_mlp)
    assert res.layers[0]["query_mlp"] == {"size": 64, "rank": 32, "act": "gelu"}
    # f: d_q·R (W1) + R·d_q (W2) + 2·d_q (norm gains), per layer
    assert res.added["query_mlp"] == 2 * (2 * 64 * 32 + 2 * 64)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "gpt_neox"])
def test_query_mlp_changes_only_the_query(tiny_models, family):
    """With f switched on, the q part of the projection output becomes X + f(X); k and v are untouched."""
    loaded = load(tiny_models[family])
    spec, dims = loaded.spec, dims_of(loaded.config, loaded.spec)
    model, _ = _built(loaded, attach_query_mlp)
    layer = model.get_submodule(spec.layers)[0]
    target = layer.get_submodule(spec.q_proj if spec.qkv_layout == "separate" else spec.fused_qkv)
    with torch.no_grad():
        target.query_mlp.out_norm.weight.fill_(1.0)
    h = torch.randn(3, 5, dims.hidden_size)
    y_new = target(h)
    with torch.no_grad():
        target.query_mlp.out_norm.weight.zero_()
    y_old = target(h)
    q_size = dims.q_size
    if spec.qkv_layout == "separate":
        q_old, q_new, rest_old, rest_new = y_old, y_new, y_old[..., :0], y_new[..., :0]
    elif spec.qkv_layout == "fused_concat_conv1d":
        q_old, rest_old = y_old.split([q_size, 2 * q_size], -1)
        q_new, rest_new = y_new.split([q_size, 2 * q_size], -1)
    else:  # per head [q_h | k_h | v_h]
        H, dh = dims.num_attention_heads, dims.head_dim
        o, n = y_old.unflatten(-1, (H, 3 * dh)), y_new.unflatten(-1, (H, 3 * dh))
        q_old, q_new = o[..., :dh].flatten(-2), n[..., :dh].flatten(-2)
        rest_old, rest_new = o[..., dh:], n[..., dh:]
    torch.testing.assert_close(rest_new, rest_old, atol=0, rtol=0)
    with torch.no_grad():
        target.query_mlp.out_norm.weight.fill_(1.0)
        expected = q_old + target.query_mlp.f(q_old)
    torch.testing.assert_close(q_new, expected)
    assert (q_new - q_old).abs().max() > 1e-3
    with torch.no_grad():  # and the model's logits move
        assert (model(IDS).logits - loaded.model(IDS).logits).abs().max() > 1e-4


def test_preproj_feeds_attention_only_in_parallel_residual(tiny_models):
    """GPT-NeoX (parallel residual): the pre-projection MLP and skip change attention, never the MLP's input."""
    loaded = load(tiny_models["gpt_neox"])
    model, _ = _built(loaded, attach_preproj)
    layer = model.get_submodule("gpt_neox.layers")[0]
    with torch.no_grad():
        layer.input_layernorm.preproj.down.weight.normal_(0, 0.5)
        layer.attention.content_skip.weight.normal_(0, 0.5)
    seen = {}
    hooks = [m.register_forward_hook(lambda _m, a, o, k=k: seen.__setitem__(k, a[0].clone()))
             for k, m in (("mlp_in", layer.post_attention_layernorm), ("attn_in", layer.attention.query_key_value))]
    ref = {}
    ref_layer = loaded.model.get_submodule("gpt_neox.layers")[0]
    hooks += [m.register_forward_hook(lambda _m, a, o, k=k: ref.__setitem__(k, a[0].clone()))
              for k, m in (("mlp_in", ref_layer.post_attention_layernorm), ("attn_in", ref_layer.attention.query_key_value))]
    with torch.no_grad():
        model(IDS), loaded.model(IDS)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(seen["mlp_in"], ref["mlp_in"], atol=0, rtol=0)
    assert (seen["attn_in"] - ref["attn_in"]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_content_skip_adds_w_skip_x_tilde(tiny_models, family):
    loaded = load(tiny_models[family])
    spec = loaded.spec
    model, _ = _built(loaded, attach_preproj)
    layer = model.get_submodule(spec.layers)[0]
    attn = layer.get_submodule(spec.o_proj.rsplit(".", 1)[0])
    x = torch.randn(1, 6, loaded.config.hidden_size)
    kwargs = {}
    if spec.positional == "rope":
        kwargs["position_embeddings"] = model.model.rotary_emb(x, torch.arange(6)[None])
    with torch.no_grad():
        base = attn(x, attention_mask=None, **kwargs)[0]
        attn.content_skip.weight.normal_(0, 0.3)
        skipped = attn(x, attention_mask=None, **kwargs)[0]
    torch.testing.assert_close(skipped - base, attn.content_skip(x), atol=1e-5, rtol=1e-5)


def test_attach_on_absorbed_and_stacked(tiny_models, tmp_path):
    """On an absorbed model X is the absorbed input; attaching both kinds on top stays exact."""
    absorb_query_checkpoint(tiny_models["gpt2"], tmp_path / "noq", num_seqs=1, seq_len=16)
    r1 = attach_query_mlp_checkpoint(tmp_path / "noq", tmp_path / "q", num_seqs=2, seq_len=32)
    r2 = attach_preproj_checkpoint(tmp_path / "q", tmp_path / "qp", num_seqs=2, seq_len=32)
    assert r1.error.max_abs == 0.0 and r2.error.max_abs == 0.0
    record = json.loads((tmp_path / "qp" / "qkvconv.json").read_text())
    assert [h["transform"] for h in record["history"]] == ["absorb-query", "attach-query-mlp", "attach-preproj"]
    layers = json.loads((tmp_path / "qp" / "config.json").read_text())["qkvconv"]["layers"]
    assert layers[0]["query"] == "identity" and "query_mlp" in layers[0] and layers[0]["preproj"]["skip"] is True
    with pytest.raises(TransformError, match="applies once"):
        attach_query_mlp_checkpoint(tmp_path / "q", tmp_path / "again", num_seqs=1, seq_len=16)
    assert not (tmp_path / "again").exists()


def test_verification_failure_writes_nothing(tiny_models, tmp_path, monkeypatch):
    import qkvconv.convert as convert

    real = convert.attach_query_mlp_layer

    def broken(*a, **kw):
        res = real(*a, **kw)
        for k in res.tensors:
            if k.endswith("query_mlp.out_norm.weight"):
                res.tensors[k] = torch.ones_like(res.tensors[k])  # not zero-started: not exact
        return res

    monkeypatch.setattr(convert, "attach_query_mlp_layer", broken)
    with pytest.raises(VerificationError, match="attach-query-mlp is not exact: in float64"):
        attach_query_mlp_checkpoint(tiny_models["llama"], tmp_path / "o", num_seqs=1, seq_len=16)
    assert not (tmp_path / "o").exists()


def test_loads_in_plain_transformers(tiny_models, tmp_path):
    import subprocess
    import sys

    attach_preproj_checkpoint(tiny_models["qwen2"], tmp_path / "p", num_seqs=1, seq_len=16)
    attach_query_mlp_checkpoint(tmp_path / "p", tmp_path / "pq", num_seqs=1, seq_len=16)
    script = (
        "import sys, torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'pq')!r}, trust_remote_code=True)\n"
        f"o = transformers.AutoModelForCausalLM.from_pretrained({str(tiny_models['qwen2'])!r})\n"
        "ids = torch.tensor([[1, 40, 41, 42, 43]])\n"
        "assert (m(ids).logits - o(ids).logits).abs().max() == 0\n"
        "assert 'qkvconv' not in sys.modules\nprint('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]


def test_cli_attach_commands_and_inspect(tiny_models, tmp_path):
    env = {"COLUMNS": "200"}
    r = runner.invoke(app, ["attach-query-mlp", str(tiny_models["llama"]), "-o", str(tmp_path / "q"), "--rank", "16",
                            "--num-seqs", "2", "--seq-len", "16"], env=env)
    assert r.exit_code == 0, r.output
    assert "max |Δlogit|" in r.stdout and "query_mlp" in r.stdout
    r = runner.invoke(app, ["attach-preproj", str(tmp_path / "q"), "-o", str(tmp_path / "qp"), "--no-skip",
                            "--expansion", "2", "--num-seqs", "2", "--seq-len", "16"], env=env)
    assert r.exit_code == 0, r.output
    info = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "qp"), "--json"], env=env).stdout)
    assert info["attached_parameters"] == {"query_mlp": 2 * (2 * 64 * 16 + 128), "preproj": 2 * 2 * 64 * 128}
    # bad input: one red line, nothing written
    r = runner.invoke(app, ["attach-query-mlp", str(tiny_models["llama"]), "-o", str(tmp_path / "q")], env=env)
    assert r.exit_code == 1 and "already exists" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["attach-query-mlp", str(tiny_models["llama"]), "-o", str(tmp_path / "x"), "--act", "tanh"],
                      env=env)
    assert r.exit_code == 1 and "unknown activation" in r.output and not (tmp_path / "x").exists()
