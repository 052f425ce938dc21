"""MoE families with llama/qwen attention (issue 11): mixtral, qwen2_moe (q/k/v biases, a shared expert), qwen3_moe
(per-head q/k norms); 4 experts, top-2.

Their hub checkpoints (and transformers 5's save_pretrained) store the experts one by one
(`block_sparse_moe.experts.{e}.w1.weight`, `mlp.experts.{e}.gate_proj.weight`), while the modules hold them stacked
(`mlp.experts.gate_up_proj` (E, 2I, d)); stream.MappedSource reads the former under the latter's names by
transformers' own conversion mapping. Both layouts are tested: per-expert (save_pretrained) and stacked (written
here). The output holds the stacked names, which plain transformers and qkvconv.load read as they are."""

from __future__ import annotations


import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import qkvconv
from qkvconv.archs import spec_for
from qkvconv.convert import absorb_query_checkpoint
from qkvconv.errors import CheckpointError
from qkvconv.stream import SafetensorsSource, expected_tensors, module_names, skeleton

from test_families_llama_like import FAST, _ids, build, check_family

NAMES = ["mixtral", "qwen2_moe", "qwen3_moe"]
PER_EXPERT = {"mixtral": "model.layers.0.block_sparse_moe.experts.3.w1.weight",
              "qwen2_moe": "model.layers.0.mlp.experts.3.gate_proj.weight",
              "qwen3_moe": "model.layers.0.mlp.experts.3.up_proj.weight"}


def _keys(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as h:
        return set(h.keys())


def build_stacked(per_expert, path):
    """The same model with its experts stored stacked, under the module names (as qkvconv writes them)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(per_expert).eval()
    path.mkdir()
    for f in per_expert.iterdir():
        if f.name != "model.safetensors":
            (path / f.name).write_bytes(f.read_bytes())
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    built = {}

    def get(name, layout="per-expert"):
        if (name, layout) not in built:
            if layout == "per-expert":
                built[name, layout] = build(name, root / name)
                assert PER_EXPERT[name] in _keys(built[name, layout])  # save_pretrained writes the hub layout
            else:
                built[name, layout] = build_stacked(get(name), root / f"{name}-stacked")
        return built[name, layout]

    return get


@pytest.mark.parametrize("layout", ["per-expert", "stacked"])
@pytest.mark.parametrize("name", NAMES)
def test_source_reads_what_transformers_loads(tiny, name, layout):
    """Every tensor the config implies, under the module's name, equals (bitwise) what from_pretrained loads."""
    src = tiny(name, layout)
    config = transformers.AutoConfig.from_pretrained(src)
    model = skeleton(config)
    view = module_names(SafetensorsSource(src), model, spec_for(config.model_type))
    expected = expected_tensors(model)
    assert sorted(view.keys()) == sorted(expected)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(src).state_dict()
    for k, shape in expected.items():
        assert view.shape(k) == shape and view.dtype(k) == loaded[k].dtype
        assert torch.equal(view.get(k), loaded[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_family(tiny, tmp_path, name):
    """absorb-query exact, drop, attach at step 0, plain loading; share-kv k=v and kv_heads 1 (cached = uncached,
    cache bytes = arithmetic), k=v --export stock = the shared-cache model; inspect."""
    src = tiny(name)
    check_family(name, src, tmp_path, modes=(("k=v", None), (None, 1)), calibrated=(("k=v", None),))
    out = _keys(tmp_path / "aq")
    assert "model.layers.0.mlp.experts.gate_up_proj" in out and PER_EXPERT[name] not in out


@pytest.mark.parametrize("name", NAMES)
def test_stacked_layout_converts_to_the_same_checkpoint(tiny, tmp_path, name):
    """The stacked layout of the same model gives the same exact conversion, tensor for tensor."""
    a = absorb_query_checkpoint(tiny(name), tmp_path / "a", **FAST)
    b = absorb_query_checkpoint(tiny(name, "stacked"), tmp_path / "b", **FAST)
    assert a.exactness.passed and b.exactness.passed
    print(f"\n{name} stacked layout: absorb-query exact float64 max|Δlogit| {b.exactness.algebraic_max_abs:.2e}")
    with safe_open(str(tmp_path / "a/model.safetensors"), "pt") as ha, \
            safe_open(str(tmp_path / "b/model.safetensors"), "pt") as hb:
        assert set(ha.keys()) == set(hb.keys())
        for k in ha.keys():
            assert torch.equal(ha.get_tensor(k), hb.get_tensor(k)), k
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", trust_remote_code=True).eval()
    orig, _ = qkvconv.load(tiny(name, "stacked"))
    with torch.no_grad():
        torch.testing.assert_close(plain(_ids()).logits, orig(_ids()).logits, atol=1e-4, rtol=1e-4)


def test_missing_expert_tensor_is_one_clear_error(tiny, tmp_path):
    src = tiny("mixtral")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    with safe_open(str(src / "model.safetensors"), "pt") as h:
        sd = {k: h.get_tensor(k) for k in h.keys() if k != PER_EXPERT["mixtral"]}
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="do not stack.*is an expert's tensor missing"):
        absorb_query_checkpoint(broken, tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()
