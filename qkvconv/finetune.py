"""Short finetuning runs: heal a lossy conversion, or train the modules qkvconv added (frozen probe).

One loop for every converted (or stock) checkpoint: it needs only the nn.Module `qkvconv.load` returns
and the layout block in its config. Data is packed into `seq_len` windows of the model's own tokens (in memory,
or streamed and packed on the fly with `stream=True`: qkvconv.textstream); the schedule is linear warmup then
cosine decay to zero; the loss is next-token cross-entropy, or with `distill=α` the mix
(1 − α)·cross-entropy + α·KL(teacher ‖ student), the teacher being the checkpoint the model was converted from:
every token then carries the original's whole next-token distribution.

Memory levers: `lora=R` trains PEFT LoRA adapters on the selected projections (merged back into a normal
checkpoint at the end), `gradient_checkpointing` recomputes each decoder layer's activations in the backward,
`precision="bf16"` autocasts to bf16 while the master weights and the optimizer stay fp32.

Reproducibility: the sample order is a function of the seed alone, dropout draws from the global torch RNG, and a
checkpoint (`state.pt`, qkvconv's own format, the same for every strategy) holds the trained weights, optimizer,
scheduler, RNG states and the data position (for a stream: the exact token), so `resume=True` ends exactly where an
uninterrupted run with the same seed ends.

Engine: accelerate (qkvconv.engine). The same command runs on one CPU or GPU, or launched by
`accelerate launch [--use_fsdp ...] -m qkvconv.cli finetune ...` or `torchrun --nproc-per-node N -m qkvconv.cli
finetune ...`: each process takes its slice of every global batch; gradients are averaged by DDP or sharded by FSDP;
the main process logs, checkpoints and writes.

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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch

from qkvconv.archs import ArchSpec, dims_of
from qkvconv.checkpoint import check_output, load, qkvconv_block, read_record, resolve_source, write_with_history
from qkvconv import engine
from qkvconv.errors import CheckpointError, QkvconvError, first_line
from qkvconv.textstream import WindowCycle, WindowStream
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
    lr_new: float | None = None  # peak lr of the modules qkvconv added (`--train new`'s selection); default: lr
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
    lora: int | None = None  # LoRA rank on the --train selection's projections (None: train the weights themselves)
    lora_alpha: float | None = None  # LoRA scale α (the update is (α/r)·B·A); default 2·rank
    gradient_checkpointing: bool = False
    stream: bool = False  # read, tokenize and pack the data on the fly instead of all at the start
    shuffle_buffer: int = 256  # windows in the stream's shuffle buffer


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
    peak_memory_bytes: int | None = None  # peak GPU memory allocated (None on a CPU)
    peak_rss_bytes: int | None = None
    mfu: float | None = None  # model FLOPs utilisation (GPU with a known peak only)
    strategy: str = "single"  # single | ddp | fsdp | fsdp-cpu | deepspeed (qkvconv.engine.strategy)
    parameters: int = 0  # of the model (LoRA adapters not counted): the N of MFU's 6·N·tokens/s
    parameters_per_process: int = 0  # what one process holds (sharded: about parameters / processes)

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
        first = first_line(e)
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


def param_groups(net, spec: ArchSpec, cfg: FinetuneConfig) -> list[dict]:
    """The optimizer's parameter groups: with `lr_new`, the trained weights of the modules qkvconv added (latent
    projections, query MLP, ...) at that peak lr and the rest at `lr`; otherwise one group."""
    trained = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if cfg.lr_new is None:
        return [{"params": [p for _, p in trained]}]
    prefixes = tuple(added_module_prefixes(layout_layers(net, spec), spec))  # () on an unmodified model
    new = [p for n, p in trained if n.startswith(prefixes)]
    rest = [p for n, p in trained if not n.startswith(prefixes)]
    # group 0 first: train.jsonl logs its lr, --lr's wherever more than the added modules train
    return [g for g in ({"params": rest}, {"params": new, "lr": cfg.lr_new}) if g["params"]]


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -------------------------------------------------------------------------------- run machinery
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


def load_teacher(model: str | Path, cfg: FinetuneConfig, vocab_size: int, device: torch.device, allow_pickle: bool,
                 sharded: bool = False):
    """The frozen model whose next-token distributions --distill matches and --eval-kl measures the distance to
    (default: MODEL's original source; for --eval-kl on an unconverted model, MODEL as it starts); sharded like the
    student under FSDP."""
    path = cfg.teacher or (str(model) if not cfg.distill and not _has_history(model) else original_source(model))
    teacher = load(resolve_source(path, allow_pickle=allow_pickle), dtype=torch.float32, allow_pickle=allow_pickle)
    net = teacher.model.to(device).eval()
    if net.config.vocab_size != vocab_size:
        raise QkvconvError(f"--teacher {path}: vocabulary of {net.config.vocab_size} tokens, the model has {vocab_size}")
    for p in net.parameters():
        p.requires_grad_(False)
    if sharded:
        engine.shard(net, net.get_submodule(teacher.spec.layers), device)
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




@torch.no_grad()
def evaluate_loss(model, windows: torch.Tensor, batch_size: int, acc, teacher=None) -> tuple[float, float | None]:
    """Mean next-token cross-entropy over all held-out windows (nats/token), and the mean KL to `teacher`.

    Each process takes every world-th window and the sums are added up across processes; every process runs the
    same number of forwards (a sharded model needs all of them in each), a spare one on a window it then ignores."""
    was_training = model.training
    model.eval()
    world, rank, dev = acc.num_processes, acc.process_index, acc.device
    mine = windows[rank::world]
    batches = math.ceil(math.ceil(len(windows) / world) / batch_size)
    sums = torch.zeros(3, dtype=torch.float64)  # cross-entropy over predicted tokens, KL over positions, tokens
    for b in range(batches):
        x = mine[b * batch_size : (b + 1) * batch_size]
        real = len(x) > 0
        x = (x if real else windows[:1]).to(dev)
        with acc.autocast():
            logits = model(input_ids=x).logits.float()
            kl = kl_to_teacher(logits, teacher(input_ids=x).logits) if teacher is not None else torch.zeros(())
        if real:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            sums += torch.tensor([float(loss), float(kl) * x.numel(), x.numel()], dtype=torch.float64)
    if world > 1:
        sums = acc.reduce(sums.to(dev), "sum").cpu()
    model.train(was_training)
    n = len(windows)
    ce, kl = float(sums[0]) / (n * (windows.shape[1] - 1)), float(sums[1]) / windows.numel()
    return ce, (None if teacher is None else kl)


def _check(cfg: FinetuneConfig) -> None:
    if cfg.steps is None and cfg.tokens is None:
        raise QkvconvError("give --steps or --tokens")
    for name in ("seq_len", "batch_size", "grad_accum", "eval_seqs", "shuffle_buffer"):
        if getattr(cfg, name) < 1:
            raise QkvconvError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.lr_new is not None and cfg.lr_new <= 0:
        raise QkvconvError("--lr-new must be positive")
    if cfg.lr_new is not None and cfg.lora:
        raise QkvconvError("--lr-new sets the lr of the added modules' own weights; it does not combine with --lora")
    if cfg.precision not in ("fp32", "bf16"):
        raise QkvconvError(f"--precision must be fp32 or bf16, not {cfg.precision!r}")
    if not 0.0 <= cfg.distill <= 1.0:
        raise QkvconvError(f"--distill {cfg.distill}: the KL weight must be between 0 and 1")
    if cfg.teacher is not None and not (cfg.distill or cfg.eval_kl):
        raise QkvconvError("--teacher is only used with --distill or --eval-kl")
    if cfg.lora is not None and cfg.lora < 1:
        raise QkvconvError(f"--lora {cfg.lora}: the LoRA rank must be at least 1")
    if cfg.lora_alpha is not None and cfg.lora is None:
        raise QkvconvError("--lora-alpha is only used with --lora")


def _data(cfg: FinetuneConfig, tokenizer, train_seqs: int):
    """(training source with take/state_dict, held-out windows, description, fingerprint entries)."""
    if not cfg.stream:
        windows, evals, what = load_data(cfg, tokenizer, train_seqs)
        return WindowCycle(windows, cfg.seed), evals, what, {"train_windows": len(windows)}
    stream = WindowStream(lambda: iter_texts(cfg.data, split=cfg.hf_split), tokenizer, cfg.seq_len, seed=cfg.seed,
                          buffer=cfg.shuffle_buffer)
    if cfg.eval_data:
        evals = pack(iter_texts(cfg.eval_data, split="validation"), tokenizer, cfg.seq_len, cfg.eval_seqs)
        what = f"{cfg.data}, streamed (held out: {cfg.eval_data})"
        if len(evals) == 0:
            raise QkvconvError(f"no held-out window of {cfg.seq_len} tokens in {cfg.eval_data}")
    else:
        evals = stream.head(cfg.eval_seqs)  # the first windows of the text; a second epoch reads them again
        what = f"{cfg.data}, streamed (held out: its first {cfg.eval_seqs} windows)"
    return stream, evals, what, {}


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
    _check(cfg)
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

    acc = engine.make_accelerator(device, cfg.precision)
    how, dev, world, rank = engine.strategy(acc), acc.device, acc.num_processes, acc.process_index
    if world != int(os.environ.get("WORLD_SIZE", "1")):
        raise QkvconvError(f"launched as {os.environ['WORLD_SIZE']} processes, but accelerate joined {world}; "
                           "check --device and the launch configuration")
    sharded = how in ("fsdp", "fsdp-cpu")
    loaded = load(source, dtype=torch.float32, allow_pickle=allow_pickle, with_hash=True)
    net, spec = loaded.model, loaded.spec
    n_params = sum(p.numel() for p in net.parameters())
    names = set(trainable_names(net, spec, cfg.train))
    for n, p in net.named_parameters():
        p.requires_grad_(n in names)
    if cfg.gradient_checkpointing:
        engine.checkpoint_layers(net)
    layers = net.get_submodule(spec.layers)
    lora = None
    if cfg.lora:
        targets = engine.lora_targets(net, names)
        lora = engine.lora_config(cfg.lora, cfg.lora_alpha, targets)
        torch.manual_seed(cfg.seed)  # the adapters' A init
        net = engine.add_lora(net, lora, engine.trained_beside_lora(net, names, targets))
    net.to(dev)
    if how == "fsdp-cpu":
        engine.shard(net, layers, dev)
    groups = param_groups(net, spec, cfg)
    params = [p for g in groups for p in g["params"]]  # every trained parameter
    n_trainable = sum(p.numel() for p in params)
    teacher = None
    if cfg.distill or cfg.eval_kl:
        teacher = load_teacher(model, cfg, net.config.vocab_size, dev, allow_pickle, sharded=sharded)

    per_step = cfg.batch_size * cfg.grad_accum * world  # windows per optimizer step
    steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.tokens / (per_step * cfg.seq_len)))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, steps // 20)
    data, evals, data_what, data_fingerprint = _data(cfg, loaded.tokenizer, steps * per_step)

    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    train_model, step_opt = (net, opt) if how == "fsdp-cpu" else acc.prepare(net, opt)
    eval_model = train_model if how in ("fsdp", "deepspeed") else net  # a sharded model runs only wrapped
    local_params = engine.local_parameters(train_model)  # this process's share of the weights (FSDP: ~1/world)
    fingerprint = {**asdict(cfg), "model": source.path, "source_sha256": loaded.source_hash, "steps": steps,
                   "world_size": world, **data_fingerprint}
    train_log, eval_log = run_dir / "train.jsonl", run_dir / "eval.jsonl"

    start = 0
    if resume:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        diff = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        if diff:
            raise QkvconvError(f"--resume: this run differs from the saved one in {', '.join(diff)}; use the same options")
        engine.load_states(train_model, opt, acc, state["trainable"], state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        data.load_state_dict(state["data"])
        start = state["step"]
        if acc.is_main_process:  # a killed run may have logged past its last checkpoint
            for log in (train_log, eval_log):
                rows = _read_jsonl(log, up_to_step=start)
                log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if acc.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            for name in (STATE_FILE, "train.jsonl", "eval.jsonl", "curves.png"):  # only our own files
                (run_dir / name).unlink(missing_ok=True)
    acc.wait_for_everyone()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    flops = engine.peak_flops(dev, cfg.precision)

    def save(step: int) -> None:
        trainable = engine.model_state(train_model, acc, trainable_only=True)  # every process takes part
        optimizer = engine.optimizer_state(train_model, opt, acc)
        if acc.is_main_process:
            _save_state(run_dir, {"step": step, "samples_seen": step * per_step, "fingerprint": fingerprint,
                                  "trainable": trainable, "optimizer": optimizer, "scheduler": sched.state_dict(),
                                  "rng": _rng_state(), "data": data.state_dict()})
        acc.wait_for_everyone()

    def run_eval(step: int) -> None:
        loss, kl = evaluate_loss(eval_model, evals, cfg.batch_size, acc, teacher)
        if acc.is_main_process:
            _append_jsonl(eval_log, {"step": step, "loss": loss, "ppl": math.exp(min(loss, 50.0)),
                                     "tokens": step * per_step * cfg.seq_len} | ({} if kl is None else {"kl": kl}))

    if start == 0:
        run_eval(0)
    progress = _progress(show_progress and acc.is_main_process, steps, start)
    train_model.train()
    seconds, tokens_done, tps, utilisation = 0.0, 0, 0.0, None
    with progress:
        task = progress.add_task("finetune", total=steps, completed=start, loss=float("nan"), tps=0.0, mem="", mfu="")
        for step in range(start, steps):
            t0 = time.perf_counter()
            batch = data.take(per_step)  # every process reads the whole step's windows and takes its slice
            total = 0.0
            for j in range(cfg.grad_accum):
                first = (j * world + rank) * cfg.batch_size
                x = batch[first : first + cfg.batch_size].to(dev)
                with engine.no_sync(train_model, acc, last=j == cfg.grad_accum - 1):
                    with acc.autocast():
                        out = train_model(input_ids=x, labels=x)
                        loss = out.loss
                        if cfg.distill:
                            with torch.no_grad():
                                target = teacher(input_ids=x).logits
                            loss = (1 - cfg.distill) * loss + cfg.distill * kl_to_teacher(out.logits, target)
                        loss = loss / cfg.grad_accum
                    acc.backward(loss)
                total += float(loss.detach())
            grad_norm = None
            if cfg.max_grad_norm:
                grad_norm = engine.clip_grad_norm(params, cfg.max_grad_norm, acc, train_model)
            lr = sched.get_last_lr()[0]
            step_opt.step()
            sched.step()
            step_opt.zero_grad(set_to_none=True)
            if world > 1:
                total = float(acc.reduce(torch.tensor([total], device=dev), "mean"))
            seconds += time.perf_counter() - t0
            tokens_done += per_step * cfg.seq_len
            tps = tokens_done / max(seconds, 1e-9)
            utilisation = engine.mfu(n_params, tps, flops, world)
            if acc.is_main_process:
                _append_jsonl(train_log, {"step": step + 1, "loss": total, "lr": lr, "grad_norm": grad_norm,
                                          "tokens": (step + 1) * per_step * cfg.seq_len, "tokens_per_s": tps}
                              | ({} if utilisation is None else {"mfu": utilisation}))
            memory = engine.peak_memory(dev)
            mem = memory["peak_gpu_bytes"] if memory["peak_gpu_bytes"] is not None else memory["peak_rss_bytes"]
            progress.update(task, advance=1, loss=total, tps=tps, mem=f"{(mem or 0) / 2**30:.2f} GiB",
                            mfu="" if utilisation is None else f"MFU {100 * utilisation:.1f}%")
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == steps:
                run_eval(step + 1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                save(step + 1)
            if on_step is not None:
                on_step(step + 1)

    memory = engine.peak_memory(dev)
    final = engine.model_state(train_model, acc)  # every process takes part in gathering the shards
    train_rows, eval_rows = _read_jsonl(train_log), _read_jsonl(eval_log)
    result = FinetuneResult(None, run_dir, steps, steps * per_step * cfg.seq_len, n_trainable, eval_rows, train_rows,
                            tps, memory["peak_gpu_bytes"], memory["peak_rss_bytes"], utilisation, how, n_params,
                            local_params)
    if acc.is_main_process:
        title = (f"{Path(source.path).name}: --train {cfg.train}{f' --lora {cfg.lora}' if cfg.lora else ''}, "
                 f"{result.tokens:,} tokens, seed {cfg.seed}, {how} × {world}")
        plot_curves(train_rows, eval_rows, run_dir / "curves.png", title)
        if output is not None:
            if lora is not None:  # fold the adapters into a fresh copy of the model: a normal checkpoint
                final = engine.merge_lora(load(source, dtype=torch.float32, allow_pickle=allow_pickle).model, lora, final)
            result.output = _write(output, loaded, final, spec, source, cfg, result, data_what, control, force,
                                   {"processes": world, "device": str(dev), "strategy": how})
            state_path.unlink(missing_ok=True)  # finished: nothing left to resume
    acc.wait_for_everyone()
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


def _write(output, loaded, state_dict, spec, source, cfg, result, data_what, control, force, where: dict) -> Path:
    details = {
        "data": data_what,
        "tokens": result.tokens,
        "trainable_parameters": result.trainable_parameters,
        "eval": result.eval_curve,
        "run_dir": str(result.run_dir),
        **where,
        "parameters": result.parameters,
        "parameters_per_process": result.parameters_per_process,
        "tokens_per_s": result.tokens_per_s,
        "peak_rss_bytes": result.peak_rss_bytes,
        "peak_gpu_bytes": result.peak_memory_bytes,
        "mfu": result.mfu,
    }
    return write_with_history(
        output, transform="finetune", options={**asdict(cfg), "steps": result.steps, "control": control},
        source=source, source_hash=loaded.source_hash, details=details, seed=cfg.seed,
        state_dict=state_dict, config=loaded.model.config, spec=spec, tokenizer=loaded.tokenizer,
        generation_config=getattr(loaded.model, "generation_config", None), force=force,
    )


def _progress(enabled: bool, steps: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TextColumn("{task.fields[mem]}"), TextColumn("{task.fields[mfu]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled, transient=False,
    )
