"""finetune: lowers the held-out loss for every --train setting, resumes exactly, writes a qkvconv checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import qkvconv
from qkvconv.cli import app
from qkvconv.convert import absorb_query_checkpoint, attach_preproj_checkpoint, attach_query_mlp_checkpoint
from qkvconv.errors import CheckpointError, QkvconvError
from qkvconv.finetune import FinetuneConfig, finetune, iter_texts

runner = CliRunner()


def cfg(corpus, **kw) -> FinetuneConfig:
    base = dict(data=str(corpus), steps=8, seq_len=32, batch_size=4, lr=1e-2, eval_every=4, eval_seqs=4, save_every=0)
    return FinetuneConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "family,attach,train",
    [("llama", "query_mlp", "new"), ("qwen3", "preproj", "new"), ("gpt_neox", None, "attention"), ("gpt2", None, "all")],
)
def test_finetune_lowers_held_out_loss(tiny_models, corpus, tmp_path, family, attach, train):
    src = tiny_models[family]
    if attach == "query_mlp":
        attach_query_mlp_checkpoint(src, tmp_path / "conv", num_seqs=1, seq_len=16)
        src = tmp_path / "conv"
    elif attach == "preproj":
        attach_preproj_checkpoint(src, tmp_path / "conv", num_seqs=1, seq_len=16)
        src = tmp_path / "conv"
    res = finetune(src, tmp_path / "ft", cfg(corpus, train=train))
    print(f"{family} --train {train}: held-out {res.first_eval:.4f} -> {res.last_eval:.4f} "
          f"({res.trainable_parameters:,} trainable)")
    assert res.last_eval < res.first_eval
    # only the selected parameters moved
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    moved = {k for k in after if k in before and not torch.equal(before[k], after[k])}
    if train == "new":
        assert moved and all(any(m in k for m in ('.query_mlp.', '.preproj.', '.content_skip.')) for k in moved)
    elif train == "attention":
        assert moved and all(".attention." in k for k in moved)
    record = json.loads((tmp_path / "ft" / "qkvconv.json").read_text())
    assert record["history"][-1]["transform"] == "finetune" and record["history"][-1]["eval"]
    assert (tmp_path / "ft.run" / "curves.png").stat().st_size > 0
    assert len((tmp_path / "ft.run" / "train.jsonl").read_text().splitlines()) == 8


def test_resume_equals_uninterrupted(tiny_models, corpus, tmp_path):
    """gpt2 has dropout: an exact resume needs the RNG state and the data position as well as the weights."""
    src = tiny_models["gpt2"]
    c = cfg(corpus, train="attention", steps=6, save_every=2, lr=3e-3)
    full = finetune(src, tmp_path / "full", c)

    def kill(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(src, tmp_path / "part", c, on_step=kill)
    assert not (tmp_path / "part").exists() and (tmp_path / "part.run" / "state.pt").is_file()
    resumed = finetune(src, tmp_path / "part", c, resume=True)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert [r["loss"] for r in resumed.train_curve] == pytest.approx([r["loss"] for r in full.train_curve], abs=1e-6)
    assert not (tmp_path / "part.run" / "state.pt").exists()  # finished: nothing to resume


def test_finetune_heals_absorb_drop(tiny_models, corpus, tmp_path):
    absorb_query_checkpoint(tiny_models["llama"], tmp_path / "drop", mode="drop", num_seqs=2, seq_len=32)
    with pytest.raises(QkvconvError, match="no modules added by qkvconv"):
        finetune(tmp_path / "drop", tmp_path / "x", cfg(corpus, train="new"))
    res = finetune(tmp_path / "drop", tmp_path / "healed", cfg(corpus, train="attention", lr=3e-3))
    print(f"absorb drop --train attention: held-out {res.first_eval:.4f} -> {res.last_eval:.4f}")
    assert res.last_eval < res.first_eval
    model, _ = qkvconv.load(tmp_path / "healed")  # still an identity-query checkpoint
    assert not any(".q_proj." in k for k in model.state_dict())
    # the control: same data, schedule and seed on the model it was converted from
    ctrl = finetune(tmp_path / "healed", None, cfg(corpus, train="attention", lr=3e-3), run_dir=tmp_path / "ctrl",
                    control=True)
    assert ctrl.eval_curve[0]["loss"] != res.first_eval


def test_data_sources(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "d" / "b.txt").write_text("three\nfour\n")
    pieces = list(iter_texts(str(tmp_path / "d")))
    assert [t for t, _ in pieces if t] == ["one", "two", "three\nfour\n"]
    with pytest.raises(QkvconvError, match="no such file"):
        list(iter_texts(str(tmp_path / "missing.txt")))
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(QkvconvError, match="text"):
        list(iter_texts(str(tmp_path / "bad.jsonl")))


def test_cli_finetune_and_bad_input(tiny_models, corpus, tmp_path):
    env = {"COLUMNS": "200"}
    args = ["--data", str(corpus), "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--eval-every", "3",
            "--eval-seqs", "2", "--train", "all", "--device", "cpu"]
    r = runner.invoke(app, ["finetune", str(tiny_models["qwen2"]), "-o", str(tmp_path / "ft"), *args], env=env)
    assert r.exit_code == 0, r.output
    assert "finetune --train all" in r.stdout and "wrote" in r.stdout
    info = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "ft"), "--json"], env=env).stdout)
    assert info["family"] == "llama"
    for bad, message in [
        (["finetune", str(tiny_models["qwen2"]), "-o", str(tmp_path / "ft"), *args], "already exists"),
        (["finetune", str(tiny_models["qwen2"]), "-o", str(tmp_path / "n"), *args[2:], "--data", str(tmp_path / "no.txt")],
         "no such file"),
        (["finetune", str(tiny_models["qwen2"]), "-o", str(tmp_path / "r"), *args, "--resume"], "no checkpoint"),
        (["finetune", str(tiny_models["qwen2"]), "-o", str(tmp_path / "s"), "--data", str(corpus)], "--steps or --tokens"),
    ]:
        r = runner.invoke(app, bad, env=env)
        assert r.exit_code == 1, r.output
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output
    assert not (tmp_path / "n").exists() and not (tmp_path / "r").exists()


def test_resume_refuses_different_options(tiny_models, corpus, tmp_path):
    c = cfg(corpus, train="all", steps=4, save_every=2)

    def kill(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_models["llama"], tmp_path / "o", c, on_step=kill)
    with pytest.raises(QkvconvError, match="differs from the saved one in lr"):
        finetune(tiny_models["llama"], tmp_path / "o", cfg(corpus, train="all", steps=4, save_every=2, lr=1.0), resume=True)
    with pytest.raises(CheckpointError, match="unfinished run"):
        finetune(tiny_models["llama"], tmp_path / "o", c)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_finetune_heals_share_kv(tiny_models, corpus, tmp_path, family):
    from qkvconv.convert import share_kv_checkpoint

    share_kv_checkpoint(tiny_models[family], tmp_path / "kv", mode="k=v", kv_heads=1, num_seqs=2, seq_len=32)
    res = finetune(tmp_path / "kv", tmp_path / "healed", cfg(corpus, train="attention", lr=3e-3))
    print(f"{family} share-kv k=v kv_heads 1 --train attention: held-out {res.first_eval:.4f} -> {res.last_eval:.4f}")
    assert res.last_eval < res.first_eval
    model, _ = qkvconv.load(tmp_path / "healed")  # still the shared-projection layout, cache and all
    assert any(".s_proj." in k for k in model.state_dict()) and not any(".v_proj." in k for k in model.state_dict())


def test_torchrun_ddp_equals_single_process_accumulation(tiny_models, corpus, tmp_path):
    """2 CPU processes under torchrun (gloo DDP), batch 2 each == 1 process, batch 2 × 2 accumulation steps."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    args = ["--data", str(corpus), "--steps", "4", "--seq-len", "32", "--eval-every", "2", "--eval-seqs", "2",
            "--train", "all", "--lr", "3e-3", "--device", "cpu", "--save-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    ddp = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "qkvconv.cli", "finetune",
                          str(tiny_models["llama"]), "-o", str(tmp_path / "ddp"), "--batch-size", "2", *args],
                         env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = finetune(tiny_models["llama"], tmp_path / "one",
                      cfg(corpus, train="all", steps=4, batch_size=2, grad_accum=2, lr=3e-3, eval_every=2, eval_seqs=2))
    a, b = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"DDP (2 procs) vs single process + accumulation: max |Δweight| {diff:.2e}")
    assert diff < 1e-5
    records = [json.loads((tmp_path / d / "qkvconv.json").read_text())["history"][-1] for d in ("ddp", "one")]
    assert [r["processes"] for r in records] == [2, 1] and all(r["peak_rss_bytes"] > 0 for r in records)
    ddp_curve = [json.loads(x)["loss"] for x in (tmp_path / "ddp.run" / "train.jsonl").read_text().splitlines()]
    assert ddp_curve == pytest.approx([r["loss"] for r in single.train_curve], abs=1e-5)


def test_train_new_trains_only_the_pos2d_term(tiny_models, corpus, tmp_path):
    from qkvconv.convert import share_kv_checkpoint

    share_kv_checkpoint(tiny_models["llama"], tmp_path / "qk", mode="q=k", pos2d=8, num_seqs=2, seq_len=32)
    res = finetune(tmp_path / "qk", tmp_path / "ft", cfg(corpus, train="new", lr=3e-2))
    print(f"q=k pos2d --train new: held-out {res.first_eval:.4f} -> {res.last_eval:.4f} "
          f"({res.trainable_parameters} trainable)")
    before, after = load_file(tmp_path / "qk" / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    moved = {k for k in after if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith(".pos2d.weight") for k in moved)
    assert res.last_eval != res.first_eval  # the term is live (on random tiny weights it need not help)


def test_bf16_autocast_keeps_fp32_master_weights(tiny_models, corpus, tmp_path):
    res = finetune(tiny_models["llama"], tmp_path / "bf16", cfg(corpus, train="all", precision="bf16"), device="cpu")
    print(f"bf16 autocast --train all: held-out {res.first_eval:.4f} -> {res.last_eval:.4f}")
    assert res.last_eval < res.first_eval
    after = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in after.values())  # master weights (and the output) stay fp32


def test_distill_pulls_a_share_kv_model_towards_its_original(tiny_models, corpus, tmp_path):
    """--distill 1: the loss is KL(original ‖ model); the held-out KL it logs falls, and the teacher defaults to the
    checkpoint the model was converted from (its qkvconv history)."""
    from qkvconv.convert import share_kv_checkpoint

    share_kv_checkpoint(tiny_models["llama"], tmp_path / "kv", mode="k=v", num_seqs=2, seq_len=32)
    res = finetune(tmp_path / "kv", tmp_path / "ft", cfg(corpus, train="attention", distill=1.0, lr=3e-3))
    kls = [row["kl"] for row in res.eval_curve]
    print(f"held-out KL to the original: {kls[0]:.4f} -> {kls[-1]:.4f}")
    assert kls[0] > 1e-3 and kls[-1] < 0.9 * kls[0]
    record = json.loads((tmp_path / "ft" / "qkvconv.json").read_text())
    assert record["history"][-1]["options"]["distill"] == 1.0
    # the original as its own teacher: KL exactly 0 at step 0 (the KL is computed on the same distributions)
    same = finetune(tiny_models["llama"], None, cfg(corpus, train="attention", distill=0.5, steps=1,
                                                    teacher=str(tiny_models["llama"])), run_dir=tmp_path / "same")
    assert abs(same.eval_curve[0]["kl"]) < 1e-6


def test_eval_kl_logs_the_distance_to_the_original_without_distilling(tiny_models, corpus, tmp_path):
    """--eval-kl: the held-out KL to the original is logged at every eval while the loss stays the LM loss; on an
    unconverted model the original is the model as it starts (KL 0 at step 0, then it drifts away); the weights are
    those of the same run without --eval-kl."""
    plain = finetune(tiny_models["llama"], None, cfg(corpus, train="attention"), run_dir=tmp_path / "plain")
    with_kl = finetune(tiny_models["llama"], tmp_path / "ft", cfg(corpus, train="attention", eval_kl=True),
                       run_dir=tmp_path / "kl")
    kls = [row["kl"] for row in with_kl.eval_curve]
    print(f"held-out KL of the healed model to its start: {kls}")
    assert abs(kls[0]) < 1e-6 and kls[-1] > 1e-4
    assert [r["loss"] for r in with_kl.eval_curve] == [r["loss"] for r in plain.eval_curve]
    assert all("kl" not in r for r in plain.eval_curve)


@pytest.mark.parametrize("kw,match", [({"distill": 1.5}, "between 0 and 1"), ({"teacher": "x"}, "only used with"),
                                      ({"distill": 1.0, "control": True}, "distil the original into itself")])
def test_distill_bad_options(tiny_models, corpus, tmp_path, kw, match):
    control = kw.pop("control", False)
    with pytest.raises(QkvconvError, match=match):
        finetune(tiny_models["llama"], tmp_path / "ft", cfg(corpus, train="attention", **kw), control=control)
    assert not (tmp_path / "ft").exists()


def test_lr_new_sets_the_added_modules_lr_and_leaves_the_rest_at_lr(tiny_models, corpus, tmp_path):
    """--lr-new: the latent projections latent-kv added train at lr_new while the rest of the attention, at an lr too
    small to move an fp32 weight, stays bit-identical; on an unmodified model (a control) there is nothing new, so it
    is one group at --lr; with LoRA it is refused."""
    from qkvconv.convert import latent_kv_checkpoint
    from qkvconv.finetune import param_groups
    from qkvconv.checkpoint import load

    latent_kv_checkpoint(tiny_models["llama"], tmp_path / "lat", kv_rank=8, num_seqs=3, seq_len=32, calib="sample")
    res = finetune(tmp_path / "lat", tmp_path / "ft", cfg(corpus, train="attention", steps=4, lr=1e-15, lr_new=1e-2))
    before, after = load_file(tmp_path / "lat" / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    moved = sorted(k for k in after if not torch.equal(before[k], after[k]))
    print(f"moved at lr_new 1e-2 with lr 1e-15: {len(moved)} tensors, e.g. {moved[:2]}; "
          f"held-out {res.first_eval:.4f} -> {res.last_eval:.4f}")
    assert moved and all(any(f".{m}." in k for m in ("kv_a_proj", "k_b_proj", "v_b_proj")) for k in moved)
    assert any(".q_proj." in k for k in after)  # the rest of the attention was there to move, and did not

    base = load(tiny_models["llama"], dtype=torch.float32)
    for p in base.model.parameters():
        p.requires_grad_(True)
    groups = param_groups(base.model, base.spec, cfg(corpus, lr_new=1.0))
    assert len(groups) == 1 and "lr" not in groups[0]  # nothing added: every weight at --lr
    with pytest.raises(QkvconvError, match="--lr-new"):
        finetune(tmp_path / "lat", tmp_path / "ft2", cfg(corpus, lr_new=1e-2, lora=4))


def test_a_resumed_run_keeps_lr_news_two_parameter_groups(tiny_models, corpus, tmp_path):
    """The optimizer state of both groups (added modules at --lr-new, the rest at --lr) and their schedules come back
    from state.pt: killed and resumed equals uninterrupted."""
    from qkvconv.convert import latent_kv_checkpoint

    latent_kv_checkpoint(tiny_models["llama"], tmp_path / "lat", kv_rank=8, num_seqs=3, seq_len=32, calib="sample")
    c = cfg(corpus, train="attention", steps=4, save_every=2, lr=1e-3, lr_new=1e-2)
    full = finetune(tmp_path / "lat", tmp_path / "full", c)

    def kill(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tmp_path / "lat", tmp_path / "part", c, on_step=kill)
    resumed = finetune(tmp_path / "lat", tmp_path / "part", c, resume=True)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert [r["lr"] for r in resumed.train_curve] == [r["lr"] for r in full.train_curve]
    assert max(r["lr"] for r in full.train_curve) == pytest.approx(1e-3)  # the logged lr is --lr's
