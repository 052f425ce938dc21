"""The exact commands of the README on the real checkpoint, in every dtype, with 1 thread and with all threads.

    python bench/bench_exactness.py [--model GGUF_OR_DIR] [--json runs/exactness.json]

Runs each command as a user would (the `qkvconv` CLI, `OMP_NUM_THREADS` set for the process) and prints one
table: command × dtype × threads with the float64 algebraic error, the rounding ratio against the original's own
(mean and max) and the decode check, read from the written `qkvconv.json`. A refused conversion shows its
one-line reason. Rows already in --json are skipped, so a killed run continues.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = [  # (command, dtype, extra options); the last shows what the float64 folded maps buy
    ("absorb-query", "float32", ()),
    ("absorb-query", "bfloat16", ()),
    ("attach-query-mlp", "float32", ()),
    ("attach-query-mlp", "bfloat16", ()),
    ("attach-preproj", "float32", ()),
    ("attach-preproj", "bfloat16", ()),
    ("absorb-query", "bfloat16", ("--folded-dtype", "output")),
]


def run_one(qkvconv: str, model: str, command: str, dtype: str, extra: tuple, threads: int, workdir: Path) -> dict:
    out = workdir / f"{command}-{dtype}-{threads}{''.join(extra)}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    proc = subprocess.run([qkvconv, command, model, "--output", str(out), "--dtype", dtype, "--force", *extra],
                          env=env, capture_output=True, text=True)
    row = {"command": " ".join((command, *extra)), "dtype": dtype, "threads": threads, "seconds": round(time.perf_counter() - t, 1),
           "exit": proc.returncode}
    if proc.returncode != 0:
        row["refused"] = " ".join(proc.stderr.split())[-400:]
        return row
    entry = json.loads((out / "qkvconv.json").read_text())["history"][-1]
    x, d = entry["exactness"], entry["decoding"]
    row.update(algebraic_rel=x["algebraic_rel"], rounding_ratio=x["rounding_ratio"],
               rounding_max_ratio=x["rounding_max_ratio"], rounding_original=x["rounding_original"],
               rounding_converted=x["rounding_converted"], max_abs_vs_original=entry["verification"]["max_abs"],
               decode_cached_vs_uncached=d["cached_vs_uncached"], decode_vs_original=d["vs_original"],
               folded_dtype=entry["options"].get("folded_dtype"))
    return row


def main() -> None:
    from qkvconv.defaults import default_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--json", type=Path, default=None, help="save rows here as they come; rerun to continue")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated thread counts")
    args = ap.parse_args()
    model = args.model or str(default_checkpoint())
    qkvconv = str(Path(sys.executable).with_name("qkvconv"))
    rows = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    done = {(r["command"], r["dtype"], r["threads"]) for r in rows}
    with tempfile.TemporaryDirectory(prefix="qkvconv-exact-") as tmp:
        for threads in [int(t) for t in args.threads.split(",")]:
            for command, dtype, extra in COMMANDS:
                if (" ".join((command, *extra)), dtype, threads) in done:
                    continue
                row = run_one(qkvconv, model, command, dtype, extra, threads, Path(tmp))
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(rows, indent=1))
    print(f"\n{'command':34} {'dtype':9} {'thr':>3} {'algebra (rel)':>13} {'round×mean':>10} {'round×max':>9} "
          f"{'decode':>7} {'s':>6}  result")
    for r in rows:
        if r["exit"]:
            print(f"{r['command']:34} {r['dtype']:9} {r['threads']:>3} {'':>13} {'':>10} {'':>9} {'':>7} "
                  f"{r['seconds']:>6}  refused: {r['refused']}")
        else:
            print(f"{r['command']:34} {r['dtype']:9} {r['threads']:>3} {r['algebraic_rel']:>13.2g} "
                  f"{r['rounding_ratio']:>10.3f} {r['rounding_max_ratio']:>9.3f} "
                  f"{100 * r['decode_cached_vs_uncached']:>6.1f}% {r['seconds']:>6}  passed")


if __name__ == "__main__":
    main()
