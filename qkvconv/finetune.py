"""Short finetuning runs: heal a lossy conversion, or train the modules qkvconv added (frozen probe).

One loop for every converted (or stock) checkpoint: it needs only the nn.Module `qkvconv.load` returns
and the layout block in its config. Data is packed into `seq_len` windows of the model's own tokens;
the schedule is linear warmup then cosine decay to zero; the loss is next-token cross-entropy, or with
`distill=α` the mix (1 − α)·cross-entropy + α·KL(teacher ‖ student), the teacher being the checkpoint the
model was converted from: every token then carries the original's whole next-token distribution.

Reproducibility: the sample order is a function of (seed, epoch) alone, dropout draws from the global
torch RNG, and a checkpoint holds the trained weights, optimizer, scheduler, RNG states and the data
position, so `resume=True` ends exactly where an uninterrupted run with the same seed ends.

Multi-GPU: launch unchanged with `torchrun --nproc-per-node N -m qkvconv.cli finetune ...` (or
`accelerate launch -m qkvconv.cli finetune ...`): with WORLD_SIZE > 1 each rank takes its slice of every
global batch and gradients are averaged by DistributedDataParallel; rank 0 logs, checkpoints and writes.

A fair control (METHODS.md "What a fair comparison looks like"): `control=True` finetunes the checkpoint
the converted model was made from (the first source in its qkvconv.json), with the same data, tokens,
schedule and seed; equivalently, run the same command on the unmodified model.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
from functools import lru_cache
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch

from qkvconv.archs import ArchSpec, dims_of
from qkvconv.checkpoint import check_output, load, qkvconv_block, read_record, resolve_source, write_with_history
from qkvconv.errors import CheckpointError, QkvconvError
from qkvconv.transforms.attach import added_module_prefixes, attention_parts, stock_layers

TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl")
STATE_FILE = "state.pt"
CHUNK_CHARS = 1 << 20  # plain text is read and tokenized 1 MiB at a time, only as far as the budget needs


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that decides the result of a run (a resumed run must match it)."""

    data: str
    eval_data: str | None = None
    train: Literal["new", "attention", "all"] = "new"
    steps: int | None = None
    tokens: int | None = None
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int | None = None  # default: 5% of steps
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_every: int = 50
    eval_seqs: int = 16
    save_every: int = 100
    hf_split: str = "train"
    distill: float = 0.0  # weight α of KL(teacher ‖ student): loss = (1 − α)·cross-entropy + α·KL
    teacher: str | None = None  # default with distill: the checkpoint the model was converted from
    eval_kl: bool = False  # also log the held-out KL to the teacher (the original) at every eval, without distilling


@dataclass
class FinetuneResult:
    output: Path | None
    run_dir: Path
    steps: int
    tokens: int
    trainable_parameters: int
    eval_curve: list[dict] = field(default_factory=list)
    train_curve: list[dict] = field(default_factory=list)
    tokens_per_s: float = 0.0
    peak_memory_bytes: int | None = None

    @property
    def first_eval(self) -> float:
        return self.eval_curve[0]["loss"]

    @property
    def last_eval(self) -> float:
        return self.eval_curve[-1]["loss"]


# ------------------------------------------------------------------------------------------- data
def _looks_like_path(s: str) -> bool:
    """True unless `s` reads like an HF dataset name ("name" or "owner/name")."""
    return not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", s) or Path(s).suffix in TEXT_SUFFIXES or Path(s).expanduser().exists()


def iter_texts(data: str, *, split: str = "train") -> Iterator[tuple[str, bool]]:
    """(text, ends_a_document) pieces of a text/JSONL file, a folder of them, or an HF dataset name."""
    p = Path(data).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise QkvconvError(f"data folder {p} holds no {', '.join(TEXT_SUFFIXES)} files")
        for f in files:
            yield from _iter_file(f)
    elif p.is_file():
        yield from _iter_file(p)
    elif _looks_like_path(data):
        raise QkvconvError(f"data {data}: no such file or folder (expected a .txt/.jsonl file, a folder, or an HF dataset name)")
    else:
        yield from _iter_hub(data, split)


def _iter_file(path: Path) -> Iterator[tuple[str, bool]]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise QkvconvError(f"{path}:{n} is not a JSON object with a \"text\" field") from None
                    yield text, True
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        carry = ""
        while chunk := f.read(CHUNK_CHARS):
            chunk = carry + chunk
            cut = chunk.rfind("\n") + 1 or len(chunk)  # split at a line end, never inside a word
            carry = chunk[cut:]
            yield chunk[:cut], False
        if carry:
            yield carry, False
    yield "", True


def _iter_hub(name: str, split: str) -> Iterator[tuple[str, bool]]:
    try:
        import datasets
    except ImportError:
        raise QkvconvError(f"{name} looks like an HF dataset name, which needs `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
        for row in ds:
            yield row["text"], True
    except QkvconvError:
        raise
    except Exception as e:  # noqa: BLE001 (datasets raises many kinds; one line is what the user needs)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QkvconvError(f"cannot read HF dataset {name!r} (split {split}): {first}") from None


def pack(texts: Iterator[tuple[str, bool]], tokenizer, seq_len: int, max_seqs: int) -> torch.Tensor:
    """Concatenate the token stream (EOS after each document) into at most `max_seqs` windows (n, seq_len)."""
    eos = tokenizer.eos_token_id
    need = max_seqs * seq_len
    buf: list[int] = []
    for text, doc_end in texts:
        if text:
            buf.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if doc_end and eos is not None:
            buf.append(eos)
        if len(buf) >= need:
            break
    n = min(max_seqs, len(buf) // seq_len)
    return torch.tensor(buf[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def load_data(cfg: FinetuneConfig, tokenizer, train_seqs: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train windows, held-out windows, description). Held-out: `eval_data`, else the first windows of `data`."""
    held_out = 0 if cfg.eval_data else cfg.eval_seqs
    windows = pack(iter_texts(cfg.data, split=cfg.hf_split), tokenizer, cfg.seq_len, train_seqs + held_out)
    if cfg.eval_data:
        evals = pack(iter_texts(cfg.eval_data, split="validation"), tokenizer, cfg.seq_len, cfg.eval_seqs)
        what = f"{cfg.data} (held out: {cfg.eval_data})"
    else:
        evals, windows = windows[:held_out], windows[held_out:]
        what = f"{cfg.data} (held out: its first {held_out} windows)"
    if len(windows) == 0:
        raise QkvconvError(f"{cfg.data} has too little text for one training window of {cfg.seq_len} tokens")
    if len(evals) == 0:
        raise QkvconvError(f"no held-out window of {cfg.seq_len} tokens; give more text or --eval-data")
    return windows, evals, what


@lru_cache(maxsize=4)
def sample_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The order of the training windows in `epoch`, a function of (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_at(windows: torch.Tensor, start: int, size: int, seed: int) -> torch.Tensor:
    """Windows number start .. start+size-1 of the endless, per-epoch shuffled stream."""
    n = len(windows)
    idx = [int(sample_order(n, i // n, seed)[i % n]) for i in range(start, start + size)]
    return windows[idx]


# ----------------------------------------------------------------------------------- parameters
def layout_layers(model, spec: ArchSpec) -> list[dict]:
    block = qkvconv_block(model.config)
    return block["layers"] if block else stock_layers(dims_of(model.config, spec))


def trainable_names(model, spec: ArchSpec, train: str) -> list[str]:
    """Names of the parameters `--train` selects, decided by the layout block (never by model_type).

    new:       the modules qkvconv added (query MLP, pre-projection MLP, content skip)
    attention: every attention block, plus what sits on the attention input (absorbed affine, pre-projection MLP)
    all:       everything
    """
    names = [n for n, _ in model.named_parameters()]
    layers = layout_layers(model, spec)
    if train == "all":
        return names
    if train == "new":
        prefixes = added_module_prefixes(layers, spec)
        if not prefixes:
            raise QkvconvError("this model has no modules added by qkvconv (attach-query-mlp, attach-preproj); "
                               "use --train attention or --train all")
    elif train == "attention":
        prefixes = [f"{spec.layer(i, part)}." for i in range(len(layers)) for part in attention_parts(spec)]
    else:
        raise QkvconvError(f"--train must be new, attention or all, not {train!r}")
    return [n for n in names if n.startswith(tuple(prefixes))]


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -------------------------------------------------------------------------------- run machinery
@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _setup_distributed(device: str) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise QkvconvError("--device cuda: no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise QkvconvError(f"--device must be auto, cpu or cuda, not {device!r}")
    if world == 1:
        return _Dist(), torch.device(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(local)
        return _Dist(world, torch.distributed.get_rank(), local), torch.device("cuda", local)
    return _Dist(world, torch.distributed.get_rank(), local), torch.device("cpu")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_state(run_dir: Path, payload: dict) -> None:
    """torch.save to a temporary file, then rename: a kill mid-save leaves the previous state intact."""
    tmp = run_dir / f".{STATE_FILE}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, run_dir / STATE_FILE)


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _read_jsonl(path: Path, up_to_step: int | None = None) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


def plot_curves(train: list[dict], evals: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.7, label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) of the next-token distributions (nats/token), in float32."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


@torch.no_grad()
def evaluate_loss(model, windows: torch.Tensor, batch_size: int, device: torch.device, autocast,
                  teacher=None) -> tuple[float, float | None]:
    """Mean next-token cross-entropy over all held-out windows (nats/token), and the mean KL to `teacher`."""
    was_training = model.training
    model.eval()
    total, count, kl = 0.0, 0, 0.0  # cross-entropy over predicted tokens; KL over every position
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size].to(device)
        with autocast():
            logits = model(input_ids=x).logits.float()
            if teacher is not None:
                kl += float(kl_to_teacher(logits, teacher(input_ids=x).logits)) * x.numel()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count, (None if teacher is None else kl / windows.numel())


def load_teacher(model: str | Path, cfg: FinetuneConfig, vocab_size: int, device: torch.device, allow_pickle: bool):
    """The frozen model whose next-token distributions --distill matches and --eval-kl measures the distance to
    (default: MODEL's original source; for --eval-kl on an unconverted model, MODEL as it starts)."""
    path = cfg.teacher or (str(model) if not cfg.distill and not _has_history(model) else original_source(model))
    teacher = load(resolve_source(path, allow_pickle=allow_pickle), dtype=torch.float32, allow_pickle=allow_pickle)
    net = teacher.model.to(device).eval()
    if net.config.vocab_size != vocab_size:
        raise QkvconvError(f"--teacher {path}: vocabulary of {net.config.vocab_size} tokens, the model has {vocab_size}")
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _has_history(model: str | Path) -> bool:
    return Path(model).is_dir() and bool((read_record(model) or {}).get("history"))


def original_source(model: str | Path) -> str:
    """The checkpoint a converted model was made from (first source in its qkvconv.json): the control's base."""
    record = read_record(model) if Path(model).is_dir() else None
    history = (record or {}).get("history", [])
    if not history:
        raise QkvconvError(f"{model} has no qkvconv history; for a control, finetune the unmodified model itself")
    return history[0]["source"]["path"]


def finetune(
    model: str | Path,
    output: str | Path | None,
    cfg: FinetuneConfig,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    control: bool = False,
    device: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
    show_progress: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> FinetuneResult:
    """Finetune `model` (stock or converted) per `cfg`, write a qkvconv checkpoint at `output` (unless None).

    run_dir (default `<output>.run`) holds the resumable state, train.jsonl, eval.jsonl and curves.png.
    on_step(step) is called after every optimizer step (tests use it to simulate a kill).
    """
    if cfg.steps is None and cfg.tokens is None:
        raise QkvconvError("give --steps or --tokens")
    for name in ("seq_len", "batch_size", "grad_accum", "eval_seqs"):
        if getattr(cfg, name) < 1:
            raise QkvconvError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.precision not in ("fp32", "bf16"):
        raise QkvconvError(f"--precision must be fp32 or bf16, not {cfg.precision!r}")
    if not 0.0 <= cfg.distill <= 1.0:
        raise QkvconvError(f"--distill {cfg.distill}: the KL weight must be between 0 and 1")
    if cfg.teacher is not None and not (cfg.distill or cfg.eval_kl):
        raise QkvconvError("--teacher is only used with --distill or --eval-kl")
    if control and cfg.distill:
        raise QkvconvError("--control with --distill would distil the original into itself; compare with the teacher")
    if control:
        if cfg.train == "new":
            raise QkvconvError("a control has no added modules; use --train attention or all for the control run")
        model = original_source(model)
    if run_dir is None and output is None:
        raise QkvconvError("give --output or --run-dir")
    run_dir = Path(run_dir) if run_dir is not None else Path(output).with_name(Path(output).name + ".run")
    source = resolve_source(model, allow_pickle=allow_pickle)
    if output is not None:
        check_output(output, force=force, inputs=[source])
    state_path = run_dir / STATE_FILE
    if resume and not state_path.is_file():
        raise CheckpointError(f"--resume: no checkpoint {state_path} to resume from; start the run without --resume")
    if not resume and state_path.is_file() and not force:
        raise CheckpointError(f"{run_dir} holds an unfinished run; pass --resume to continue it or --force to restart")
    for path in (cfg.data, cfg.eval_data):  # fail before loading anything
        if path and _looks_like_path(path) and not Path(path).expanduser().exists():
            raise QkvconvError(f"data {path}: no such file or folder")

    dist, dev = _setup_distributed(device)
    loaded = load(source, dtype=torch.float32, allow_pickle=allow_pickle, with_hash=True)
    net, spec = loaded.model.to(dev), loaded.spec
    names = set(trainable_names(net, spec, cfg.train))
    for n, p in net.named_parameters():
        p.requires_grad_(n in names)
    params = [p for n, p in net.named_parameters() if n in names]
    n_trainable = sum(p.numel() for p in params)
    teacher = load_teacher(model, cfg, net.config.vocab_size, dev, allow_pickle) if cfg.distill or cfg.eval_kl else None

    per_step = cfg.batch_size * cfg.grad_accum * dist.world  # windows per optimizer step
    steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.tokens / (per_step * cfg.seq_len)))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, steps // 20)
    windows, evals, data_what = load_data(cfg, loaded.tokenizer, steps * per_step)

    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    fingerprint = {**asdict(cfg), "model": source.path, "source_sha256": loaded.source_hash, "steps": steps,
                   "world_size": dist.world, "train_windows": len(windows)}
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if cfg.precision == "bf16" else nullcontext
    train_log, eval_log = run_dir / "train.jsonl", run_dir / "eval.jsonl"

    start = 0
    if resume:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        diff = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        if diff:
            raise QkvconvError(f"--resume: this run differs from the saved one in {', '.join(diff)}; use the same options")
        with torch.no_grad():
            for n, p in net.named_parameters():
                if n in state["trainable"]:
                    p.copy_(state["trainable"][n])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start = state["step"]
        if dist.main:  # a killed run may have logged past its last checkpoint
            for log in (train_log, eval_log):
                rows = _read_jsonl(log, up_to_step=start)
                log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if dist.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            for name in (STATE_FILE, "train.jsonl", "eval.jsonl", "curves.png"):  # only our own files
                (run_dir / name).unlink(missing_ok=True)
    dist.barrier()

    train_model = net
    if dist.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def save(step: int) -> None:
        if dist.main:
            trainable = {n: p.detach().cpu().clone() for n, p in net.named_parameters() if n in names}
            _save_state(run_dir, {"step": step, "samples_seen": step * per_step, "fingerprint": fingerprint,
                                  "trainable": trainable, "optimizer": opt.state_dict(),
                                  "scheduler": sched.state_dict(), "rng": _rng_state()})
        dist.barrier()

    def run_eval(step: int) -> None:
        if dist.main:
            loss, kl = evaluate_loss(net, evals, cfg.batch_size, dev, autocast, teacher)
            _append_jsonl(eval_log, {"step": step, "loss": loss, "ppl": math.exp(min(loss, 50.0)),
                                     "tokens": step * per_step * cfg.seq_len} | ({} if kl is None else {"kl": kl}))
        dist.barrier()

    if start == 0:
        run_eval(0)
    progress = _progress(show_progress and dist.main, steps, start)
    train_model.train()
    t0, tokens_done = time.perf_counter(), 0
    with progress:
        task = progress.add_task("finetune", total=steps, completed=start, loss=float("nan"), tps=0.0)
        for step in range(start, steps):
            total = 0.0
            for j in range(cfg.grad_accum):
                first = step * per_step + (j * dist.world + dist.rank) * cfg.batch_size
                x = batch_at(windows, first, cfg.batch_size, cfg.seed).to(dev)
                sync = j == cfg.grad_accum - 1 or dist.world == 1
                with (nullcontext() if sync else train_model.no_sync()), autocast():
                    out = train_model(input_ids=x, labels=x)
                    loss = out.loss
                    if cfg.distill:
                        with torch.no_grad():
                            target = teacher(input_ids=x).logits
                        loss = (1 - cfg.distill) * loss + cfg.distill * kl_to_teacher(out.logits, target)
                    loss = loss / cfg.grad_accum
                loss.backward()
                total += float(loss.detach())
            grad_norm = None
            if cfg.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if dist.world > 1:
                t = torch.tensor([total], device=dev)
                torch.distributed.all_reduce(t)
                total = float(t) / dist.world
            tokens_done += per_step * cfg.seq_len
            tps = tokens_done / max(time.perf_counter() - t0, 1e-9)
            if dist.main:
                _append_jsonl(train_log, {"step": step + 1, "loss": total, "lr": lr, "grad_norm": grad_norm,
                                          "tokens": (step + 1) * per_step * cfg.seq_len, "tokens_per_s": tps})
            progress.update(task, advance=1, loss=total, tps=tps)
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == steps:
                run_eval(step + 1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                save(step + 1)
            if on_step is not None:
                on_step(step + 1)

    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    train_rows, eval_rows = _read_jsonl(train_log), _read_jsonl(eval_log)
    result = FinetuneResult(None, run_dir, steps, steps * per_step * cfg.seq_len, n_trainable, eval_rows, train_rows,
                            tokens_done / max(time.perf_counter() - t0, 1e-9), peak)
    if dist.main:
        title = f"{Path(source.path).name}: --train {cfg.train}, {result.tokens:,} tokens, seed {cfg.seed}"
        plot_curves(train_rows, eval_rows, run_dir / "curves.png", title)
        if output is not None:
            result.output = _write(output, loaded, net, spec, source, cfg, result, data_what, control, force,
                                   {"processes": dist.world, "device": str(dev)})
            state_path.unlink(missing_ok=True)  # finished: nothing left to resume
    dist.barrier()
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return result


def _write(output, loaded, net, spec, source, cfg, result, data_what, control, force, where: dict) -> Path:
    net.eval()
    details = {
        "data": data_what,
        "tokens": result.tokens,
        "trainable_parameters": result.trainable_parameters,
        "eval": result.eval_curve,
        "run_dir": str(result.run_dir),
        **where,
        "tokens_per_s": result.tokens_per_s,
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_gpu_bytes": result.peak_memory_bytes,
    }
    return write_with_history(
        output, transform="finetune", options={**asdict(cfg), "steps": result.steps, "control": control},
        source=source, source_hash=loaded.source_hash, details=details, seed=cfg.seed,
        state_dict={k: v.detach().cpu() for k, v in net.state_dict().items()}, config=net.config, spec=spec,
        tokenizer=loaded.tokenizer, generation_config=getattr(net, "generation_config", None), force=force,
    )


def _peak_rss_bytes() -> int | None:
    """Peak resident memory of this process so far (None where the platform has no `resource`)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _progress(enabled: bool, steps: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled, transient=False,
    )
