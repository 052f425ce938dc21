"""finetune and eval on the issue-11 families: every one is converted (share-kv k=v, the data-free key init),
healed by `finetune --train attention` (the held-out loss falls, the output loads and keeps its shared-KV layout)
and evaluated with lm-eval on the tiny local tasks (the results table has the task, with a finite metric).
`--train new` on attach-query-mlp models of a fused-QKV family (phi3) and a sandwich-norm one (gemma2), and on an
attach-preproj model of a family without a pre-attention norm (olmo2), trains the added modules only. The tiny
models come from the family test files' own builders. Run with -s for the numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from test_evaluate import tiny_data_dir  # noqa: F401  (fixture)
from test_families_gemma import build_gemma
from test_families_llama_like import build as build_llama_like
from test_families_misc import _build as build_misc
from test_finetune import cfg

import qkvconv
from qkvconv.archs import spec_for
from qkvconv.cli import eval_entry
from qkvconv.convert import attach_preproj_checkpoint, attach_query_mlp_checkpoint, share_kv_checkpoint
from qkvconv.describe import parameter_counts
from qkvconv.evaluate import evaluate_models
from qkvconv.finetune import finetune, trainable_names
from qkvconv.report import eval_table
from qkvconv.transforms.attach import attention_parts

# model_type -> the builder of its tiny random model (the one its family test file uses)
BUILDERS = {
    "gemma": lambda p: build_gemma("gemma", p),
    "gemma2": lambda p: build_gemma("gemma2", p),
    "gemma3_text": lambda p: build_gemma("gemma3", p),
    "phi3": lambda p: build_misc("phi3", p),
    "phi": lambda p: build_misc("phi", p),
    "stablelm": lambda p: build_misc("stablelm", p),
    "olmo2": lambda p: build_misc("olmo2", p),
    "granite": lambda p: build_llama_like("granite", p),
    "smollm3": lambda p: build_llama_like("smollm3", p),
    "gpt_oss": lambda p: build_llama_like("gpt_oss", p),
}
FAST = dict(num_seqs=1, seq_len=16)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root, built = tmp_path_factory.mktemp("heal_eval"), {}

    def get(model_type):
        if model_type not in built:
            built[model_type] = BUILDERS[model_type](root / model_type)
        return built[model_type]

    return get


def _moved(before_dir, after_dir) -> set[str]:
    before, after = load_file(before_dir / "model.safetensors"), load_file(after_dir / "model.safetensors")
    return {k for k in after if k in before and not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def healed(family_models, corpus, tmp_path_factory):
    """model_type -> (share-kv k=v checkpoint, its healed copy, the FinetuneResult), made once per family."""
    root, done = tmp_path_factory.mktemp("healed"), {}

    def get(model_type):
        if model_type not in done:
            kv, out = root / f"{model_type}-kv", root / f"{model_type}-healed"
            share_kv_checkpoint(family_models(model_type), kv, mode="k=v", init="key", verify=False, **FAST)
            res = finetune(kv, out, cfg(corpus, train="attention", steps=6, eval_every=3, lr=3e-3))
            done[model_type] = kv, out, res
        return done[model_type]

    return get


@pytest.mark.parametrize("model_type", list(BUILDERS))
def test_finetune_heals_share_kv(healed, model_type):
    kv, out, res = healed(model_type)
    print(f"\n{model_type} share-kv k=v --train attention: held-out {res.first_eval:.4f} -> {res.last_eval:.4f} "
          f"({res.trainable_parameters:,} trainable)")
    assert res.last_eval < res.first_eval
    # only the attention (and what sits on its input) moved
    spec = spec_for(model_type)
    model, _ = qkvconv.load(out)
    parts = tuple(f".{p}." for p in attention_parts(spec))
    moved = _moved(kv, out)
    assert moved and all(any(p in f".{k}" for p in parts) for k in moved), sorted(moved)
    assert not any(".None." in n for n in trainable_names(model, spec, "attention"))
    assert parameter_counts(model, spec)["attention"] == res.trainable_parameters  # inspect counts what it trains
    # the healed checkpoint is still share-kv: every layer K=V, with its shared cache
    assert all(layer["kv"] == "shared" for layer in model.config.qkvconv["layers"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 40, 41, 42, 43]])).logits).all()


def test_eval_healed_models(healed, tiny_data_dir):
    """One lm-eval run over every family's healed checkpoint (the task index is built once: ~20 s on its own),
    each loaded as `qkvconv eval` loads it."""
    entries = [eval_entry(str(healed(t)[1]), dtype=torch.float32, allow_pickle=False, trust_remote_code=False, name=t)
               for t in BUILDERS]
    report = evaluate_models(entries, tasks=["lambada_openai"], limit=2, batch_size=2, device="cpu",
                             data_dir=tiny_data_dir, seed=1234, bootstrap_iters=10,
                             console=Console(stderr=True, quiet=True))
    assert [row.name for row in report.rows] == list(BUILDERS)
    for row in report.rows:
        ppl, acc = row.metric("lambada_openai", "perplexity"), row.metric("lambada_openai", "acc")
        print(f"{row.name} healed: lambada_openai (limit 2) perplexity {ppl.value:.4g}, acc {acc.value:.2f}; "
              f"{row.num_parameters:,} parameters, KV {row.kv_cache_bytes_per_token} B/token")
        assert math.isfinite(ppl.value) and 0 <= acc.value <= 1
        model, _ = qkvconv.load(healed(row.name)[1])
        assert row.num_parameters == sum(p.numel() for p in model.parameters())
        assert 0 < row.kv_cache_bytes_per_token
    console = Console(record=True, width=200)
    console.print(eval_table(report))
    text = console.export_text()
    assert "lambada_openai" in text and all(t in text for t in BUILDERS)


@pytest.mark.parametrize("model_type,attach", [("phi3", "query_mlp"), ("gemma2", "query_mlp"), ("olmo2", "preproj")])
def test_train_new_on_attached_modules(family_models, corpus, tmp_path, model_type, attach):
    """--train new selects the attached modules by their module paths, and nothing else moves: phi3 packs q/k/v in
    one qkv_proj (the query MLP hangs on it), gemma2 has sandwich norms around attention, olmo2 has no pre-attention
    norm (the pre-projection MLP sits on the attention's input instead)."""
    convert = attach_query_mlp_checkpoint if attach == "query_mlp" else attach_preproj_checkpoint
    convert(family_models(model_type), tmp_path / "attached", **FAST)
    res = finetune(tmp_path / "attached", tmp_path / "ft", cfg(corpus, train="new", steps=6, eval_every=3))
    print(f"\n{model_type} attach-{attach.replace('_', '-')} --train new: held-out {res.first_eval:.4f} -> "
          f"{res.last_eval:.4f} ({res.trainable_parameters:,} trainable)")
    assert res.last_eval < res.first_eval
    marks = (".query_mlp.",) if attach == "query_mlp" else (".preproj.", ".content_skip.")
    moved = _moved(tmp_path / "attached", tmp_path / "ft")
    assert moved and all(any(m in k for m in marks) for k in moved), sorted(moved)
    model, _ = qkvconv.load(tmp_path / "ft")
    added = {n for n, _ in model.named_parameters() if any(m in n for m in marks)}
    assert added == set(trainable_names(model, spec_for(model_type), "new"))
    assert res.trainable_parameters == sum(p.numel() for n, p in model.named_parameters() if n in added)
