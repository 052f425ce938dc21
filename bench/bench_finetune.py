"""Throughput and peak memory of the finetune loop on SmolLM2-135M at seq 256.

    python bench/bench_finetune.py [--steps 5] [--batch-size 4] [--train all] [--precision fp32] [--model PATH]

Prints tokens/s (optimizer steps only, after loading), peak RSS of the process and, on CUDA, peak
allocated GPU memory. Data: /work/shared/data/gutenberg_en (tokenized lazily, only what the run needs).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from qkvconv.defaults import default_checkpoint
from qkvconv.finetune import FinetuneConfig, finetune

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg_en"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--train", default="all")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data", default=str(DATA / "gutenberg_en_train.txt"))
    args = ap.parse_args()
    model = args.model or str(default_checkpoint())
    cfg = FinetuneConfig(data=args.data, eval_data=str(DATA / "gutenberg_en_valid.txt"), train=args.train,
                         steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=1e-5,
                         eval_every=0, eval_seqs=4, save_every=0, precision=args.precision)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = finetune(model, None, cfg, run_dir=Path(tmp) / "run", device=args.device)
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(f"model {Path(model).name}: --train {args.train}, {res.trainable_parameters:,} trainable, "
          f"{args.steps} steps × {args.batch_size}×{args.seq_len} tokens, {args.precision}")
    print(f"tokens/s {res.tokens_per_s:,.0f}   peak RSS {rss / 2**30:.2f} GiB   "
          f"peak GPU {'-' if res.peak_memory_bytes is None else f'{res.peak_memory_bytes / 2**30:.2f} GiB'}   "
          f"held-out loss {res.first_eval:.4f} -> {res.last_eval:.4f}   wall {wall:.1f}s (incl. load + tokenize)")


if __name__ == "__main__":
    main()
