"""finetune on accelerate: FSDP (2 CPU processes, gloo) = one process with accumulation, exact resume under FSDP and
DDP, LoRA (lowers the held-out loss; the merged checkpoint = the adapter model), gradient checkpointing, and streamed
data that resumes at the same token."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qkvconv
from qkvconv.finetune import FinetuneConfig, finetune, iter_texts
from qkvconv.textstream import WindowStream

LAUNCHER = Path(__file__).with_name("launch_finetune.py")
TOLERANCE = 1e-5  # max |Δweight| between 2 processes and 1 process with accumulation: fp32 reduction order only


def config(corpus, **kw) -> dict:
    base = dict(data=str(corpus), steps=6, seq_len=32, batch_size=2, lr=3e-3, eval_every=3, eval_seqs=2, save_every=0,
                train="attention")
    return {**base, **kw}


def launch(kind: str, tmp_path: Path, name: str, model: Path, cfg: dict, *, resume=False, kill_at=None, output=True):
    """Run finetune in 2 CPU processes: DDP under torchrun, FSDP under `accelerate launch --use_fsdp`."""
    job = tmp_path / f"{name}.json"
    job.write_text(json.dumps({"model": str(model), "output": str(tmp_path / name) if output else None,
                               "run_dir": str(tmp_path / f"{name}.run"), "config": cfg, "resume": resume,
                               "kill_at": kill_at}))
    bin_dir = Path(sys.executable).parent
    if kind == "ddp":
        cmd = [shutil.which("torchrun") or str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    else:
        cmd = [shutil.which("accelerate") or str(bin_dir / "accelerate"), "launch", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--use_fsdp",
               "--fsdp_version", "2", "--main_process_port", str(29500 + random.randrange(1000))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(qkvconv.__file__).parents[1])}
    return subprocess.run([*cmd, str(LAUNCHER), str(job)], env=env, capture_output=True, text=True, timeout=600)


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def curve(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "train.jsonl").read_text().splitlines()]


def test_fsdp_equals_one_process_with_accumulation_and_resumes_exactly(tiny_models, corpus, tmp_path):
    """FSDP2 over 2 gloo processes (batch 2 each) = 1 process, batch 2 × 2 micro-batches, within TOLERANCE; with the
    teacher of --distill sharded too. Killed after step 5 (last state at step 4) and resumed: the same weights."""
    src = tiny_models["llama"]
    cfg = config(corpus, distill=0.5, teacher=str(src), save_every=2)
    fsdp = launch("fsdp", tmp_path, "fsdp", src, cfg)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    finetune(src, tmp_path / "one", FinetuneConfig(**{**cfg, "grad_accum": 2}), device="cpu")
    diff = max_diff(tmp_path / "fsdp", tmp_path / "one")
    print(f"FSDP (2 procs) vs 1 process + accumulation: max |Δweight| {diff:.2e}")
    assert diff < TOLERANCE
    assert curve(tmp_path / "fsdp.run") == pytest.approx(curve(tmp_path / "one.run"), abs=TOLERANCE)
    record = json.loads((tmp_path / "fsdp" / "qkvconv.json").read_text())["history"][-1]
    assert record["strategy"] == "fsdp-cpu" and record["processes"] == 2 and record["tokens_per_s"] > 0
    assert record["parameters_per_process"] < 0.6 * record["parameters"]  # each process holds about half
    kills = [json.loads(r) for r in (tmp_path / "fsdp.run" / "eval.jsonl").read_text().splitlines()]
    assert kills[-1]["loss"] < kills[0]["loss"]

    killed = launch("fsdp", tmp_path, "part", src, cfg, kill_at=5)
    assert killed.returncode != 0 and (tmp_path / "part.run" / "state.pt").is_file(), killed.stderr[-3000:]
    assert not (tmp_path / "part").exists()
    resumed = launch("fsdp", tmp_path, "part", src, cfg, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    diff = max_diff(tmp_path / "fsdp", tmp_path / "part")
    print(f"FSDP resumed vs uninterrupted: max |Δweight| {diff:.2e}")
    assert diff < 1e-6
    assert curve(tmp_path / "part.run") == pytest.approx(curve(tmp_path / "fsdp.run"), abs=1e-6)


@pytest.mark.slow
def test_ddp_resume_equals_uninterrupted(tiny_models, corpus, tmp_path):
    """gpt2 (dropout, tied embeddings) under torchrun DDP: killed after step 5, resumed from step 4 = uninterrupted."""
    src = tiny_models["gpt2"]
    cfg = config(corpus, save_every=2)
    for name, kw in [("full", {}), ("part", {"kill_at": 5}), ("part", {"resume": True})]:
        r = launch("ddp", tmp_path, name, src, cfg, **kw)
        assert (r.returncode == 0) == ("kill_at" not in kw), r.stderr[-3000:]
    diff = max_diff(tmp_path / "full", tmp_path / "part")
    print(f"DDP resumed vs uninterrupted: max |Δweight| {diff:.2e}")
    assert diff < 1e-6


def test_lora_lowers_held_out_loss_and_merges_into_a_normal_checkpoint(tiny_models, corpus, tmp_path):
    """--lora 4 on a share-kv model's attention: only adapters train, the held-out loss falls, and the merged
    checkpoint (normal layout, no adapter weights) scores the held-out windows exactly as the adapter model did."""
    from qkvconv.convert import share_kv_checkpoint

    share_kv_checkpoint(tiny_models["llama"], tmp_path / "kv", mode="k=v", num_seqs=2, seq_len=32)
    cfg = FinetuneConfig(**config(corpus, lora=4, lr=1e-2, steps=8, eval_every=4, eval_seqs=4))
    full = finetune(tmp_path / "kv", None, FinetuneConfig(**config(corpus, steps=1, eval_seqs=4)), run_dir=tmp_path / "f")
    res = finetune(tmp_path / "kv", tmp_path / "lora", cfg, device="cpu")
    print(f"LoRA r=4: held-out {res.first_eval:.4f} -> {res.last_eval:.4f}, {res.trainable_parameters:,} trainable "
          f"(full --train attention: {full.trainable_parameters:,})")
    assert res.last_eval < res.first_eval - 0.05
    assert res.trainable_parameters < full.trainable_parameters / 2
    after, before = load_file(tmp_path / "lora" / "model.safetensors"), load_file(tmp_path / "kv" / "model.safetensors")
    assert after.keys() == before.keys()  # no lora_A / lora_B / base_layer names: a normal checkpoint
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all(".self_attn." in k and k.endswith("proj.weight") for k in moved)
    model, _ = qkvconv.load(tmp_path / "lora")  # still the shared-projection layout
    assert any(".s_proj." in k for k in model.state_dict())
    # the merged model on the same held-out windows (the first eval_seqs windows of the data) = the adapter model
    healed = finetune(tmp_path / "lora", None, FinetuneConfig(**config(corpus, steps=1, eval_seqs=4, lr=1e-12)),
                      run_dir=tmp_path / "h")
    assert healed.first_eval == pytest.approx(res.last_eval, abs=1e-5)


def test_merge_lora_gives_the_adapter_models_logits(tiny_models):
    from qkvconv.engine import add_lora, lora_config, lora_targets, merge_lora

    for family in ("llama", "gpt2"):  # nn.Linear projections, and GPT-2's transposed Conv1D
        net = qkvconv.load(tiny_models[family])[0]
        names = {n for n, _ in net.named_parameters() if ".attn" in n or ".self_attn." in n}
        cfg = lora_config(4, 8.0, lora_targets(net, names))
        with warnings.catch_warnings():  # nothing stray through the progress display (peft reads a deprecated flag)
            warnings.simplefilter("error", FutureWarning)
            adapted = add_lora(net, cfg, [])
        with torch.no_grad():
            for n, p in adapted.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.5)  # trained adapters: B ≠ 0
        x = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
        merged = qkvconv.load(tiny_models[family])[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            merged.load_state_dict(merge_lora(qkvconv.load(tiny_models[family])[0], cfg, adapted.state_dict()))
        with torch.no_grad():
            want, got = adapted(input_ids=x).logits, merged(input_ids=x).logits
            original = qkvconv.load(tiny_models[family])[0](input_ids=x).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert float((want - original).abs().max()) > 1e-2  # the adapters do change the model


def test_gradient_checkpointing_recomputes_and_gives_the_same_weights(tiny_models, corpus, tmp_path):
    from qkvconv.engine import checkpoint_layers

    net = qkvconv.load(tiny_models["gpt2"])[0].train()
    calls = []
    net.transformer.h[0].attn.register_forward_hook(lambda *a: calls.append(1))
    checkpoint_layers(net)
    x = torch.randint(3, 100, (2, 16))
    net(input_ids=x, labels=x).loss.backward()
    assert len(calls) == 2  # the layer ran again in the backward: its activations were not kept

    src = tiny_models["gpt2"]  # with dropout: recomputation must redraw the same masks
    plain = finetune(src, tmp_path / "plain", FinetuneConfig(**config(corpus, steps=4)), device="cpu")
    ckpt = finetune(src, tmp_path / "ckpt", FinetuneConfig(**config(corpus, steps=4, gradient_checkpointing=True)),
                    device="cpu")
    assert max_diff(tmp_path / "plain", tmp_path / "ckpt") < 1e-6
    assert [r["loss"] for r in ckpt.train_curve] == pytest.approx([r["loss"] for r in plain.train_curve], abs=1e-6)


def test_stream_is_deterministic_and_resumes_at_the_same_token(tiny_models, corpus, tmp_path):
    tokenizer = qkvconv.load(tiny_models["llama"])[1]
    (tmp_path / "d").mkdir()
    lines = corpus.read_text().splitlines()
    (tmp_path / "d" / "a.txt").write_text("\n".join(lines[:20]))  # ~1.2k tokens, 1 piece: windows cross a file
    (tmp_path / "d" / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[20:60]))

    def stream(seed=0):
        return WindowStream(lambda: iter_texts(str(tmp_path / "d")), tokenizer, 64, seed=seed, buffer=8)

    straight = stream().take(200)  # past the end of the text: a second epoch and more
    assert straight.shape == (200, 64) and not torch.equal(straight, stream(seed=1).take(200))
    for cut in (1, 37, 113):  # mid-file, mid-epoch, in the second epoch
        s = stream()
        first = s.take(cut)
        torch.save(s.state_dict(), tmp_path / "state.pt")
        again = stream()
        again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
        assert torch.equal(torch.cat([first, again.take(200 - cut)]), straight)
    # the text order is kept apart from the buffer: every token of the text is used, EOS after each document
    head = stream().head(10).flatten().tolist()
    assert tokenizer.decode(head[:50]) == ("\n".join(lines[:20]))[:50]


def test_streamed_finetune_resumes_exactly(tiny_models, corpus, tmp_path):
    """A streamed heal killed mid-epoch and resumed (the stream's position in state.pt) = the uninterrupted one."""
    src = tiny_models["gpt2"]
    cfg = FinetuneConfig(**config(corpus, stream=True, shuffle_buffer=16, save_every=2, steps=6))
    full = finetune(src, tmp_path / "full", cfg, device="cpu")

    def kill(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(src, tmp_path / "part", cfg, device="cpu", on_step=kill)
    state = torch.load(tmp_path / "part.run" / "state.pt", weights_only=False)
    assert state["data"]["pieces"] > 0 and state["step"] == 4
    resumed = finetune(src, tmp_path / "part", cfg, device="cpu", resume=True)
    assert max_diff(tmp_path / "full", tmp_path / "part") < 1e-6
    assert [r["loss"] for r in resumed.train_curve] == pytest.approx([r["loss"] for r in full.train_curve], abs=1e-6)
    assert full.last_eval < full.first_eval


def test_lora_resume_equals_uninterrupted(tiny_models, corpus, tmp_path):
    """The adapters (and the optimizer's state for them) are what state.pt keeps for a LoRA run."""
    cfg = FinetuneConfig(**config(corpus, lora=4, lr=1e-2, steps=4, save_every=2))
    finetune(tiny_models["llama"], tmp_path / "full", cfg, device="cpu")

    def kill(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_models["llama"], tmp_path / "part", cfg, device="cpu", on_step=kill)
    saved = torch.load(tmp_path / "part.run" / "state.pt", weights_only=False)["trainable"]
    assert saved and all("lora_" in k or "layernorm" in k for k in saved)
    finetune(tiny_models["llama"], tmp_path / "part", cfg, device="cpu", resume=True)
    assert max_diff(tmp_path / "full", tmp_path / "part") < 1e-6
