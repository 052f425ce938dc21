"""Version-proofing: the cache reaches the shared attention under any keyword, a broken cache path makes the
conversion's decode check refuse to write, the tested range is declared consistently and warned about, `env`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from typer.testing import CliRunner

import qkvconv
from qkvconv import compat
from qkvconv.checkpoint import read_record
from qkvconv.cli import app
from qkvconv.convert import absorb_query_checkpoint, share_kv_checkpoint
from qkvconv.errors import VerificationError
from qkvconv.modeling import modeling_qkvconv

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(num_seqs=2, seq_len=32)


def test_take_cache_finds_the_cache_under_any_keyword():
    from transformers import DynamicCache

    for name in ("cache", "past_key_values", "layer_past", "past_key_value", "some_future_name"):
        c = DynamicCache()
        kwargs = {name: c, "position_ids": None}
        assert compat.take_cache(kwargs) is c and name not in kwargs  # popped: never forwarded to the kernel
    assert compat.take_cache({"position_ids": None}) is None


def _drop_cache(kwargs):  # the transformers-5.24 bug: the module looks for the cache where it is not
    for name in list(kwargs):
        if name in ("cache", "past_key_values", "layer_past", "past_key_value"):
            kwargs.pop(name)
    return None


def test_a_lost_cache_is_an_error_not_a_silent_fallback(tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "kv"
    share_kv_checkpoint(tiny_models["llama"], out, mode="k=v", kv_heads=1, **FAST)
    model, _ = qkvconv.load(out)
    ids = torch.tensor([[1, 40, 41, 42]])
    monkeypatch.setattr(modeling_qkvconv, "take_cache", _drop_cache)
    with pytest.raises(RuntimeError, match="KV cache did not reach"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    model(ids, use_cache=False)  # no cache asked for: nothing to complain about


def test_decode_check_refuses_a_broken_cache_path(tiny_models, tmp_path, monkeypatch):
    """Break the shared attention's cache path as transformers 5.24 did: the conversion must refuse to write."""
    monkeypatch.setattr(modeling_qkvconv, "take_cache", _drop_cache)
    out = tmp_path / "kv"
    with pytest.raises(VerificationError, match="decoding with the KV cache failed.*nothing written"):
        share_kv_checkpoint(tiny_models["llama"], out, mode="k=v", **FAST)
    assert not out.exists()
    # without the modeling file's own guard, the decode check's comparison catches it by itself
    monkeypatch.setattr(modeling_qkvconv, "_check_cache_reached", lambda *a, **k: None)
    with pytest.raises(VerificationError, match="cached decoding differs from uncached decoding") as e:
        share_kv_checkpoint(tiny_models["llama"], out, mode="k=v", **FAST)
    assert "cache holds 0 of" in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".*"))
    result = CliRunner().invoke(app, ["share-kv", str(tiny_models["llama"]), "--output", str(out), "--mode", "k=v",
                                      "--num-seqs", "2", "--seq-len", "32"])
    assert result.exit_code == 1 and "cached decoding differs" in result.output and not out.exists()


def test_decode_check_catches_a_stock_attention_that_drops_its_cache(tiny_models, tmp_path, monkeypatch):
    """The check is generic: a stock (unconverted) attention module that ignores its cache fails absorb-query too."""
    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaAttention.forward

    def no_cache(self, *args, **kwargs):
        for name in ("cache", "past_key_values", "past_key_value"):
            kwargs.pop(name, None)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", no_cache)
    out = tmp_path / "noq"
    with pytest.raises(VerificationError, match="cached decoding differs"):
        absorb_query_checkpoint(tiny_models["llama"], out, **FAST)
    assert not out.exists()


def test_every_conversion_records_its_decode_check(tiny_models, tmp_path):
    out = tmp_path / "noq"
    report = absorb_query_checkpoint(tiny_models["qwen2"], out, **FAST)
    d = read_record(out)["history"][-1]["decoding"]
    assert d["passed"] and d["mismatches"] == 0 and d["cached_vs_uncached"] == report.decoding.cached_vs_uncached
    assert d["cache_tokens"] == d["expected_cache_tokens"] == d["prompt_tokens"] + d["new_tokens"] - 1
    assert d["vs_original"] > 0.9  # exact conversion: the original chooses the same tokens
    print(f"\nabsorb-query qwen2 decode check: {json.dumps(d)}")
    env = read_record(out)["manifest"]["environment"]
    assert env["packages"]["transformers"]["version"] and "device" in env


def test_modeling_classes_are_built_on_first_use():
    """modeling_qkvconv imports no family's modeling module until one of its Qkvconv<Base> classes is asked for (an
    import of every family took 3.6 s of each process's start); asked for, by attribute or by `from ... import`, the
    class is built once, subclasses the stock class and is listed by dir(); other names stay AttributeErrors."""
    code = textwrap.dedent('''
        import sys
        import qkvconv.modeling.modeling_qkvconv as m
        loaded = lambda fam: f"transformers.models.{fam}.modeling_{fam}" in sys.modules
        assert not loaded("mixtral") and not loaded("gpt_oss"), "families imported at import time"
        from qkvconv.modeling.modeling_qkvconv import QkvconvMixtralForCausalLM as A
        import transformers
        assert A is m.QkvconvMixtralForCausalLM and issubclass(A, transformers.MixtralForCausalLM)
        assert A.__module__ == m.__name__ and loaded("mixtral") and not loaded("gpt_oss")
        assert {f"Qkvconv{b}" for b in m.BASE_CLASSES} <= set(dir(m))
        for name in ("QkvconvNoSuchForCausalLM", "NoSuchThing"):
            try:
                getattr(m, name)
            except AttributeError:
                pass
            else:
                raise AssertionError(name)
        print("ok")
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_declared_range_is_the_tested_range():
    """pyproject's bounds, compat.TESTED and the two locks say the same thing."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    locks = {which: (ROOT / "requirements" / f"lock{suffix}.txt").read_text()
             for which, suffix in (("newest", ""), ("lowest", "-lowest"))}
    for name, (low, high) in compat.TESTED.items():
        spec = next(SpecifierSet(d[len(name):]) for d in deps if re.match(rf"{name}[<>=!~]", d))
        assert Version(low) in spec and Version(high) in spec
        assert _before(low) not in spec, f"{name}: lower bound below {low}"
        assert any(s.operator in ("<", "<=") for s in spec), f"{name} has no upper bound"
        pin = rf"(?im)^{name.replace('-', '[-_]')}==(\S+)$"
        assert re.search(pin, locks["lowest"]).group(1) == low
        assert re.search(pin, locks["newest"]).group(1) == high


def _before(version: str) -> Version:
    v = Version(version)
    return Version(f"{v.major}.{v.minor - 1}.99") if v.minor else Version(f"{v.major - 1}.99.99")


def test_untested_version_gives_one_warning_line(monkeypatch, capsys):
    real = compat.installed
    monkeypatch.setattr(compat, "installed", lambda n: "5.99.0" if n == "transformers" else real(n))
    monkeypatch.setattr(compat, "_warned", False)
    assert compat.in_range("transformers") is False
    line = compat.warn_if_untested()
    assert compat.warn_if_untested() is None  # once per process
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transformers 5.99.0 (tested 5.0.0 … 5.24.0)" in err and line in err
    info = json.loads(CliRunner().invoke(app, ["env", "--json"]).output)
    assert info["packages"]["transformers"] == {"version": "5.99.0", "tested": ["5.0.0", "5.24.0"], "in_range": False}


def test_env_command():
    result = CliRunner().invoke(app, ["env", "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    for name in ("qkvconv", "torch", "transformers", "lm-eval", "accelerate"):
        assert info["packages"][name]["version"], name
    assert info["packages"]["transformers"]["in_range"] is True  # CI runs only inside the range
    assert info["device"].startswith(("cpu", "cuda"))
    table = CliRunner().invoke(app, ["--version"])
    assert table.exit_code == 0 and "transformers" in table.output and "tested range" in table.output


@pytest.mark.slow
def test_real_smollm2_kv1_decodes_with_a_sixth_of_the_cache(smollm2_gguf, tmp_path):
    """The issue's check on the real checkpoint: share-kv --mode k=v --kv-heads 1, then plain transformers with
    remote code: cached greedy generation equals uncached, and the cache holds 1/6 of the base model's bytes."""
    from qkvconv.checkpoint import load, untie, write_checkpoint

    base_dir, out = tmp_path / "base", tmp_path / "kv"
    loaded = load(smollm2_gguf)  # the GGUF as a stock HF directory, so plain transformers can load the base too
    write_checkpoint(base_dir, state_dict=untie(loaded.model.state_dict(), loaded.config, loaded.spec),
                     config=loaded.config, tokenizer=loaded.tokenizer, generation_config=loaded.model.generation_config,
                     record={"source": "test base"}, force=False)
    report = share_kv_checkpoint(smollm2_gguf, out, mode="k=v", kv_heads=1, num_seqs=4, seq_len=64)
    assert report.decoding.passed
    script = textwrap.dedent(
        f"""
        import json, torch, transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
        res = {{}}
        for name, path in (("base", {str(base_dir)!r}), ("kv", {str(out)!r})):
            m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                      return_dict_in_generate=True)
            cached = m.generate(ids, use_cache=True, **kw)
            uncached = m.generate(ids, use_cache=False, **kw)
            cache = getattr(cached, "cache", None) or cached.past_key_values
            held = sum(t.numel() * t.element_size() for l in cache.layers for t in (l.keys, l.values)
                       if t is not None)
            res[name] = dict(equal=bool((cached.sequences == uncached.sequences).all()), bytes=held,
                             tokens=cache.get_seq_length(), text=tok.decode(cached.sequences[0, ids.shape[1]:]))
        print(json.dumps(res))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"\nSmolLM2 k=v + kv-heads 1 through plain transformers: {res}")
    assert res["base"]["equal"] and res["kv"]["equal"]
    assert res["kv"]["tokens"] == res["base"]["tokens"] > 0
    assert res["kv"]["bytes"] * 6 == res["base"]["bytes"]


def _loads_as_plain_transformers_does(path, monkeypatch) -> None:
    """qkvconv's GGUF load (one metadata parse, a plain-array reader, cached name tables) gives the very model
    and tokenizer that transformers' own from_pretrained gives, builds one reader, and restores every hook."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from qkvconv.checkpoint import load

    hooks = (gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.load_gguf_checkpoint, gguf_utils.tqdm)
    built = []
    reader_class = gguf.GGUFReader

    class CountingReader(reader_class):
        def __init__(self, *args, **kwargs):
            built.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    ours = load(path)
    assert len(built) == 1, f"the GGUF file was parsed {len(built)} times"
    monkeypatch.setattr(gguf, "GGUFReader", reader_class)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.load_gguf_checkpoint, gguf_utils.tqdm) == hooks

    p = Path(path)
    plain = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    a, b = ours.model.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    plain_config = {k: v for k, v in plain.config.to_dict().items() if k != "quantization_config"}
    assert ours.model.config.to_dict() == plain_config  # qkvconv drops the spent GGUF quantization block
    text = "The quick brown fox, ünïcödé and    spaces\n\tjumps 12345 times in the hat."
    assert ours.tokenizer(text)["input_ids"] == tok(text)["input_ids"]
    assert len(ours.tokenizer) == len(tok)


def test_gguf_is_parsed_once_and_loads_as_plain_transformers_does(tiny_gguf, monkeypatch):
    _loads_as_plain_transformers_does(tiny_gguf, monkeypatch)


@pytest.mark.slow
def test_real_gguf_is_parsed_once_and_loads_as_plain_transformers_does(smollm2_gguf, monkeypatch):
    _loads_as_plain_transformers_does(smollm2_gguf, monkeypatch)
