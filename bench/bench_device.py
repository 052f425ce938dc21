"""The same conversions with `--device cpu` and `--device cuda`: wall time, verification figures, and how far the two
outputs differ tensor by tensor (run by hand on a machine with a GPU; prints a table + JSON).

    .venv/bin/python bench/bench_device.py                      # SmolLM2's shape, random weights, fp32
    .venv/bin/python bench/bench_device.py MODEL --runs aq,skvc  # any checkpoint directory
    .venv/bin/python bench/bench_device.py --size full --layers 4 --dtype bf16 --runs aq,skvc
    .venv/bin/python bench/bench_device.py --devices cpu,cpu     # the script itself, where there is no GPU

Checkpoint: MODEL, or a synthetic LLaMA-shaped one built by bench_stream.py's builder under --workdir (default
/tmp/qkvconv-bench; --size smol is SmolLM2-135M's shape with an untied head, --size full the 2048-wide one).

Runs (each a subprocess `qkvconv ... --device D --force`, default verification; outputs removed afterwards):
    aq     absorb-query (exact; float64 algebra pair, output-dtype pair, decode check)
    skv    share-kv --mode k=v --kv-heads 1            (data-free)
    skvc   share-kv --mode k=v --init calibrated       (the least-squares fit on calibration activations)
    lkv    latent-kv --kv-rank <half the KV cache>      (activation-aware joint SVD)
    aqm    attach-query-mlp                             (zero-started: the converted model is the original)

Per run: wall time on each device, the verification's logit error (max |Δ| and, for lossy runs, KL and top-1 where
reported), and the largest difference between the two devices' outputs: max over tensors of
max|a − b| / max|a| (0 for tensors that are equal). Float64 algebra rounds differently on the two devices (other
kernels, other summation orders), so exact and data-free runs differ at float64 rounding before the one cast,
i.e. at most one unit in the output dtype's last place; fits on calibration activations also see the calibration
forward pass computed in the output dtype on each device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import SIZES, build_checkpoint  # noqa: E402

RUNS = {
    "aq": ["absorb-query"],
    "skv": ["share-kv", "--mode", "k=v", "--kv-heads", "1"],
    "skvc": ["share-kv", "--mode", "k=v", "--init", "calibrated"],
    "lkv": ["latent-kv", "--kv-rank", "{half}"],
    "aqm": ["attach-query-mlp"],
}


def _kv_half(model: Path) -> int:
    cfg = json.loads((model / "config.json").read_text())
    dh = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * dh  # K and V: 2·G·dh per token; half of it


def _tensors(path: Path) -> dict[str, Path]:
    return {k: f for f in sorted(path.glob("*.safetensors")) for k in safe_open(f, "pt").keys()}


def compare_outputs(a: Path, b: Path) -> dict:
    """Largest relative difference between two checkpoints' tensors (same keys, shapes and dtypes required)."""
    ka, kb = _tensors(a), _tensors(b)
    if set(ka) != set(kb):
        return {"same_keys": False, "only_a": sorted(set(ka) - set(kb))[:5], "only_b": sorted(set(kb) - set(ka))[:5]}
    worst, worst_key, differing, mismatched = 0.0, None, 0, []
    for k in sorted(ka):
        with safe_open(ka[k], "pt") as fa, safe_open(kb[k], "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
        if x.shape != y.shape or x.dtype != y.dtype:
            mismatched.append(k)
            continue
        if torch.equal(x, y):
            continue
        differing += 1
        x64, y64 = x.double(), y.double()
        rel = float((x64 - y64).abs().max()) / max(float(x64.abs().max()), 1e-30)
        if rel > worst:
            worst, worst_key = rel, k
    return {"same_keys": True, "tensors": len(ka), "differing": differing, "mismatched": mismatched[:5],
            "max_rel_diff": worst, "worst_tensor": worst_key}


def _figures(out: Path) -> dict:
    rec = json.loads((out / "qkvconv.json").read_text())["history"][-1]
    ver = rec.get("verification") or {}
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[f"{prefix}{k}"] = v
            elif isinstance(v, bool) or isinstance(v, str):
                flat[f"{prefix}{k}"] = v

    walk(ver)
    decoding = rec.get("decoding") or {}
    exact = rec.get("exactness") or {}
    return {"verification": flat, "exactness": {k: v for k, v in exact.items() if not isinstance(v, (list, dict))},
            "decoding": {k: v for k, v in decoding.items() if not isinstance(v, (list, dict))},
            "timings_s": rec.get("timings_s")}


def run_one(qkvconv: list[str], model: Path, argv: list[str], out: Path, device: str, timeout: float) -> dict:
    cmd = [*qkvconv, argv[0], str(model), "--output", str(out), *argv[1:], "--device", device, "--force"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    res = {"cmd": " ".join(cmd[len(qkvconv):]), "rc": p.returncode, "wall_s": round(wall, 2)}
    if p.returncode != 0:
        lines = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
        res["error"] = lines[-1] if lines else "(no output)"
        res["stderr_tail"] = "\n".join(lines[-25:])
    else:
        res.update(_figures(out))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qkvconv-bench"))
    ap.add_argument("--size", choices=sorted(SIZES), default="smol")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--qkvconv", default=None, help="the command (default: this Python's qkvconv script, else "
                    "`python -m qkvconv`)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--keep", action="store_true", help="keep the outputs under --workdir/device-outputs")
    ap.add_argument("--records", type=Path, default=None, help="copy each run's qkvconv.json here "
                    "(RUN-DEVICE.json: the per-layer fit choices, timings)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    devices = args.devices.split(",")
    script = Path(sys.executable).parent / "qkvconv"
    qkvconv = shlex.split(args.qkvconv) if args.qkvconv else [str(script)] if script.is_file() else \
        [sys.executable, "-m", "qkvconv"]
    if len(set(devices)) != len(devices):
        raise SystemExit("--devices: name each device once")
    if args.model is None:
        spec = dict(SIZES[args.size])
        if args.layers:
            spec["layers"] = args.layers
        model = build_checkpoint(args.workdir, args.size, args.dtype, spec)
    else:
        model = args.model
    half = _kv_half(model)
    outs = args.workdir / "device-outputs"
    shutil.rmtree(outs, ignore_errors=True)
    results = []
    for name in args.runs.split(","):
        argv = [a.format(half=half) for a in RUNS[name]]
        row = {"run": name, "devices": {}}
        for d in devices:
            row["devices"][d] = run_one(qkvconv, model, argv, outs / f"{name}-{d}", d, args.timeout)
            r = row["devices"][d]
            print(f"{name:5s} {d:5s} rc={r['rc']} {r['wall_s']:8.2f}s  {r.get('error', '')}", flush=True)
        ok = [d for d in devices if row["devices"][d]["rc"] == 0]
        if args.records:
            args.records.mkdir(parents=True, exist_ok=True)
            for d in ok:
                shutil.copy(outs / f"{name}-{d}" / "qkvconv.json", args.records / f"{name}-{d}.json")
        if len(ok) == 2 and len(devices) == 2:
            row["compare"] = compare_outputs(outs / f"{name}-{devices[0]}", outs / f"{name}-{devices[1]}")
        if not args.keep:
            for d in devices:
                shutil.rmtree(outs / f"{name}-{d}", ignore_errors=True)
        results.append(row)

    print()
    cols = ["wall s", "logit max|Δ|", "KL", "top-1", "algebra rel", "decode"]
    print(f"{'run':5s} {'device':6s} " + " ".join(f"{c:>13s}" for c in cols) + f"  {'outputs max rel Δ':>17s}")
    for row in results:
        c = row.get("compare") or {}
        for j, d in enumerate(devices):
            r = row["devices"][d]
            flat, ex, dec = r.get("verification", {}), r.get("exactness", {}), r.get("decoding", {})
            vals = [r["wall_s"] if r["rc"] == 0 else "FAIL", flat.get("max_abs"), flat.get("kl"),
                    flat.get("top1_agreement"), ex.get("algebraic_rel"),
                    ("passed" if dec.get("passed") else "FAILED") if "passed" in dec else dec.get("skipped", "-")]
            cells = [f"{v:13.3e}" if isinstance(v, float) and (abs(v) < 1e-2 and v != 0) else
                     f"{v:13.4f}" if isinstance(v, float) else f"{str(v if v is not None else '-')[:13]:>13s}"
                     for v in vals]
            cmp = ""
            if j == 0 and "max_rel_diff" in c:
                cmp = (f"  {c['max_rel_diff']:17.3e}  {c['differing']}/{c['tensors']} tensors differ, "
                       f"worst {c['worst_tensor']}")
            elif j == 0 and c:
                cmp = f"  {'':17s}  outputs differ in keys/shapes: {c}"
            print(f"{row['run']:5s} {d:6s} " + " ".join(cells) + cmp)
    for row in results:
        for d, r in row["devices"].items():
            if r["rc"] != 0:
                print(f"\n--- {row['run']} on {d} failed (rc {r['rc']}): {r['error']}\n{r['stderr_tail']}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    facts = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": str(model), "size": args.size,
             "layers": args.layers, "dtype": args.dtype, "gpu": gpu, "cpu": platform.processor() or platform.machine(),
             "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    path = args.json or args.workdir / "results" / f"device-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"facts": facts, "results": results}, indent=1))
    print(f"\n{json.dumps(facts)}\nJSON: {path}")


if __name__ == "__main__":
    main()
