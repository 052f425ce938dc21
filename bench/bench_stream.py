"""Wall time and peak memory of whole-checkpoint conversions on a multi-GB model (run by hand; prints a table + JSON).

    .venv/bin/python bench/bench_stream.py                        # full size, all runs, bf16 and fp32
    .venv/bin/python bench/bench_stream.py --size small           # tiny model, quick check of the script
    .venv/bin/python bench/bench_stream.py --runs a,b --dtypes bf16
    .venv/bin/python bench/bench_stream.py --runs c,d --extra=--dtype --extra=bfloat16   # flags passed to qkvconv
    .venv/bin/python bench/bench_stream.py --copy SRC DST         # (internal) run b: the plain shard-by-shard copy

Checkpoint. Built once and cached under --workdir (default /tmp/qkvconv-bench): a synthetic LLaMA-shaped HF
checkpoint (config.json with model_type "llama", safetensors shards + model.safetensors.index.json, the SmolLM2
tokenizer so the tool can tokenize calibration text). Full size: hidden 2048, 44 layers, 32 heads, 8 KV heads
(head_dim 64), intermediate 5632, vocab 49152, untied embeddings, rms_norm_eps 1e-5 = 2.19 B parameters:
bf16 4.07 GiB, fp32 8.14 GiB on disk, ~2 GB shards (3 and 5 shards). Weights are Gaussian, std 0.02, except W_Q:
U·diag(s)·Vᵀ with random orthogonal U, V and singular values log-spaced so cond(W_Q) = --wq-cond (default 10),
entry std still 0.02. A plain Gaussian W_Q (--wq-cond 0) has cond ~1e3–1e4 (hidden 256: up to 3.6e4 over the 4
layers), and absorb-query's default verification then refuses the bf16 checkpoint ("rounding error 459× the
original's own ... cond(W_Q) up to 3.64e+04"), so it would benchmark a refusal, not a conversion. Norm weights
1 + 0.02·N(0,1). Each tensor has its own seed, so the bf16 checkpoint is the fp32 one rounded. The builder generates tensor by tensor and writes shard by
shard: it never holds more than one shard (~2 GB, plus save_file's serialisation copy). --size small builds a
tiny model (hidden 256, 4 layers) for quick checks; --layers N overrides the layer count of either size.

Runs (each a subprocess; outputs removed afterwards; page cache warmed by reading the source before each run,
os.sync() before each run so the previous run's writeback does not land in the next one's time):
    a  cp -r SRC OUT
    b  the I/O floor: this script's --copy mode (safe_open each shard, get_tensor one by one, save_file per shard,
       each shard fsynced as qkvconv's are)
    c  qkvconv absorb-query SRC -o OUT --no-verify
    d  qkvconv absorb-query SRC -o OUT                       (default verification)
    e  qkvconv share-kv SRC -o OUT --mode k=v --kv-heads 1 --no-verify      (data-free, --init key)
    f  qkvconv share-kv SRC -o OUT --mode k=v --kv-heads 1 --init calibrated
    g  peer: mergekit passthrough merge of all layers (mergekit-yaml CFG OUT --lazy-unpickle
       --out-shard-size <params of one of our shards>), dtype matching the checkpoint
--extra FLAG (repeatable; write --extra=--flag for flags) is appended to the qkvconv runs c–f; --match-dtype adds
`--dtype bfloat16|float32` matching the checkpoint to them (qkvconv keeps the checkpoint's dtype by default, --dtype auto).

Memory: the whole process tree (the run's process and all its descendants) is sampled every --interval
seconds (default 0.02) from /proc/PID/status; per sample VmRSS and RssAnon are summed over the tree, and the
peaks are reported. RSS includes file-backed pages of mmapped safetensors (page cache mapped in, shared with
the kernel cache); RssAnon is the process's own heap. Summing over processes double-counts shared pages (so a
forked tree can read higher than the real use); a child living less than one interval can be missed. A memory
guard kills a run whose tree RssAnon exceeds --max-anon-gib (default 85% of MemTotal) so an OOM does not take
down other processes; such a run is reported as failed. A failing run prints its exit code and its last stderr
line; the benchmark goes on.

Output: one table (run, dtype, checkpoint GiB, wall s, CPU s (user + system of the run's processes; the kernel's
own writeback threads are not counted), ratio to run b of the same dtype, peak RSS GiB, peak RssAnon GiB, peak
RSS as % of checkpoint size, output GiB, status) and the same as JSON with machine facts
(cores, RAM, CPU, versions, git commit, date); the JSON path is printed. GiB = 2^30 bytes throughout.

Peer (run g): mergekit 0.1.5 installed into a separate venv, not into .venv:
    /work/main/.venv/bin/python -m venv /tmp/venv-mergekit --system-site-packages
    /tmp/venv-mergekit/bin/pip install mergekit --no-deps
    /tmp/venv-mergekit/bin/pip install immutables; /tmp/venv-mergekit/bin/pip install peft --no-deps
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/venv-mergekit/lib/python3.11/site-packages/zz_qkvconv_venv.pth
A venv made from .venv's python inherits the *base* interpreter's site-packages, not .venv's, so the .pth line
puts .venv's packages (the CPU torch, transformers, accelerate, …) after the new venv's own on sys.path; nothing
in .venv is changed and no other torch is installed. --mergekit PATH points at another mergekit-yaml; when it
is missing, run g is reported as skipped.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as _md
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1 << 30
REPO = Path(__file__).resolve().parent.parent
RUN_NAMES = "abcdefg"
RUN_LABELS = {
    "a": "cp -r",
    "b": "plain shard copy",
    "c": "absorb-query --no-verify",
    "d": "absorb-query (verify)",
    "e": "share-kv k=v kv1 --no-verify",
    "f": "share-kv k=v kv1 calibrated",
    "g": "mergekit passthrough",
}
DTYPES = {"bf16": ("bfloat16", 2), "fp32": ("float32", 4)}
SIZES = {
    # hidden, layers, heads, kv heads, intermediate, vocab, shard bytes
    "full": dict(hidden=2048, layers=44, heads=32, kv_heads=8, inter=5632, vocab=49152, shard_bytes=2_000_000_000),
    "small": dict(hidden=256, layers=4, heads=8, kv_heads=2, inter=704, vocab=49152, shard_bytes=20_000_000),
    # SmolLM2-135M's shape (untied head), for speed checks that need no trained weights
    "smol": dict(hidden=576, layers=30, heads=9, kv_heads=3, inter=1536, vocab=49152, shard_bytes=300_000_000),
}
BUILDER_VERSION = 1


# ----------------------------------------------------------------------------------------------- checkpoint
def tensor_plan(s: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in HF order; kind is 'w' (Gaussian) or 'norm' (1 + noise)."""
    h, kvd, head_dim = s["hidden"], s["kv_heads"] * (s["hidden"] // s["heads"]), s["hidden"] // s["heads"]
    assert head_dim * s["heads"] == h
    plan = [("model.embed_tokens.weight", (s["vocab"], h), "w")]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "self_attn.q_proj.weight", (h, h), "w"),
            (p + "self_attn.k_proj.weight", (kvd, h), "w"),
            (p + "self_attn.v_proj.weight", (kvd, h), "w"),
            (p + "self_attn.o_proj.weight", (h, h), "w"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
            (p + "mlp.gate_proj.weight", (s["inter"], h), "w"),
            (p + "mlp.up_proj.weight", (s["inter"], h), "w"),
            (p + "mlp.down_proj.weight", (h, s["inter"]), "w"),
        ]
    plan += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (s["vocab"], h), "w")]
    return plan


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shard_plan(plan, elem_bytes: int, shard_bytes: int) -> list[list[int]]:
    """Greedy: consecutive tensors into shards of at most shard_bytes (a bigger tensor gets a shard of its own)."""
    shards, cur, cur_b = [], [], 0
    for idx, (_, shape, _) in enumerate(plan):
        b = numel(shape) * elem_bytes
        if cur and cur_b + b > shard_bytes:
            shards.append(cur)
            cur, cur_b = [], 0
        cur.append(idx)
        cur_b += b
    if cur:
        shards.append(cur)
    return shards


def tokenizer_dir(workdir: Path) -> Path:
    """The SmolLM2 tokenizer (vocab 49152) of the default real checkpoint, saved once as HF files."""
    d = workdir / "tokenizer-smollm2"
    if (d / "tokenizer_config.json").is_file():
        return d
    from transformers import AutoTokenizer

    from qkvconv.defaults import default_checkpoint

    p = default_checkpoint()
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    tmp.rename(d)
    return d


def conditioned_square(n: int, g, std: float, cond: float):
    """U·diag(s)·Vᵀ with Haar-random U, V and singular values log-spaced over [c, cond·c] (shuffled), scaled so
    the Frobenius norm (and so the entry std) matches an n×n Gaussian of this std: cond(W) = cond exactly."""
    import math

    import torch

    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.logspace(0, math.log10(cond), n)[torch.randperm(n, generator=g)]
    s *= std * math.sqrt(n) / s.square().mean().sqrt()
    return (u * s) @ v.T


def build_checkpoint(workdir: Path, size: str, dtype_key: str, spec: dict, seed: int = 0,
                     wq_cond: float = 10.0) -> Path:
    """Build (or reuse) workdir/llama-<size>-<dtype>; return its path."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    tag = f"llama-{size}-L{spec['layers']}-{dtype_key}"
    out = workdir / tag
    done = workdir / f"{tag}.done.json"
    want = {"builder": BUILDER_VERSION, "spec": spec, "dtype": dtype_key, "seed": seed, "wq_cond": wq_cond}
    if done.is_file() and out.is_dir() and json.loads(done.read_text()) == want:
        return out
    torch_dtype = getattr(torch, DTYPES[dtype_key][0])
    elem = DTYPES[dtype_key][1]
    plan = tensor_plan(spec)
    shards = shard_plan(plan, elem, spec["shard_bytes"])
    total = sum(numel(s) for _, s, _ in plan) * elem
    need = total * 1.1 + 64 * 2**20
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(f"not enough disk under {workdir}: {free / GIB:.1f} GiB free, {need / GIB:.1f} GiB needed")
    tok_src = tokenizer_dir(workdir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    print(f"building {out} ({total / GIB:.2f} GiB, {len(shards)} shards) ...", flush=True)
    weight_map = {}
    n = len(shards)
    for si, idxs in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for idx in idxs:
            name, shape, kind = plan[idx]
            g = torch.Generator().manual_seed(seed * 1_000_003 + idx)
            if kind == "w" and name.endswith("q_proj.weight") and wq_cond:
                t = conditioned_square(shape[0], g, 0.02, wq_cond)
            else:
                t = torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.02)
            if kind == "norm":
                t.add_(1.0)
            tensors[name] = t.to(torch_dtype) if torch_dtype != torch.float32 else t
            weight_map[name] = fname
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        print(f"  {fname}  {(tmp / fname).stat().st_size / GIB:.2f} GiB  ({time.perf_counter() - t0:.0f}s)",
              flush=True)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    tok = AutoTokenizer.from_pretrained(tok_src)
    cfg = LlamaConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = DTYPES[dtype_key][0]
    cfg.save_pretrained(tmp)
    for f in tok_src.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    os.sync()
    tmp.rename(out)
    done.write_text(json.dumps(want, indent=2))
    print(f"built {out} in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def warm_read(path: Path) -> None:
    buf = bytearray(16 << 20)
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


# ----------------------------------------------------------------------------------------------- run b
def plain_copy(src: Path, dst: Path) -> None:
    """The I/O floor: every shard read tensor by tensor (safe_open/get_tensor), written with save_file and fsynced,
    as qkvconv fsyncs each shard it writes (a copy that returns with gigabytes still dirty in the page cache has not
    done its writing: os.sync() before the next run would pay for it, outside its time)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.name.endswith(".safetensors"):
            with safe_open(str(f), framework="pt") as h:
                meta = h.metadata()
                tensors = {k: h.get_tensor(k) for k in h.keys()}
            save_file(tensors, str(dst / f.name), metadata=meta)
            del tensors
            with open(dst / f.name, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_file():
            shutil.copy2(f, dst / f.name)


# ----------------------------------------------------------------------------------------------- measurement
def _status_kib(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    rss = anon = 0
    for line in data.split(b"\n"):
        if line.startswith(b"VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith(b"RssAnon:"):
            anon = int(line.split()[1])
    return rss, anon


TREE_EVERY = 25  # samples between listings of the process tree (0.5 s at the default interval)


def _tree(root) -> list[int]:
    import psutil

    try:
        return [root.pid] + [c.pid for c in root.children(recursive=True)]
    except psutil.Error:
        return [root.pid]


@dataclass
class Sample:
    peak_rss_kib: int = 0
    peak_anon_kib: int = 0
    max_procs: int = 0
    samples: int = 0
    guard_killed: bool = False
    cpu_s: float = 0.0
    extra: dict = field(default_factory=dict)


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's children that have ended and been waited for (and of their own
    waited-for descendants)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measure(argv: list[str], log_prefix: Path, interval: float, max_anon_kib: int, timeout: float):
    """Run argv; sample the process tree; return (rc, wall_s, Sample, last stderr line). Sample.cpu_s: the run's
    user + system CPU seconds (runs are sequential, so the change in this process's children's total is the run's)."""
    import psutil

    out_f = open(f"{log_prefix}.stdout", "wb")
    err_f = open(f"{log_prefix}.stderr", "wb")
    s = Sample()
    cpu0 = _children_cpu_s()
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(argv, stdout=out_f, stderr=err_f, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as e:
        out_f.close()
        err_f.close()
        return 127, 0.0, s, f"{type(e).__name__}: {e}"
    root = psutil.Process(proc.pid)
    stop = threading.Event()

    def kill_tree():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def sampler():
        # the tree is listed (psutil reads /proc/*/stat of every process on the machine) every TREE_EVERY samples
        # only: listing it every 20 ms took CPU from the 2-core runs it measured
        pids, n = [root.pid], 0
        while not stop.is_set():
            if n % TREE_EVERY == 0:
                pids = _tree(root)
            n += 1
            rss = anon = 0
            for pid in pids:
                v = _status_kib(pid)
                if v:
                    rss += v[0]
                    anon += v[1]
            s.samples += 1
            s.max_procs = max(s.max_procs, len(pids))
            s.peak_rss_kib = max(s.peak_rss_kib, rss)
            s.peak_anon_kib = max(s.peak_anon_kib, anon)
            if anon > max_anon_kib:
                s.guard_killed = True
                kill_tree()
                return
            stop.wait(interval)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_tree()
        rc = proc.wait()
    wall = time.perf_counter() - t0
    s.cpu_s = _children_cpu_s() - cpu0
    stop.set()
    th.join()
    kill_tree()  # stray descendants in the run's session
    out_f.close()
    err_f.close()
    last = ""
    for path in (f"{log_prefix}.stderr", f"{log_prefix}.stdout"):
        lines = [ln.strip().strip("│").strip() for ln in Path(path).read_text(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln and not set(ln) <= set("─│╭╮╰╯ ")]  # rich box borders
        if lines:
            last = lines[-1]
            break
    if s.guard_killed:
        last = f"killed by the memory guard (tree RssAnon > {max_anon_kib / 2**20:.1f} GiB); " + last
    if timed_out:
        last = f"killed after --timeout {timeout:.0f}s; " + last
    return rc, wall, s, last


# ----------------------------------------------------------------------------------------------- runs
def run_argv(run: str, src: Path, out: Path, dtype_key: str, args, spec: dict, workdir: Path) -> list[str] | str:
    """argv of a run, or a string saying why it is skipped."""
    qkv = [args.qkvconv]
    extra = list(args.extra)
    if args.match_dtype:
        extra += ["--dtype", DTYPES[dtype_key][0]]
    if run == "a":
        return ["cp", "-r", str(src), str(out)]
    if run == "b":
        return [sys.executable, str(Path(__file__).resolve()), "--copy", str(src), str(out)]
    if run == "c":
        return qkv + ["absorb-query", str(src), "-o", str(out), "--no-verify"] + extra
    if run == "d":
        return qkv + ["absorb-query", str(src), "-o", str(out)] + extra
    if run == "e":
        return qkv + ["share-kv", str(src), "-o", str(out), "--mode", "k=v", "--kv-heads", "1", "--no-verify"] + extra
    if run == "f":
        return qkv + ["share-kv", str(src), "-o", str(out), "--mode", "k=v", "--kv-heads", "1",
                      "--init", "calibrated"] + extra
    if run == "g":
        if not Path(args.mergekit).is_file():
            return f"mergekit-yaml not found at {args.mergekit}"
        cfg = workdir / f"mergekit-passthrough-{src.name}.yml"
        cfg.write_text(
            "merge_method: passthrough\n"
            "slices:\n"
            "  - sources:\n"
            f"      - model: {src}\n"
            f"        layer_range: [0, {spec['layers']}]\n"
            f"dtype: {DTYPES[dtype_key][0]}\n")
        shard_params = spec["shard_bytes"] // DTYPES[dtype_key][1]
        return [args.mergekit, str(cfg), str(out), "--lazy-unpickle", "--out-shard-size", str(shard_params),
                "--quiet"]
    raise ValueError(run)


def machine_facts() -> dict:
    import psutil

    def ver(pkg):
        try:
            return _md.version(pkg)
        except _md.PackageNotFoundError:
            return None

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "kernel": platform.release(), "python": platform.python_version(),
        "cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / GIB, 2),
        "versions": {p: ver(p) for p in ("qkvconv", "torch", "transformers", "safetensors", "accelerate", "psutil")},
        "git_commit": commit, "git_dirty_tracked": dirty,
    }


def fmt_table(rows: list[dict]) -> str:
    head = ["run", "dtype", "ckpt GiB", "wall s", "CPU s", "x copy(b)", "peak RSS GiB", "peak RssAnon GiB",
            "RSS % ckpt", "out GiB", "status"]
    body = []
    for r in rows:
        def f(v, spec):
            return "-" if v is None else format(v, spec)
        body.append([f"{r['run']} {RUN_LABELS[r['run']]}", r["dtype"], f(r["ckpt_gib"], ".2f"), f(r["wall_s"], ".1f"),
                     f(r["cpu_s"], ".1f"), f(r["ratio_to_copy"], ".2f"), f(r["peak_rss_gib"], ".2f"),
                     f(r["peak_anon_gib"], ".2f"), f(r["peak_rss_pct_ckpt"], ".0f"), f(r["out_gib"], ".2f"),
                     r["status"]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copy", nargs=2, metavar=("SRC", "DST"), help="internal: run b, the plain shard copy")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qkvconv-bench"))
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count")
    ap.add_argument("--shard-gb", type=float, default=None, help="override the shard size (1e9 bytes)")
    ap.add_argument("--runs", default="a,b,c,d,e,f", help=f"comma list from {','.join(RUN_NAMES)} (g = mergekit)")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--extra", action="append", default=[],
                    help="flag appended to the qkvconv runs c-f (repeatable; --extra=--flag)")
    ap.add_argument("--match-dtype", action="store_true", help="pass --dtype <checkpoint dtype> to runs c-f")
    ap.add_argument("--qkvconv", default=str(Path(sys.executable).parent / "qkvconv"))
    ap.add_argument("--mergekit", default="/tmp/venv-mergekit/bin/mergekit-yaml")
    ap.add_argument("--interval", type=float, default=0.02, help="memory sampling interval, seconds")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="per run, seconds")
    ap.add_argument("--max-anon-gib", type=float, default=None,
                    help="memory guard: kill a run whose tree RssAnon exceeds this (default 85%% of RAM)")
    ap.add_argument("--no-warm", action="store_true", help="skip the page-cache warm-up read before each run")
    ap.add_argument("--wq-cond", type=float, default=10.0,
                    help="condition number of every W_Q (0: plain Gaussian, cond ~1e4 at hidden 256)")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="results path (default under --workdir/results)")
    args = ap.parse_args()

    if args.copy:
        plain_copy(Path(args.copy[0]), Path(args.copy[1]))
        return

    import psutil

    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [r for r in runs if r not in RUN_NAMES] + [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown runs/dtypes: {bad}")
    spec = dict(SIZES[args.size])
    if args.layers:
        spec["layers"] = args.layers
    if args.shard_gb:
        spec["shard_bytes"] = int(args.shard_gb * 1e9)
    args.workdir.mkdir(parents=True, exist_ok=True)
    max_anon_kib = int((args.max_anon_gib * GIB if args.max_anon_gib else 0.85 * psutil.virtual_memory().total)
                       / 1024)
    logs = args.workdir / "logs"
    logs.mkdir(exist_ok=True)

    facts = machine_facts()
    print(f"machine: {facts['cpu']}, {facts['usable_cores']} cores, {facts['ram_gib']} GiB RAM; "
          f"torch {facts['versions']['torch']}, transformers {facts['versions']['transformers']}", flush=True)
    ckpts, build_s = {}, {}
    for d in dtypes:
        t = time.perf_counter()
        ckpts[d] = build_checkpoint(args.workdir, args.size, d, spec, wq_cond=args.wq_cond)
        build_s[d] = round(time.perf_counter() - t, 1)
    n_params = sum(numel(s) for _, s, _ in tensor_plan(spec))
    for d, p in ckpts.items():
        shards = sorted(p.glob("*.safetensors"))
        print(f"checkpoint {d}: {p}  {dir_bytes(p) / GIB:.2f} GiB ({dir_bytes(p) / 1e9:.2f} GB), "
              f"{len(shards)} shards, {n_params / 1e9:.3f} B params", flush=True)
    if args.build_only:
        return

    rows = []
    for d in dtypes:
        src = ckpts[d]
        ckpt_b = dir_bytes(src)
        copy_wall = None
        for r in runs:
            out = args.workdir / f"out-{r}-{d}"
            shutil.rmtree(out, ignore_errors=True)
            argv = run_argv(r, src, out, d, args, spec, args.workdir)
            row = {"run": r, "label": RUN_LABELS[r], "dtype": d, "ckpt_gib": ckpt_b / GIB, "ckpt_bytes": ckpt_b,
                   "argv": argv if isinstance(argv, list) else None, "wall_s": None, "cpu_s": None,
                   "ratio_to_copy": None,
                   "peak_rss_gib": None, "peak_anon_gib": None, "peak_rss_pct_ckpt": None, "out_gib": None,
                   "rc": None, "status": "", "last_line": ""}
            if isinstance(argv, str):
                row["status"] = f"skipped: {argv}"
                print(f"[{r} {d}] {row['status']}", flush=True)
                rows.append(row)
                continue
            os.sync()
            if not args.no_warm:
                warm_read(src)
            print(f"[{r} {d}] {shlex.join(argv)}", flush=True)
            rc, wall, s, last = measure(argv, logs / f"{r}-{d}", args.interval, max_anon_kib, args.timeout)
            ok = rc == 0 and not s.guard_killed
            row.update(rc=rc, wall_s=wall, cpu_s=s.cpu_s, peak_rss_gib=s.peak_rss_kib * 1024 / GIB,
                       peak_anon_gib=s.peak_anon_kib * 1024 / GIB,
                       peak_rss_pct_ckpt=100 * s.peak_rss_kib * 1024 / ckpt_b, samples=s.samples,
                       max_procs=s.max_procs, last_line=last, status="ok" if ok else f"FAILED rc={rc}")
            if out.exists():
                row["out_gib"] = dir_bytes(out) / GIB
            if r == "b" and ok:
                copy_wall = wall
            msg = (f"[{r} {d}] {row['status']}: {wall:.1f}s ({s.cpu_s:.1f} CPU s), "
                   f"peak RSS {row['peak_rss_gib']:.2f} GiB, "
                   f"peak RssAnon {row['peak_anon_gib']:.2f} GiB ({s.samples} samples)")
            if not ok:
                msg += f"\n    last line: {last}\n    logs: {logs / f'{r}-{d}'}.std{{out,err}}"
            print(msg, flush=True)
            shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
        for row in rows:
            if row["dtype"] == d and copy_wall and row["wall_s"] is not None and row["status"] == "ok":
                row["ratio_to_copy"] = row["wall_s"] / copy_wall

    print()
    print(fmt_table(rows))
    result = {"machine": facts, "size": args.size, "spec": spec, "n_params": n_params,
              "checkpoints": {d: str(p) for d, p in ckpts.items()}, "build_s": build_s,
              "interval_s": args.interval, "extra": args.extra, "match_dtype": args.match_dtype,
              "max_anon_gib_guard": max_anon_kib / 2**20, "rows": rows}
    path = args.json or args.workdir / "results" / (
        f"bench_stream-{args.size}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
