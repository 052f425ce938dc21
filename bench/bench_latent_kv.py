"""latent-kv decode speed at a context length and measured cache bytes, against the base model (run by hand; prints
its figures).

    python bench/bench_latent_kv.py CONVERTED [CONVERTED ...] [--base MODEL] [--context 1024,4096] [--steps 32]
                                    [--rebuilt] [--device cpu] [--json OUT]

Each CONVERTED is a latent-kv output directory (e.g. /tmp/lk192, or one made with --rope-pairs). For every context
length N: each model prefills the same N tokens once (batch 1, seeded random token ids: the cost does not depend on
the text), then --steps single-token cached forwards (greedy, fed back) are timed, one step of each model in turn,
and the median step gives tokens/s (on a shared CPU, bursts of other load hit every model alike and the median
ignores them; the context grows by --steps tokens, or twice that with --rebuilt, during the run).

The reconstruct-then-rotate variant rebuilds every cached key at each step (values are absorbed: (p·c)·B_V); the
--rope-pairs variant rebuilds nothing (B_K absorbed into the query). --rebuilt also times each converted model
rebuilding keys and values (the decode path before the absorbed one). The last three columns are the key rebuild
alone: its GFLOP and its measured time per decoded token at that context (each layer's up-projection timed on its
own), and the ceiling it sets, base step / (base step + rebuild): the best × base possible if everything else in
the converted model's step cost exactly what the base's does. Cache bytes/token is what the cache object
holds after the prefill divided by N, next to the arithmetic from the config (describe.kv_cache_bytes_per_token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def prefill(model, n: int, seed: int = 0):
    """The cache after a forward over n seeded random tokens, and the greedy next token."""
    import torch

    from qkvconv.compat import output_cache

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, min(20000, model.config.vocab_size), (1, n), generator=g).to(device)
    out = model(ids, use_cache=True)
    return output_cache(out), out.logits[:, -1:].argmax(-1)


def step(model, cache, token):
    """One single-token cached forward (greedy): (seconds, the next token)."""
    import torch

    from qkvconv.compat import cache_argument

    sync = torch.cuda.synchronize if token.device.type == "cuda" else (lambda: None)
    kwargs = cache_argument(model, cache)
    sync()
    t = time.perf_counter()
    out = model(token, use_cache=True, **kwargs)
    token = out.logits[:, -1:].argmax(-1)
    sync()
    return time.perf_counter() - t, token


def set_absorb(model, absorb) -> None:
    """LatentKVAttention.absorb on every layer: None (the cheaper path per call), False (rebuild keys and values)."""
    for m in model.modules():
        if hasattr(m, "absorb"):
            m.absorb = absorb


def rebuild_cost(model, n: int, repeats: int = 5) -> tuple[float, float]:
    """(GFLOP, seconds) per decoded token of rebuilding every cached key at context n: the key up-projection of each
    reconstruct-then-rotate layer timed alone on random latents of n positions (median of `repeats`), summed over
    layers. With it a ceiling: even if everything else cost what the base's step costs, a step is this much longer."""
    import torch

    flop, seconds = 0.0, 0.0
    for m in model.modules():
        if not hasattr(m, "group_ranks") or m.rope_pairs is not None:
            continue
        w = m.k_b_proj.weight
        c = torch.randn(1, n, m.rank, dtype=w.dtype, device=w.device)
        ranks = m.group_ranks or [m.rank]  # group j rebuilds its kv_heads / groups heads from its r_j latent values
        flop += 2 * n * sum(ranks) * (m.kv_heads // len(ranks)) * m.head_dim
        sync = torch.cuda.synchronize if w.is_cuda else (lambda: None)
        m._rebuilt_keys(c)
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            m._rebuilt_keys(c)
            sync()
            times.append(time.perf_counter() - t)
        seconds += statistics.median(times)
    return flop / 1e9, seconds


def main() -> None:
    import torch

    import qkvconv
    from qkvconv.archs import spec_for
    from qkvconv.compat import cache_bytes
    from qkvconv.defaults import default_checkpoint
    from qkvconv.describe import kv_cache_bytes_per_token

    ap = argparse.ArgumentParser()
    ap.add_argument("converted", nargs="+", type=Path)
    ap.add_argument("--base", default=None)
    ap.add_argument("--context", default="1024,4096", help="comma-separated prefill lengths")
    ap.add_argument("--steps", type=int, default=32, help="timed single-token steps per model")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    ap.add_argument("--rebuilt", action="store_true",
                    help="also time each converted model rebuilding every cached key and value at each step (the "
                         "decode path before the absorbed one; same model and cache, steps interleaved)")
    args = ap.parse_args()
    models = {"base": qkvconv.load(args.base or str(default_checkpoint()))}
    models |= {str(p): qkvconv.load(p) for p in args.converted}
    models = {name: model.to(args.device).eval() for name, (model, _) in models.items()}
    dtype = next(iter(models.values())).dtype
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"cpu, torch threads {torch.get_num_threads()}")
    rows = []
    for n in [int(x) for x in args.context.split(",")]:
        state, best = {}, {}
        with torch.no_grad():
            for name, model in models.items():
                t = time.perf_counter()
                state[name] = prefill(model, n)
                held = cache_bytes(state[name][0]) / n
                arithmetic = kv_cache_bytes_per_token(model.config, spec_for(model.config.model_type), dtype)
                best[name] = {"held": held, "arithmetic": arithmetic, "prefill_s": time.perf_counter() - t}
            runs = {name: (name, None) for name in models}  # label -> (model, LatentKVAttention.absorb)
            if args.rebuilt:
                runs |= {f"{name} (rebuilt)": (name, False) for name in models if name != "base"}
                best |= {label: dict(best[name]) for label, (name, _) in runs.items()}
            times: dict[str, list[float]] = {label: [] for label in runs}
            for _ in range(args.steps):  # one step of each model in turn: they share whatever else loads the machine
                for label, (name, absorb) in runs.items():
                    set_absorb(models[name], absorb)
                    seconds, token = step(models[name], state[name][0], state[name][1])
                    set_absorb(models[name], None)
                    state[name] = (state[name][0], token)
                    times[label].append(seconds)
            for name in runs:
                best[name]["tokens_per_s"] = 1 / statistics.median(times[name])
                best[name]["step_s"] = sorted(times[name])
            base_step = statistics.median(times["base"])
            for label, (name, absorb) in runs.items():
                gflop, seconds = rebuild_cost(models[name], n) if name != "base" and absorb is None else (0.0, 0.0)
                best[label] |= {"rebuild_gflop_per_token": gflop, "rebuild_s_per_token": seconds,
                                "ceiling_x_base": base_step / (base_step + seconds)}
        base = best["base"]["tokens_per_s"]
        print(f"\ncontext {n}, {args.steps} decode steps per model (interleaved, median), batch 1, {where}, {dtype}")
        print(f"{'model':<38} {'cache B/token':>13} {'arithmetic':>10} {'prefill s':>9} {'tokens/s':>9} {'× base':>7}"
              f" {'rebuild GFLOP/tok':>17} {'rebuild ms/tok':>14} {'ceiling':>7}")
        for name, b in best.items():
            print(f"{name:<38} {b['held']:>13,.0f} {b['arithmetic']:>10,} {b['prefill_s']:>9.1f} "
                  f"{b['tokens_per_s']:>9.2f} {b['tokens_per_s'] / base:>7.2f} {b['rebuild_gflop_per_token']:>17.2f} "
                  f"{1e3 * b['rebuild_s_per_token']:>14.1f} {b['ceiling_x_base']:>7.2f}")
            rows.append({"model": name, "context": n, **b, "x_base": b["tokens_per_s"] / base})
        del state
    if args.json:
        args.json.write_text(json.dumps({"device": where, "dtype": str(dtype), "steps": args.steps, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
