"""share-kv on SmolLM2: measured KV-cache bytes, decode speed and zero-shot LAMBADA per mode and init (run by hand).

    python bench/bench_share_kv.py [MODEL] [--tokens 1024] [--limit 500] [--inits calibrated,key,value,mean]
                                   [--variants base,k=v,q=k,q=k=v,kv1,k=v+kv1] [--calib FILE] [--keep DIR] [--json OUT]

--json OUT is rewritten after every row, and rows already in it are skipped, so a killed run continues.
--init calibrated fits on --calib (default: the Gutenberg train split of the data dir, never the evaluation text)
and reports its logit error on held-out calibration sequences. --keep DIR keeps every converted checkpoint.

Cache bytes are the tensors the cache object actually holds after generating --tokens tokens; decode tokens/s is
greedy generate() on this CPU in the same run (ratio to base). LAMBADA (lambada_openai, --limit examples) is
zero-shot: no finetuning, so these are the damage figures a healing finetune starts from.
"""

from __future__ import annotations

import argparse
import os
import json
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {"base": (None, None), "k=v": ("k=v", None), "q=k": ("q=k", None), "q=k=v": ("q=k=v", None),
            "kv1": (None, 1), "k=v+kv1": ("k=v", 1)}


from qkvconv.compat import cache_bytes, output_cache  # noqa: E402


@torch.no_grad()
def decode(model, tokenizer, tokens: int) -> tuple[int, float]:
    """(bytes held by the cache, decode tokens/s) for greedy generation of `tokens` tokens after one BOS."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    ids = torch.tensor([[bos]], device=device)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                         do_sample=False, return_dict_in_generate=True)
    sync()
    return cache_bytes(output_cache(gen)), tokens / (time.perf_counter() - t)


def main() -> None:
    import qkvconv
    from qkvconv.checkpoint import load, untie, write_checkpoint
    from qkvconv.convert import share_kv_checkpoint
    from qkvconv.defaults import default_checkpoint
    from qkvconv.evaluate import run_lm_eval

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--inits", default="calibrated,key,value,mean")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--num-seqs", type=int, default=None, help="calibration sequences (share-kv's default)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("QKVCONV_DATA_DIR", "../shared/data")))
    ap.add_argument("--calib", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    src = args.model or str(default_checkpoint())
    calib = args.calib or args.data_dir / "gutenberg_en" / "gutenberg_en_train.txt"
    # rows already in --json are kept and not run again: a killed run continues where it stopped
    rows = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    done = {(r["variant"], r["init"]) for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loaded = load(src)  # the GGUF once, then safetensors for every conversion
        stock = write_checkpoint(tmp / "stock", state_dict=untie(loaded.model.state_dict(), loaded.config, loaded.spec),
                                 config=loaded.config, tokenizer=loaded.tokenizer, record={})
        del loaded
        base_speed = None
        for name in args.variants.split(","):
            mode, kvh = VARIANTS[name]
            for init in ["-"] if name == "base" else args.inits.split(","):
                if init == "value" and mode == "q=k" or init in ("value", "mean") and mode is None:
                    continue  # no such init for this variant (q=k keeps V; pooling alone has one data-free init)
                if (name, init) in done:
                    continue
                row = {"variant": name, "init": init}
                path = stock
                if name != "base":
                    path = (args.keep or tmp) / f"{name}-{init}"
                    rep = share_kv_checkpoint(stock, path, mode=mode, kv_heads=kvh, init=init, force=True,
                                              calib=calib if init == "calibrated" else None,
                                              num_seqs=args.num_seqs, seq_len=args.seq_len)
                    row |= {"kl": rep.error.kl, "top1": rep.error.top1_agreement,
                            "convert_s": sum(rep.timings.values())}
                model, tok = qkvconv.load(path)
                if init in ("-", args.inits.split(",")[0]) and args.tokens:
                    row["cache_bytes"], row["tok_s"] = decode(model, tok, args.tokens)
                    base_speed = base_speed or next((r["tok_s"] for r in rows if r["variant"] == "base"), row["tok_s"])
                    row["speed_vs_base"] = row["tok_s"] / base_speed
                if args.limit:
                    res = run_lm_eval(model, tok, ["lambada_openai"], limit=args.limit, batch_size=args.batch_size,
                                      device="cpu", data_dir=args.data_dir)
                    r = res["results"]["lambada_openai"]
                    row["lambada_acc"], row["lambada_acc_stderr"] = r.get("acc,none"), r.get("acc_stderr,none")
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=2))
                del model
    base_bytes = next((r["cache_bytes"] for r in rows if r["variant"] == "base" and "cache_bytes" in r), None)
    print(f"\n{'variant':10} {'init':11} {'cache bytes':>12} {'vs base':>8} {'tok/s':>7} {'speed':>6} "
          f"{'KL':>7} {'top1':>6} {'LAMBADA':>8}")
    for r in rows:
        cb = r.get("cache_bytes")
        ratio = f"{cb / base_bytes:.3f}" if cb and base_bytes else ""
        print(f"{r['variant']:10} {r['init']:11} {cb or '':>12} {ratio:>8} {r.get('tok_s', 0):7.1f} "
              f"{r.get('speed_vs_base', 0):6.2f} {r.get('kl', 0):7.3f} {r.get('top1', 1):6.3f} "
              f"{r.get('lambada_acc', float('nan')):8.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
