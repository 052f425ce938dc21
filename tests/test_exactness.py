"""Exact means exact on every machine and dtype: the algebra is checked in float64, the output dtype's rounding
against the original's own. The checks pass when the kernel path changes and refuse a one-part-in-1e4 error."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

import qkvconv
import qkvconv.convert as convert
from qkvconv.checkpoint import read_record
from qkvconv.convert import absorb_query_checkpoint, attach_preproj_checkpoint, attach_query_mlp_checkpoint
from qkvconv.errors import VerificationError
from qkvconv.verify import ALGEBRAIC_REL_BOUND

FAST = dict(num_seqs=2, seq_len=32)
EXACT = {"absorb-query": absorb_query_checkpoint, "attach-query-mlp": attach_query_mlp_checkpoint,
         "attach-preproj": attach_preproj_checkpoint}


def _summary(name, r) -> str:
    x = r.exactness
    return (f"{name} {x.dtype}: algebra {x.algebraic_rel:.2g}, rounding {x.rounding_ratio:.3f}× "
            f"(max {x.rounding_max_ratio:.3f}×) of the original's {x.rounding_original:.3g}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_conversions_pass_in_every_dtype(tiny_models, tmp_path, dtype):
    for family in ("llama", "qwen2", "gpt2", "gpt_neox"):
        for name, fn in EXACT.items():
            out = tmp_path / f"{family}-{name}"
            r = fn(tiny_models[family], out, dtype=dtype, **FAST)
            print(f"\n{family} {_summary(name, r)}")
            assert r.exactness.passed and r.exactness.algebraic_rel <= ALGEBRAIC_REL_BOUND
            model, _ = qkvconv.load(out, dtype=dtype)
            assert next(model.parameters()).dtype == dtype
    record = read_record(tmp_path / "llama-absorb-query")["history"][-1]
    assert record["exactness"]["passed"] and record["exactness"]["dtype"] == str(dtype).removeprefix("torch.")
    assert record["options"]["folded_dtype"] == ("float64" if dtype != torch.float64 else None)


def test_absorbed_checkpoint_keeps_folded_maps_in_float64(tiny_models, tmp_path):
    """The folded maps are stored and loaded in float64 inside a bf16 checkpoint, and q/k/v come back in bf16."""
    absorb_query_checkpoint(tiny_models["llama"], tmp_path / "o", dtype=torch.bfloat16, **FAST)
    model, tok = qkvconv.load(tmp_path / "o", dtype=torch.bfloat16)
    attn_norm = model.model.layers[0].input_layernorm
    assert attn_norm.affine.weight.dtype == torch.float64
    assert model.model.layers[0].self_attn.k_proj.weight.dtype == torch.float64
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    assert model(ids).logits.dtype == torch.bfloat16
    model.to(torch.bfloat16)  # a model-wide cast still runs (the folded maps then round like the rest)
    model(ids)


def _with(monkeypatch, **options):
    """Every conversion in the test streams with these options changed (another kernel path)."""
    import qkvconv.stream as stream

    monkeypatch.setattr(stream, "stream_convert", functools.partial(stream.stream_convert, **options))


def _attention(monkeypatch, implementation: str):
    """Every model skeleton the streams run (original and converted layers) uses this attention kernel."""
    import qkvconv.stream as stream

    real = stream.skeleton

    def skeleton(config, dtype=torch.float32):
        config = copy.deepcopy(config)
        config._attn_implementation = implementation
        return real(config, dtype)

    monkeypatch.setattr(stream, "skeleton", skeleton)


@pytest.mark.parametrize("path", ["1 thread", "eager", "batch 1", "batch 3"])
def test_exact_passes_when_the_kernel_path_changes(tiny_models, tmp_path, monkeypatch, path):
    threads = torch.get_num_threads()
    if path == "1 thread":
        torch.set_num_threads(1)
    elif path == "eager":  # the streams run SDPA by default
        _attention(monkeypatch, "eager")
    else:
        _with(monkeypatch, batch_size=int(path.split()[1]))
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for name, fn in EXACT.items():
                r = fn(tiny_models["llama"], tmp_path / f"{name}-{dtype}", dtype=dtype, num_seqs=3, seq_len=32)
                print(f"\n[{path}] {_summary(name, r)}")
                assert r.exactness.passed
    finally:
        torch.set_num_threads(threads)


def _perturb_one_weight(real, key_part):
    """The layer transform, with the layer's tensor whose key contains `key_part` off by one part in 1e4."""

    def wrapped(sd, *args, **kwargs):
        res = real(sd, *args, **kwargs)
        for key in [k for k in res.tensors if key_part in k] or [k for k in sd if key_part in k]:
            res.tensors[key] = (res.tensors.get(key, sd[key])) * (1 + 1e-4)  # one tensor, one part in 1e4
            break
        return res

    return wrapped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_part_in_1e4_is_refused_in_every_dtype(tiny_models, tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(convert, "absorb_query_layer", _perturb_one_weight(convert.absorb_query_layer,
                                                                           "layers.1.self_attn.k_proj"))
    monkeypatch.setattr(convert, "attach_preproj_layer", _perturb_one_weight(convert.attach_preproj_layer,
                                                                             "layers.0.mlp.up_proj"))
    for name in ("absorb-query", "attach-preproj"):
        out = tmp_path / name
        with pytest.raises(VerificationError, match=f"{name} is not exact: in float64") as e:
            EXACT[name](tiny_models["llama"], out, dtype=dtype, **FAST)
        print(f"\n{dtype}: {e.value}")
        assert not out.exists()


def test_rounding_worse_than_the_original_is_refused_with_the_way_out(tiny_models, tmp_path):
    """Without the float64 folded maps, absorb-query in bf16 rounds far worse than the original (cond(W_Q)): the
    refusal names the condition number and --folded-dtype float64. (On the tiny model a bf16 fold may still pass:
    then the report must show a ratio above the float64 fold's.)"""
    try:
        r = absorb_query_checkpoint(tiny_models["llama"], tmp_path / "o", dtype=torch.bfloat16, folded_dtype=None,
                                    **FAST)
    except VerificationError as e:
        assert "cond(W_Q)" in str(e) and "--folded-dtype float64" in str(e) and not (tmp_path / "o").exists()
        return
    good = absorb_query_checkpoint(tiny_models["llama"], None, dtype=torch.bfloat16, **FAST)
    assert r.exactness.rounding_ratio > good.exactness.rounding_ratio


def test_cli_shows_algebra_rounding_and_decoding(tiny_models, tmp_path):
    from typer.testing import CliRunner

    from qkvconv.cli import app

    result = CliRunner().invoke(app, ["attach-query-mlp", str(tiny_models["gpt2"]), "-o", str(tmp_path / "q"),
                                      "--dtype", "bfloat16", "--num-seqs", "2", "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "float64 algebra" in text and "bfloat16 rounding" in text and "decoding" in text
    exactness = read_record(tmp_path / "q")["history"][-1]["exactness"]
    print(json.dumps(exactness))
    assert exactness["rounding_ratio"] <= exactness["ratio_bound"]
