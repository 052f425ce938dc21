"""latent-kv rank allocations compared in memory on one model (run by hand; prints held-out KL and top-1 per row).

    python bench/bench_latent_kv_allocation.py [MODEL] --ranks 192,128 [--calib FILE] [--num-seqs 40 --seq-len 256]

The same calibration split as `qkvconv latent-kv` (fit on 4 of every 5 sequences, KL and top-1 agreement against the
original on the 5th), the attention inputs captured once, every allocation built with latent_kv_layer and evaluated
without writing a checkpoint. Allocations: uniform; greedy by relative energy (the shipped one, σ²/Σσ² per layer,
floor MIN_RANK_FRACTION); greedy with a floor of 1/2; greedy by absolute energy (σ² as is).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def main() -> None:
    from qkvconv.archs import dims_of
    from qkvconv.checkpoint import load
    from qkvconv.convert import build_converted, converted_config
    from qkvconv.defaults import default_checkpoint
    from qkvconv.transforms import latent_kv as lk
    from qkvconv.verify import attention_inputs, calibration_ids

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--ranks", default="192,128,64")
    ap.add_argument("--calib", type=Path, default=Path(os.environ.get("QKVCONV_DATA_DIR", "/work/shared/data"))
                    / "gutenberg_en" / "gutenberg_en_train.txt")
    ap.add_argument("--num-seqs", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    loaded = load(args.model or str(default_checkpoint()))
    model, spec = loaded.model, loaded.spec
    dims = dims_of(model.config, spec)
    ids, _ = calibration_ids(None, loaded.tokenizer, calib=args.calib, num_seqs=args.num_seqs, seq_len=args.seq_len)
    rows = torch.arange(len(ids))
    fit, held = ids[rows % 5 != 4], ids[rows % 5 == 4]
    t = time.perf_counter()
    X = attention_inputs(model, spec, fit)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    spectra = [lk.layer_spectrum(sd, spec, dims, i, X[i]) for i in range(dims.num_hidden_layers)]
    with torch.no_grad():
        ref = torch.cat([model(held[j:j + 4]).logits for j in range(0, len(held), 4)]).log_softmax(-1)
    print(f"inputs, spectra and reference logits: {time.perf_counter() - t:.1f}s")

    allocations = {
        "uniform": lambda R: lk.uniform_ranks(dims.num_hidden_layers, R),
        "greedy": lambda R: lk.allocate_ranks(spectra, R),
        "greedy floor 1/2": lambda R: lk.allocate_ranks(spectra, R, min_rank=R // 2),
        "greedy absolute": lambda R: lk.allocate_ranks(spectra, R, relative=False),
    }
    print(f"{'R':>4} {'allocation':<18} {'KL':>8} {'top-1':>7}  ranks")
    for R in map(int, args.ranks.split(",")):
        for name, fn in allocations.items():
            ranks = fn(R)
            new, entries = dict(sd), []
            for i in range(dims.num_hidden_layers):
                res = lk.latent_kv_layer(sd, spec, dims, i, ranks[i], X[i])
                res.apply(new)
                entries.append(res.entry)
            config = converted_config(model.config, spec, type(model).__name__, entries)
            conv = build_converted(config, new, torch.float32)
            with torch.no_grad():
                out = torch.cat([conv(held[j:j + 4]).logits for j in range(0, len(held), 4)]).log_softmax(-1)
            kl = float((ref.exp() * (ref - out)).sum(-1).mean())
            top1 = float((ref.argmax(-1) == out.argmax(-1)).float().mean())
            print(f"{R:>4} {name:<18} {kl:>8.4f} {100 * top1:>6.2f}%  {' '.join(str(sum(r)) for r in ranks)}",
                  flush=True)


if __name__ == "__main__":
    main()
