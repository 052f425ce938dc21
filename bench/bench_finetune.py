"""Throughput and peak memory of `qkvconv finetune`, one line per strategy, on SmolLM2-135M (or --model).

    python bench/bench_finetune.py [--steps 4] [--batch-size 4] [--seq-len 256] [--train all] [--precision fp32]
                                   [--strategies single,ddp,fsdp,lora,grad-ckpt] [--model PATH] [--device auto]

Each strategy is a fresh `qkvconv finetune` process (or 2, launched) so its peak memory is its own:
  single     one process
  ddp        2 processes under torchrun (gloo on CPU, NCCL on GPUs): each a batch of --batch-size
  fsdp       2 processes under `accelerate launch --use_fsdp --fsdp_version 2` (on CPU: torch FSDP2 over gloo)
  lora       one process, --lora 16 on the --train selection
  grad-ckpt  one process, --gradient-checkpointing
Prints tokens/s (optimizer steps only, after loading), the main process's peak RSS, peak GPU memory on CUDA, MFU
(6·N·tokens/s over the device's peak, CUDA only) and the parameters the main process holds. Data:
<repo>/../shared/data/gutenberg_en (or $QKVCONV_DATA_DIR), tokenized lazily. Figures are the record's
(qkvconv.json), the same numbers `finetune` stores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qkvconv.defaults import default_checkpoint

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QKVCONV_DATA_DIR", REPO.parent / "shared" / "data")) / "gutenberg_en"
STRATEGIES = {
    "single": ([], []),
    "ddp": (["torchrun", "--standalone", "--nproc-per-node", "2"], []),
    "fsdp": (["accelerate", "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--use_fsdp", "--fsdp_version", "2"], []),
    "lora": ([], ["--lora", "16"]),
    "grad-ckpt": ([], ["--gradient-checkpointing"]),
}


def run(name: str, model: str, args, tmp: Path) -> dict:
    launcher, extra = STRATEGIES[name]
    bin_dir = Path(sys.executable).parent
    head = ([str(bin_dir / launcher[0]) if (bin_dir / launcher[0]).exists() else shutil.which(launcher[0]), *launcher[1:]]
            if launcher else [sys.executable])
    cmd = [*head, "-m", "qkvconv.cli", "finetune", model, "-o", str(tmp / name), "--data", args.data,
           "--eval-data", args.eval_data, "--train", args.train, "--steps", str(args.steps), "--seq-len",
           str(args.seq_len), "--batch-size", str(args.batch_size), "--lr", "1e-5", "--eval-every", "0",
           "--eval-seqs", "2", "--save-every", "0", "--precision", args.precision, "--device", args.device, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        errors = [ln for ln in p.stderr.splitlines() if "Error" in ln or ln.startswith("error:")]
        return {"error": (errors or p.stderr.strip().splitlines() or ["?"])[-1]}
    record = json.loads((tmp / name / "qkvconv.json").read_text())["history"][-1]
    return record | {"wall": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--train", default="all")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--data", default=str(DATA / "gutenberg_en_train.txt"))
    ap.add_argument("--eval-data", default=str(DATA / "gutenberg_en_valid.txt"))
    args = ap.parse_args()
    model = args.model or (str(Path("/tmp/smol-st")) if Path("/tmp/smol-st").is_dir() else str(default_checkpoint()))
    print(f"model {Path(model).name}: --train {args.train}, {args.steps} steps of {args.batch_size}×{args.seq_len} "
          f"tokens per process, {args.precision}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}")
    print(f"{'strategy':<10} {'procs':>5} {'trainable':>12} {'params/proc':>12} {'tokens/s':>10} {'peak RSS':>9} "
          f"{'peak GPU':>9} {'MFU':>6} {'wall':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.strategies.split(","):
            r = run(name, model, args, Path(tmp))
            if "error" in r:
                print(f"{name:<10} failed: {r['error']}")
                continue
            gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}G"  # noqa: E731
            mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            print(f"{name:<10} {r['processes']:>5} {r['trainable_parameters']:>12,} {r['parameters_per_process']:>12,} "
                  f"{r['tokens_per_s']:>10,.0f} {gib(r['peak_rss_bytes']):>9} {gib(r['peak_gpu_bytes']):>9} "
                  f"{mfu:>6} {r['wall']:>5.0f}s")


if __name__ == "__main__":
    main()
