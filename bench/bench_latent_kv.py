"""latent-kv decode speed and measured cache bytes against the base model (run by hand; prints its figures).

    python bench/bench_latent_kv.py CONVERTED [CONVERTED ...] [--base MODEL] [--tokens 1024] [--repeats 2]

Each CONVERTED is a latent-kv output directory (e.g. /tmp/lk192). Greedy generate() of --tokens tokens after one BOS,
base and converted models interleaved --repeats times (the best of each is kept: on a shared CPU the other load only
ever slows a run down). Rebuilding keys and values for every cached position costs compute at each step, so this is
the cost the latent pays for its cache; the cache bytes are what the cache object really holds after the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_share_kv import decode  # noqa: E402


def main() -> None:
    import torch

    import qkvconv
    from qkvconv.defaults import default_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("converted", nargs="+", type=Path)
    ap.add_argument("--base", default=None)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    args = ap.parse_args()
    models = {"base": qkvconv.load(args.base or str(default_checkpoint()))}
    models |= {str(p): qkvconv.load(p) for p in args.converted}
    models = {name: (model.to(args.device), tok) for name, (model, tok) in models.items()}
    best: dict[str, tuple[int, float]] = {}
    for _ in range(args.repeats):
        for name, (model, tok) in models.items():
            held, speed = decode(model, tok, args.tokens)
            if name not in best or speed > best[name][1]:
                best[name] = (held, speed)
    base_bytes, base_speed = best["base"]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, torch threads {torch.get_num_threads()}"
    print(f"{args.tokens} greedy tokens, {where}, {next(iter(models.values()))[0].dtype}, best of {args.repeats}")
    print(f"{'model':<24} {'cache bytes/token':>18} {'tokens/s':>9} {'× base':>7}")
    for name, (held, speed) in best.items():
        print(f"{name:<24} {held / args.tokens:>18,.0f} {speed:>9.1f} {speed / base_speed:>7.2f}")


if __name__ == "__main__":
    main()
