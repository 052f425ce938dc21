"""Conversion cost versus a plain load + save of the same checkpoint (run by hand; prints its figures).

    python bench/bench_convert.py [MODEL] [--calib FILE]

MODEL defaults to the SmolLM2-135M GGUF. The checkpoint is first exported once as a stock HF
directory, so both timings start from safetensors (GGUF dequantization would otherwise dominate).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from qkvconv.checkpoint import load, untie, write_checkpoint
from qkvconv.convert import absorb_query_checkpoint
from qkvconv.defaults import default_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--calib", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    src = args.model or str(default_checkpoint())
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loaded = load(src)
        stock = write_checkpoint(tmp / "stock", state_dict=untie(loaded.model.state_dict(), loaded.config, loaded.spec),
                                 config=loaded.config, tokenizer=loaded.tokenizer, record={})
        del loaded
        plain, conv, steps, bare = [], [], [], []
        for r in range(args.repeats):
            t = time.perf_counter()
            again = load(stock)
            write_checkpoint(tmp / f"copy{r}", state_dict=untie(again.model.state_dict(), again.config, again.spec),
                             config=again.config, tokenizer=again.tokenizer, record={})
            plain.append(time.perf_counter() - t)
            del again
            t = time.perf_counter()
            rep = absorb_query_checkpoint(stock, tmp / f"noq{r}", calib=args.calib)
            conv.append(time.perf_counter() - t)
            steps.append(rep.timings)
            t = time.perf_counter()
            absorb_query_checkpoint(stock, tmp / f"bare{r}", verify=False)
            bare.append(time.perf_counter() - t)
            for d in (f"copy{r}", f"noq{r}", f"bare{r}"):
                shutil.rmtree(tmp / d)
    best_plain, best_conv = min(plain), min(conv)
    print(json.dumps({"model": src, "threads": torch.get_num_threads(), "load_save_s": plain,
                      "absorb_query_s": conv, "absorb_query_no_verify_s": bare, "steps_s": steps[-1],
                      "ratio_best": best_conv / best_plain}, indent=2))
    print(f"load+save {best_plain:.2f}s | absorb-query exact, default verification + decode check "
          f"{best_conv:.2f}s | ratio {best_conv / best_plain:.2f}x")
    print(f"absorb-query exact --no-verify (stream, transform, write): {min(bare):.2f}s, "
          f"ratio {min(bare) / best_plain:.2f}x")


if __name__ == "__main__":
    main()
