"""share-kv: every mode on every family converts, loads, generates with a real shared cache whose bytes match the
arithmetic; cached and uncached greedy decoding agree; stock export; calibrated init beats the data-free one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Callable

import pytest
import torch
from typer.testing import CliRunner

import qkvconv
from qkvconv.archs import dims_of, spec_for
from qkvconv.cli import app
from qkvconv.compat import cache_bytes, output_cache
from qkvconv.convert import share_kv_checkpoint
from qkvconv.describe import kv_cache_bytes_per_token
from qkvconv.errors import TransformError
from qkvconv.transforms.share_kv import kv_cache_ratio

CASES = [("k=v", None), ("q=k", None), ("q=k=v", None), (None, 1), ("k=v", 1)]
FAST = dict(num_seqs=2, seq_len=32)


@torch.no_grad()
def _check_cached_equals_uncached(model, ids: torch.Tensor, n_new: int, per_token: int,
                                  held_bytes: Callable[[int], int] | None = None) -> None:
    """Greedy generate() with the shared cache vs. the same tied attention recomputed over the full sequence with
    use_cache=False: same step logits, same tokens (up to exact ties), and the cache holds exactly the arithmetic:
    per_token bytes per held token, or held_bytes(held tokens) where a sliding-window cache drops some."""
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                         do_sample=False, return_dict_in_generate=True, output_logits=True)
    held = ids.shape[1] + n_new - 1  # the last token is sampled, never fed back
    cache = output_cache(gen)
    assert cache.get_seq_length() == held
    assert cache_bytes(cache) == (held_bytes(held) if held_bytes else held * per_token)  # measured = arithmetic
    cached = torch.stack(gen.logits, 1)  # (1, n_new, vocab)
    uncached = model(gen.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)
    uncached[..., model.generation_config.eos_token_id] = float("-inf")  # min_new_tokens suppresses EOS
    top2 = uncached.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert (uncached.argmax(-1) == gen.sequences[:, ids.shape[1] :])[clear].all()


def test_converts_loads_generates_with_a_shared_cache(tiny_models, family, tmp_path):
    orig, tok = qkvconv.load(tiny_models[family])
    spec = spec_for(orig.config.model_type)
    dims = dims_of(orig.config, spec)
    base = kv_cache_bytes_per_token(orig.config, spec, torch.float32)
    ids = tok(["The quick brown fox"], return_tensors="pt").input_ids
    for mode, kv_heads in CASES:
        out = tmp_path / f"{mode}-{kv_heads}"
        report = share_kv_checkpoint(tiny_models[family], out, mode=mode, kv_heads=kv_heads, **FAST)
        assert 0 < report.error.kl < float("inf") and report.atol is None  # lossy: reported, not refused
        model, _ = qkvconv.load(out)
        N = kv_heads or dims.num_key_value_heads
        per_token = kv_cache_bytes_per_token(model.config, spec, torch.float32)
        assert per_token == base * kv_cache_ratio(mode, N, dims) == report.options["kv_cache_bytes_per_token"]["after"]
        _check_cached_equals_uncached(model, ids, 6, per_token)


def test_plain_transformers_with_remote_code(tiny_models, tmp_path):
    cases = {"llama": ("k=v", 1), "qwen3": ("q=k=v", None), "gpt2": ("k=v", None), "gpt_neox": ("q=k", None)}
    for family, (mode, kvh) in cases.items():
        share_kv_checkpoint(tiny_models[family], tmp_path / family, mode=mode, kv_heads=kvh, **FAST)
    script = textwrap.dedent(
        f"""
        import sys, torch, transformers
        for f in {list(cases)!r}:
            m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + f, trust_remote_code=True)
            ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
            g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                           do_sample=False)
            full = m(g, use_cache=False).logits[:, ids.shape[1] - 1 : -1]  # no cache: recomputed attention
            full[..., m.generation_config.eos_token_id] = float("-inf")  # min_new_tokens suppresses EOS
            assert (full.argmax(-1) == g[:, ids.shape[1] :]).all(), f
        assert "qkvconv" not in sys.modules
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


EXPORTS = {"llama": ("k=v", 1), "qwen2": ("q=k", None), "qwen3": ("q=k=v", None), "gpt2": (None, 1),
           "gpt_neox": ("k=v", None)}


@pytest.mark.parametrize("family_", list(EXPORTS))
def test_export_stock_equals_remote_code_model(tiny_models, tmp_path, family_):
    import transformers

    mode, kvh = EXPORTS[family_]
    a, b = tmp_path / "remote", tmp_path / "stock"
    share_kv_checkpoint(tiny_models[family_], a, mode=mode, kv_heads=kvh, **FAST)
    share_kv_checkpoint(tiny_models[family_], b, mode=mode, kv_heads=kvh, export="stock", **FAST)
    config = json.loads((b / "config.json").read_text())
    assert "qkvconv" not in config and "auto_map" not in config and not (b / "modeling_qkvconv.py").exists()
    stock = transformers.AutoModelForCausalLM.from_pretrained(b)  # no remote code
    remote, _ = qkvconv.load(a)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    torch.testing.assert_close(stock(ids).logits, remote(ids).logits, atol=1e-4, rtol=1e-4)


def test_calibrated_beats_data_free(tiny_models, family):
    for mode, kvh in (("k=v", 1), ("q=k", None)):
        # text the random model itself produces (the shipped English text means nothing to a random tiny model)
        key = share_kv_checkpoint(tiny_models[family], None, mode=mode, kv_heads=kvh, init="key", num_seqs=10,
                                  seq_len=32, calib="sample")
        # calibrated fits on 8 of the same 10 sequences and reports its error on the other 2
        cal = share_kv_checkpoint(tiny_models[family], None, mode=mode, kv_heads=kvh, init="calibrated",
                                  num_seqs=10, seq_len=32, calib="sample")
        assert cal.error.tokens == 2 * 32 and "held-out" in cal.error.source
        print(f"{family} {mode} kv_heads={kvh}: KL key {key.error.kl:.4f}, calibrated {cal.error.kl:.4f}")
        assert cal.error.kl < key.error.kl


def test_data_free_inits(tiny_models):
    kls = {init: share_kv_checkpoint(tiny_models["qwen2"], None, mode="k=v", init=init, **FAST).error.kl
           for init in ("key", "value", "mean")}
    assert len(set(kls.values())) == 3  # three different projections
    with pytest.raises(TransformError, match="--init value"):
        share_kv_checkpoint(tiny_models["qwen2"], None, mode="q=k", init="value", **FAST)



def _per_candidate_error(c, cand, y: torch.Tensor, H: int, bias: bool) -> float:
    """One candidate the unbatched float64 way: masked-softmax attention, ridge W_O, explicit residual."""
    n, dh = len(c.h), c.dh
    q, k, v = (x.double().repeat_interleave(H // x.shape[1], 1) for x in cand.at(slice(None)))  # (n, H, dh)
    y = y.double()
    q, k, v = (x.reshape(c.B, c.L, H, dh).transpose(1, 2) for x in (q, k, v))
    logits = c.rope(q) @ c.rope(k).transpose(-1, -2) * dh**-0.5
    probs = logits.masked_fill(torch.ones(c.L, c.L, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    X = (probs @ v).transpose(1, 2).reshape(n, H * dh)
    if bias:
        X = torch.cat([X, torch.ones(n, 1, dtype=X.dtype)], 1)
    A = X.T @ X
    W = torch.linalg.solve(A + 1e-6 * A.diagonal().mean() * torch.eye(len(A), dtype=A.dtype), X.T @ y)
    return float((X @ W - y).pow(2).sum() / y.pow(2).sum())


def _tiny_calibration(path, num_seqs: int = 8, seq_len: int = 32):
    """The share_kv module, a tiny model loaded from `path`, and its calibration (sampled num_seqs × seq_len)."""
    import importlib

    from qkvconv.checkpoint import load
    from qkvconv.convert import _rope_table
    from qkvconv.verify import attention_inputs, calibration_ids

    skv = importlib.import_module("qkvconv.transforms.share_kv")
    loaded = load(path)
    ids, _ = calibration_ids(loaded.model, loaded.tokenizer, calib="sample", num_seqs=num_seqs, seq_len=seq_len)
    cos, sin = _rope_table(loaded.model, seq_len)
    inputs = attention_inputs(loaded.model, loaded.spec, ids)
    return skv, loaded, skv.Calibration(inputs, seq_len, cos, sin, loaded.config.rms_norm_eps)


@pytest.mark.parametrize("mode,kvh", [("k=v", 1), ("q=k", None), ("q=k=v", None), (None, 1)])
def test_batched_candidate_scores_equal_per_candidate_fits(tiny_models, mode, kvh, monkeypatch):
    """--init calibrated scores and fits all candidates of a layer in one batched float32 attention and normal-equations
    solve: scores equal the per-candidate float64 evaluation (to 1e-9 when batched in float64, 1e-4 in float32), and
    the winner is its argmin (up to that float32 tolerance), whether the candidates are scored in one batch or one
    at a time (the memory budget's choice at large widths)."""
    skv, loaded, cal = _tiny_calibration(tiny_models["qwen2"])  # q/k/v biases, RoPE
    spec, dims = loaded.spec, dims_of(loaded.config, loaded.spec)
    N = skv.check_share_options(mode, kvh, "calibrated", dims)
    H = dims.num_attention_heads
    for i in range(dims.num_hidden_layers):
        L, c = skv._read_layer(loaded.model.state_dict(), spec, dims, i), skv._Calib(cal, i, dims)
        cands, y = skv._candidates(L, mode, c, dims, N)
        bias = L.o.b is not None
        ref = torch.tensor([_per_candidate_error(c, cd, y, H, bias) for cd in cands], dtype=torch.float64)
        for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
            _, err = skv._fit_o(skv._head_outputs(c, cands, H, dtype), y, bias)
            torch.testing.assert_close(err, ref, rtol=rtol, atol=0)
        w, info = skv._choose(c, cands, y, H, bias)
        assert info["relative_error"] == pytest.approx(float(ref.min()), rel=1e-4)
        assert w["o"].W.shape == (H * dims.head_dim, dims.hidden_size)
        # scored on 2 of the 8 windows (0 and 4): the winner's W_O is still refit on all 8, so its error is one of
        # the full-data errors; with every candidate kept for the refit, it is the best of them
        monkeypatch.setattr(skv, "SCORE_WINDOWS", 2)
        for margin in (skv.SCORE_TIE_SAMPLED, float("inf")):
            monkeypatch.setattr(skv, "SCORE_TIE_SAMPLED", margin)
            _, info = skv._choose(c, cands, y, H, bias)
            assert min(abs(info["relative_error"] / float(r) - 1) for r in ref) < 1e-4
            if margin == float("inf"):
                assert info["relative_error"] == pytest.approx(float(ref.min()), rel=1e-4)
            # a batch of one candidate at a time (what a 2048-wide layer gets, _score_batches): the same choice
            monkeypatch.setattr(skv, "SCORE_BATCH_BYTES", 1)
            _, one = skv._choose(c, cands, y, H, bias)
            assert one["relative_error"] == pytest.approx(info["relative_error"], rel=1e-9)
            monkeypatch.setattr(skv, "SCORE_BATCH_BYTES", 256 << 20)
        monkeypatch.setattr(skv, "SCORE_WINDOWS", 16)
        monkeypatch.setattr(skv, "SCORE_BATCH_BYTES", 1)  # every window scored, one candidate at a time
        _, one = skv._choose(c, cands, y, H, bias)
        assert one["relative_error"] == pytest.approx(float(ref.min()), rel=1e-4)
        monkeypatch.undo()


def test_at_most_refit_max_candidates_are_refit_in_float64(tiny_models, monkeypatch):
    """Every candidate scored within the tie margin (made infinite here) is a float64 refit's candidate, but only the
    REFIT_MAX best scored are refit: the winner is the best of those refits, on every layer."""
    skv, loaded, cal = _tiny_calibration(tiny_models["llama"])
    spec, dims = loaded.spec, dims_of(loaded.config, loaded.spec)
    N = skv.check_share_options("k=v", 1, "calibrated", dims)
    H = dims.num_attention_heads
    monkeypatch.setattr(skv, "SCORE_TIE", float("inf"))
    fit, calls = skv._fit_windows, []

    def spy(c, cands, y, H, dtype, windows, bias):
        sol, err = fit(c, cands, y, H, dtype, windows, bias)
        calls.append((dtype, [ids_of[id(cd)] for cd in cands], err))
        return sol, err

    monkeypatch.setattr(skv, "_fit_windows", spy)
    for i in range(dims.num_hidden_layers):
        L, c = skv._read_layer(loaded.model.state_dict(), spec, dims, i), skv._Calib(cal, i, dims)
        cands, y = skv._candidates(L, "k=v", c, dims, N)
        assert len(cands) > skv.REFIT_MAX and c.B * c.L > H * dims.head_dim  # ranked in float32
        ids_of = {id(cd): j for j, cd in enumerate(cands)}
        calls.clear()
        _, info = skv._choose(c, cands, y, H, L.o.b is not None)
        scores = torch.cat([err for dtype, _, err in calls if dtype == torch.float32])
        refits = [(j, float(e)) for dtype, idx, err in calls if dtype == torch.float64 for j, e in zip(idx, err)]
        assert len(scores) == len(cands)
        assert sorted(j for j, _ in refits) == sorted(scores.argsort()[: skv.REFIT_MAX].tolist())
        assert info["relative_error"] == min(e for _, e in refits)


def test_a_calibrated_fit_keeps_no_float64_w_o_and_writes_what_it_fits(tiny_models, monkeypatch):
    """A streamed layer's W_O is refit by --init calibrated: its float64 copy is read without being kept in the
    layer's Float64View and dropped once the original attention output is made; the result is the same as from a
    plain state dict, whose float64 weights every read shares (to float64 rounding: BLAS may sum in another order
    for other addresses)."""
    from qkvconv.stream import Float64View

    skv, loaded, cal = _tiny_calibration(tiny_models["llama"])
    spec, dims = loaded.spec, dims_of(loaded.config, loaded.spec)
    sd = {k: v.detach() for k, v in loaded.model.state_dict().items()}
    read, choose, layers, held = skv._read_layer, skv._choose, [], []
    monkeypatch.setattr(skv, "_read_layer", lambda *a: layers.append(read(*a)) or layers[-1])
    monkeypatch.setattr(skv, "_choose", lambda *a: held.append("o" in layers[-1].__dict__) or choose(*a))
    for i in range(dims.num_hidden_layers):
        view = Float64View({k: v for k, v in sd.items() if k.startswith(f"{spec.layers}.{i}.")})
        got = skv.share_kv_layer(view, spec, dims, i, mode="k=v", kv_heads=1, init="calibrated", calibration=cal)
        ref = skv.share_kv_layer({k: v.double() for k, v in sd.items()}, spec, dims, i, mode="k=v", kv_heads=1,
                                 init="calibrated", calibration=cal)
        o_key = f"{skv._o_key(spec, i)}.weight"
        assert o_key not in view._cache and f"{spec.layer(i, spec.q_proj)}.weight" in view._cache
        assert held == [False, False], held  # no W_O while the candidates are fitted (either state dict)
        held.clear()
        assert got.tensors.keys() == ref.tensors.keys()
        for k in ref.tensors:
            torch.testing.assert_close(got.tensors[k], ref.tensors[k], rtol=1e-10, atol=1e-12)  # float64 rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_normal_equations_leave_the_target_as_it_was(dtype):
    """_Normal.add sums ‖y‖² in place on its float64 copy of y: a float64 target (a float64 model's calibration, passed
    as a view of its rows) must not be squared, or every later fit on those rows sees another target."""
    import importlib

    skv = importlib.import_module("qkvconv.transforms.share_kv")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1, 64, 8, dtype=torch.float64, generator=g)
    y = torch.randn(128, 4, generator=g).to(dtype)
    before = y.clone()
    eq = skv._Normal.zeros(1, 8, 4).add(X, y[:64])
    assert torch.equal(y, before)
    torch.testing.assert_close(eq.yy, before[:64].double().pow(2).sum(), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------- CLI
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def _one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_cli_share_kv_and_inspect(tiny_models, tmp_path):
    out = tmp_path / "kv"
    result = _run("share-kv", tiny_models["llama"], "-o", out, "--mode", "k=v", "--kv-heads", "1", "--init",
                  "calibrated", "--num-seqs", "2", "--seq-len", "32")
    assert result.exit_code == 0, result.output
    assert "KL (nats/token)" in result.stdout and "512 → 128 bytes/token" in result.stdout
    info = json.loads(_run("inspect", out, "--json").stdout)
    assert info["kv_cache_bytes_per_token"] == 128 and info["layer_modes"] == ["k=v, kv_heads 1"] * 2
    table = _run("inspect", out)
    assert table.exit_code == 0, table.output
    record = json.loads((out / "qkvconv.json").read_text())["history"][-1]
    assert record["transform"] == "share-kv" and len(record["calibrated_fit"]) == 2


def test_cli_export_stock_says_no_cache_saving(tiny_models, tmp_path):
    result = _run("share-kv", tiny_models["gpt2"], "-o", tmp_path / "s", "--mode", "k=v", "--export", "stock",
                  "--num-seqs", "1", "--seq-len", "16")
    assert result.exit_code == 0, result.output
    assert "no K=V cache saving" in result.stdout


@pytest.mark.parametrize("args,msg", [
    (["--kv-heads", "3"], "must divide the 4 query heads"),
    (["--kv-heads", "4"], "exceeds the model's 2 key/value heads"),
    (["--mode", "k=q"], "unknown --mode"),
    ([], "nothing to do"),
    (["--mode", "k=v", "--export", "onnx"], "unknown --export"),
    (["--mode", "k=v", "--pos2d", "8"], "needs --mode q=k or q=k=v"),
    (["--mode", "q=k", "--pos2d", "6"], "multiple of 4"),
    (["--mode", "q=k", "--pos2d", "8", "--export", "stock"], "no stock equivalent"),
])
def test_cli_bad_options_refused_nothing_written(tiny_models, tmp_path, args, msg):
    out = tmp_path / "bad"
    result = _run("share-kv", tiny_models["llama"], "-o", out, *args, "--num-seqs", "1", "--seq-len", "16")
    assert result.exit_code == 1
    assert msg in _one_error_line(result)
    assert not out.exists()


def test_large_calibration_file_is_read_in_windows(tiny_models, tmp_path, monkeypatch):
    """A corpus over _WHOLE_FILE_BYTES is not tokenized whole: windows come from spread byte offsets."""
    import transformers

    from qkvconv import verify

    tok = transformers.AutoTokenizer.from_pretrained(tiny_models["llama"])
    text = "".join(f"line {i:05d} of the calibration corpus, with ünïcode.\n" for i in range(4000))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(verify, "_WHOLE_FILE_BYTES", 10_000)
    ids, source = verify.calibration_ids(None, tok, calib=path, num_seqs=5, seq_len=40)
    assert ids.shape == (5, 40) and "spread offsets" in source
    decoded = [tok.decode(row) for row in ids]
    assert decoded[0].startswith("line 00000")
    assert "0399" in decoded[-1]  # the last window is at the end of the file (lines 03990-03999)
    assert len(set(decoded)) == 5


@pytest.mark.parametrize("family_", ["llama", "gpt2", "gpt_neox"])
def test_pos2d_starts_at_zero_then_breaks_symmetry(tiny_models, tmp_path, family_):
    """q=k with --pos2d: identical to plain q=k as converted; with learned (here random) weights the logits move,
    eager and SDPA agree (the term rides on the attention mask), and cached generation equals uncached."""
    src = tiny_models[family_]
    share_kv_checkpoint(src, tmp_path / "qk", mode="q=k", **FAST)
    share_kv_checkpoint(src, tmp_path / "pos", mode="q=k", pos2d=8, **FAST)
    plain, tok = qkvconv.load(tmp_path / "qk")
    pos, _ = qkvconv.load(tmp_path / "pos")
    ids = tok(["The quick brown fox jumps"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(pos(ids).logits, plain(ids).logits, atol=0, rtol=0)
        weights = [p for n, p in pos.named_parameters() if n.endswith("pos2d.weight")]
        assert len(weights) == pos.config.num_hidden_layers and all(w.shape[1] == 8 for w in weights)
        for w in weights:
            w.normal_(0, 2.0)
        moved = pos(ids).logits
        assert (moved - plain(ids).logits).abs().max() > 1e-3
        eager, _ = qkvconv.load(tmp_path / "pos", attn_implementation="eager")
        eager.load_state_dict(pos.state_dict())
        torch.testing.assert_close(eager(ids).logits, moved, atol=1e-5, rtol=1e-5)
    per_token = kv_cache_bytes_per_token(pos.config, spec_for(pos.config.model_type), torch.float32)
    _check_cached_equals_uncached(pos, ids, 6, per_token)


def _reference_logits(sd: dict, config, ids: torch.Tensor) -> torch.Tensor:
    """An independent float64 forward of a LLaMA-family share-kv checkpoint, written from the math of METHODS.md §3
    and the saved weights alone (no modeling code, no cache): S = h·W_S + b_S; k=v: keys = RoPE(S), values = S;
    q=k: queries = RoPE(S) repeated over each head's query group; pooled heads serve H/N query heads each."""
    sd = {k: v.double() for k, v in sd.items()}
    d, H = config.hidden_size, config.num_attention_heads
    dh = d // H
    T = ids.shape[0]
    inv = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]  # (T, 1, dh)

    def rope(x):  # (T, n, dh), rotate_half convention
        return x * cos + torch.cat([-x[..., dh // 2 :], x[..., : dh // 2]], -1) * sin

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * w

    def lin(x, key):
        return x @ sd[f"{key}.weight"].T + sd.get(f"{key}.bias", 0)

    x = sd["model.embed_tokens.weight"][ids]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        a = p + "self_attn."
        s = lin(h, a + "s_proj").view(T, -1, dh) if a + "s_proj.weight" in sd else None
        q = s if a + "q_proj.weight" not in sd else lin(h, a + "q_proj").view(T, H, dh)
        k = s if a + "k_proj.weight" not in sd else lin(h, a + "k_proj").view(T, -1, dh)
        v = s if a + "v_proj.weight" not in sd else lin(h, a + "v_proj").view(T, -1, dh)
        q = q.repeat_interleave(H // q.shape[1], 1)
        k, v = rope(k).repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
        logits = torch.einsum("thd,shd->hts", rope(q), k) * dh**-0.5
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        o = torch.einsum("hts,shd->thd", logits.softmax(-1), v).reshape(T, H * dh)
        x = x + lin(o, a + "o_proj")
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(lin(h, p + "mlp.gate_proj"))
        x = x + lin(gate * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("family_", ["llama", "qwen2"])
def test_greedy_generation_matches_an_independent_reference(tiny_models, tmp_path, family_):
    """Every mode: the converted model's cached greedy generate() equals greedy decoding with the reference forward
    above (recomputed from scratch at every step), and its logits equal the reference's."""
    from safetensors.torch import load_file

    prompt = torch.tensor([1, 40, 41, 42, 43, 44])
    for mode, kv_heads in CASES:
        out = tmp_path / f"{mode}-{kv_heads}"
        share_kv_checkpoint(tiny_models[family_], out, mode=mode, kv_heads=kv_heads, **FAST)
        model, _ = qkvconv.load(out)
        sd = load_file(out / "model.safetensors")
        ref = prompt.clone()
        for _ in range(8):  # greedy, no cache: the whole sequence every step
            ref = torch.cat([ref, _reference_logits(sd, model.config, ref)[-1].argmax()[None]])
        gen = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=8, min_new_tokens=8, do_sample=False)
        with torch.no_grad():
            err = (model(ref[None]).logits[0].double() - _reference_logits(sd, model.config, ref)).abs().max().item()
        print(f"{family_} {mode} kv_heads={kv_heads}: max |Δlogit| vs reference {err:.2e}")
        assert err < 1e-4
        assert gen[0].tolist() == ref.tolist()


def test_value_directions_and_latent_bases_have_one_sign_whatever_the_solver_picks():
    """LAPACK and cuSOLVER return eigen/singular vectors with different signs; share-kv's value directions go into
    rotary key units (where a sign is not absorbed by the query refit), so they are canonicalised: the vectors a
    solver returns with any signs give the same directions. Measured on an H200: without this, share-kv k=v
    calibrated on SmolLM2 differed between --device cpu and cuda in 6 of 30 layers."""
    from qkvconv.transforms.latent_kv import _whiten
    from qkvconv.transforms.layer import column_signs
    from qkvconv.transforms.share_kv import _value_directions

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    E = _value_directions(x)
    assert bool((E.gather(0, E.abs().argmax(0, keepdim=True)) > 0).all())
    flips = torch.where(torch.rand(16, generator=g) < 0.5, -1.0, 1.0).double()
    assert torch.equal((E * flips) * column_signs(E * flips), E)  # another solver's signs: the same directions
    H = x.T @ x / len(x)
    W = torch.randn(16, 8, generator=g, dtype=torch.float64)
    f = _whiten(H, W)
    assert bool((f.Vh.gather(1, f.Vh.abs().argmax(1, keepdim=True)) > 0).all())
    torch.testing.assert_close(f.U * f.S @ f.Vh, torch.linalg.cholesky(H).T @ W, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_calibration_projections_cast_a_chunk_at_a_time(dtype, monkeypatch):
    """_Calib.act projects half-precision attention inputs ACT_ROWS rows at a time in float32 (no float32 copy of
    the inputs): the same products as one float32 matmul over the cast inputs, row by row, with the bias; float32
    inputs take the plain path."""
    import importlib

    skv = importlib.import_module("qkvconv.transforms.share_kv")
    from qkvconv.archs.layout import Proj

    monkeypatch.setattr(skv, "ACT_ROWS", 7)  # chunks that do not divide the rows
    g = torch.Generator().manual_seed(0)
    h = torch.randn(48, 16, generator=g).to(dtype)
    p = Proj(torch.randn(16, 12, dtype=torch.float64, generator=g), torch.randn(12, dtype=torch.float64, generator=g))
    c = skv._Calib.__new__(skv._Calib)
    c.h, c.dtype = h, torch.float32
    ref = h.float() @ p.W.float() + p.b.float()
    for rows in (slice(None), slice(5, 40), torch.tensor([3, 17, 2, 40])):
        out = c.act(p, rows)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref[rows], rtol=1e-6, atol=1e-6)
