"""share-kv --init calibrated: time of the fit and held-out logit error per mode, on SmolLM2 (run by hand).

    python bench/bench_share_kv_fit.py [MODEL] [--variants k=v+kv1,k=v,kv1,q=k] [--impl FILE] [--profile N]

Calibration is built exactly as convert.share_kv_checkpoint builds it for init="calibrated" (40 × 256 tokens of the
shipped calibration text, 1 sequence in 5 held out); the checkpoint is loaded once for every variant. Printed per
variant: seconds in share_kv (the transform alone), then KL and top-1 agreement of the converted model against the
original on the held-out sequences. --impl times another share_kv.py (e.g. an older one:
`git show REV:qkvconv/transforms/share_kv.py > /tmp/old.py`) in place of the package's; --profile N prints the N
most expensive functions of each fit (cProfile, cumulative time).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import pstats
import sys
import time

import torch

VARIANTS = {"k=v": ("k=v", None), "q=k": ("q=k", None), "q=k=v": ("q=k=v", None), "kv1": (None, 1),
            "k=v+kv1": ("k=v", 1)}


def _share_kv_module(path: str | None):
    if path is None:  # the module (qkvconv.transforms re-exports the function under the same name)
        return importlib.import_module("qkvconv.transforms.share_kv")
    spec = importlib.util.spec_from_file_location("share_kv_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    from qkvconv.archs import dims_of
    from qkvconv.checkpoint import load
    from qkvconv.convert import _rope_table, base_class_of, build_converted, converted_config
    from qkvconv.defaults import default_checkpoint
    from qkvconv.verify import attention_inputs, calibration_ids, compare_model, logits_of

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--variants", default="k=v+kv1,k=v,kv1,q=k")
    ap.add_argument("--impl", default=None, help="a share_kv.py to time instead of the package's")
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument("--num-seqs", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    mod = _share_kv_module(args.impl)

    t = time.perf_counter()
    loaded = load(args.model or default_checkpoint())
    spec, dims = loaded.spec, dims_of(loaded.config, loaded.spec)
    print(f"loaded in {time.perf_counter() - t:.1f} s; torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    with torch.no_grad():  # the calibration of convert.share_kv_checkpoint, init="calibrated"
        ids, _ = calibration_ids(loaded.model, loaded.tokenizer, calib=None, num_seqs=args.num_seqs,
                                 seq_len=args.seq_len, seed=0)
        held = torch.arange(len(ids)) % 5 == 4
        held[-1] |= not held.any()
        fit_ids, ids = ids[~held], ids[held]
        cos, sin = _rope_table(loaded.model, fit_ids.shape[1])
        eps = float(getattr(loaded.config, "rms_norm_eps", 1e-6) or 1e-6)
        calibration = mod.Calibration(attention_inputs(loaded.model, spec, fit_ids), fit_ids.shape[1], cos, sin, eps)
        ref = logits_of(loaded.model, ids)
    sd = loaded.model.state_dict()
    rows = []
    for name in args.variants.split(","):
        mode, kvh = VARIANTS[name]
        prof = cProfile.Profile() if args.profile else None
        t = time.perf_counter()
        if prof:
            prof.enable()
        result = mod.share_kv(sd, spec, dims, mode=mode, kv_heads=kvh, init="calibrated", calibration=calibration)
        if prof:
            prof.disable()
        seconds = time.perf_counter() - t
        config = converted_config(loaded.config, spec, base_class_of(loaded), result.layers)
        with torch.no_grad():
            err = compare_model(ref, build_converted(config, result.state_dict, torch.float32), ids, "held-out")
        rows.append((name, seconds, err.kl, err.top1_agreement))
        print(f"{name:8} transform {seconds:7.1f} s   held-out KL {err.kl:.4f}   top-1 {100 * err.top1_agreement:.2f} %",
              flush=True)
        if prof:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(args.profile)
            print(s.getvalue(), flush=True)
    print(f"\n{'variant':8} {'transform s':>11} {'KL':>8} {'top-1 %':>8}")
    for name, seconds, kl, top1 in rows:
        print(f"{name:8} {seconds:11.1f} {kl:8.4f} {100 * top1:8.2f}")


if __name__ == "__main__":
    main()
