"""The options of every converting, healing and evaluating step, as pydantic models shared by the CLI and recipes.

One model per command: the CLI builds it from its flags (`qkvconv share-kv --kv-heads 3` → ShareKvOptions(kv_heads=3))
and a recipe step from its YAML mapping (`- share-kv: {kv_heads: 3}`); both then call the library through the
model's own method (`.convert`, `.config`, `.evaluate`), so a command line and a recipe step cannot mean different
things. Field names are the CLI flags in snake case; tests/test_recipe.py fails if a command's flags and its model's
fields drift apart. What only says *where* a command reads and writes (the model path, --output, --force,
--allow-pickle, --dry-run) is not an option of the step, and stays out of the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

DTYPES = ("float32", "fp32", "float64", "fp64", "bfloat16", "bf16", "float16", "fp16")


def torch_dtype(name: str):
    """torch dtype of a CLI/recipe dtype name (float32, bf16, ...)."""
    import torch

    from qkvconv.errors import QkvconvError

    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise QkvconvError(f"unknown dtype {name!r}; use one of float32, float64, bfloat16, float16")
    return table[name]


class Options(BaseModel):
    """Frozen, and unknown keys are refused (a misspelt recipe key is an error, never silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------------------------- conversions
class ConvertOptions(Options):
    """What every converting command shares: calibration/verification text, output dtype, seed, checks, device."""

    calib: Optional[str] = None  # text file; "sample": sampled from the original model; None: the shipped text
    num_seqs: Optional[int] = Field(None, ge=1)
    seq_len: Optional[int] = Field(None, ge=1)
    dtype: str = "auto"  # auto: the checkpoint's own
    seed: int = 0
    verify: bool = True
    decode_check: Literal["auto", "always", "never"] = "auto"
    device: str = "cpu"

    transform: ClassVar[str]  # the command's name

    def _common(self) -> dict[str, Any]:
        calib = self.calib
        if calib is not None and calib != "sample":
            calib = Path(calib).expanduser()
        return dict(calib=calib, seed=self.seed, verify=self.verify, decode=self.decode_check, device=self.device,
                    dtype=None if self.dtype == "auto" else torch_dtype(self.dtype))

    def _library(self) -> tuple[Callable, dict[str, Any]]:  # pragma: no cover - each subclass has one
        raise NotImplementedError

    def convert(self, model: str | Path, output: str | Path | None, *, force: bool = False, allow_pickle: bool = False,
                progress: Callable[[str], None] | None = None, dry_run: bool = False):
        """Run the conversion (qkvconv.convert.*_checkpoint); its Report (or DryRun with dry_run)."""
        fn, kwargs = self._library()
        return fn(model, output, force=force, allow_pickle=allow_pickle, progress=progress, dry_run=dry_run, **kwargs)


class AbsorbQueryOptions(ConvertOptions):
    """absorb-query (METHODS.md §1)."""

    transform: ClassVar[str] = "absorb-query"
    mode: Literal["exact", "drop"] = "exact"
    num_seqs: Optional[int] = Field(None, ge=1)  # None: 1 for exact, 8 for drop
    seq_len: int = Field(128, ge=1)
    atol: Optional[float] = None
    folded_dtype: Literal["float64", "float32", "output"] = "float64"

    def _library(self):
        from qkvconv.convert import absorb_query_checkpoint

        return absorb_query_checkpoint, dict(
            mode=self.mode, num_seqs=self.num_seqs, seq_len=self.seq_len, atol=self.atol,
            folded_dtype=None if self.folded_dtype == "output" else torch_dtype(self.folded_dtype), **self._common())


class ShareKvOptions(ConvertOptions):
    """share-kv (METHODS.md §3, §4): num_seqs/seq_len None = 16×128, or 40×256 for init calibrated."""

    transform: ClassVar[str] = "share-kv"
    mode: Optional[str] = None  # k=v | q=k | q=k=v
    kv_heads: Optional[int] = Field(None, ge=1)
    init: str = "key"  # key | value | mean | calibrated
    export: Optional[str] = None  # stock
    pos2d: Optional[int] = Field(None, ge=1)

    @field_validator("mode", "init", "export")
    @classmethod
    def _known(cls, v, info):
        """The library's own words (transforms.share_kv), at recipe load time instead of at the step."""
        from qkvconv.transforms.share_kv import INITS, MODES

        known = {"mode": MODES, "init": INITS, "export": ("stock",)}[info.field_name]
        if v is not None and v not in known:
            raise ValueError(f"unknown --{info.field_name} {v!r}; use one of {', '.join(known)}")
        return v

    def _library(self):
        from qkvconv.convert import share_kv_checkpoint

        return share_kv_checkpoint, dict(mode=self.mode, kv_heads=self.kv_heads, init=self.init, export=self.export,
                                         pos2d=self.pos2d, num_seqs=self.num_seqs, seq_len=self.seq_len,
                                         **self._common())


class LatentKvOptions(ConvertOptions):
    """latent-kv (METHODS.md §6): kv_rank is the average latent size per layer; num_seqs/seq_len None = 40×256."""

    transform: ClassVar[str] = "latent-kv"
    kv_rank: int = Field(ge=1)
    groups: int = Field(1, ge=1)
    rank_allocation: Literal["uniform", "greedy", "kl"] = "uniform"  # greedy, kl: worse on SmolLM2 (convert.py)
    rope_pairs: Optional[int] = Field(None, ge=0)  # MHA2MLA: RoPE pairs kept per KV head beside the latent
    kl_probe_seqs: Optional[int] = Field(None, ge=1)  # kl: fitting sequences the per-layer KL is measured on (None: 4)
    fit: Literal["kv", "attention"] = "kv"  # the latent fitted to K and V, or weighted by attention's use of them
    key_weight: Optional[float] = Field(None, ge=0)  # fit attention: λ, key errors against value errors (None: 0.3)

    def _library(self):
        from qkvconv.convert import latent_kv_checkpoint

        return latent_kv_checkpoint, dict(kv_rank=self.kv_rank, groups=self.groups,
                                          rank_allocation=self.rank_allocation, rope_pairs=self.rope_pairs,
                                          kl_probe_seqs=self.kl_probe_seqs, fit=self.fit,
                                          key_weight=self.key_weight, num_seqs=self.num_seqs,
                                          seq_len=self.seq_len, **self._common())


class AttachQueryMlpOptions(ConvertOptions):
    """attach-query-mlp (METHODS.md §2)."""

    transform: ClassVar[str] = "attach-query-mlp"
    rank: Optional[int] = Field(None, ge=1)
    act: str = "gelu"  # gelu | silu | relu

    @field_validator("act")
    @classmethod
    def _act(cls, v):
        from qkvconv.transforms.attach import ACTIVATIONS

        if v not in ACTIVATIONS:
            raise ValueError(f"unknown activation {v!r}; use one of {', '.join(ACTIVATIONS)}")
        return v
    num_seqs: int = Field(4, ge=1)
    seq_len: int = Field(64, ge=1)
    atol: Optional[float] = None

    def _library(self):
        from qkvconv.convert import attach_query_mlp_checkpoint

        return attach_query_mlp_checkpoint, dict(rank=self.rank, act=self.act, num_seqs=self.num_seqs,
                                                 seq_len=self.seq_len, atol=self.atol, **self._common())


class AttachPreprojOptions(ConvertOptions):
    """attach-preproj (METHODS.md §5)."""

    transform: ClassVar[str] = "attach-preproj"
    expansion: float = Field(1.25, gt=0)
    skip: bool = True
    num_seqs: int = Field(4, ge=1)
    seq_len: int = Field(64, ge=1)
    atol: Optional[float] = None

    def _library(self):
        from qkvconv.convert import attach_preproj_checkpoint

        return attach_preproj_checkpoint, dict(expansion=self.expansion, skip=self.skip, num_seqs=self.num_seqs,
                                               seq_len=self.seq_len, atol=self.atol, **self._common())


TRANSFORMS: dict[str, type[ConvertOptions]] = {
    "absorb-query": AbsorbQueryOptions,
    "share-kv": ShareKvOptions,
    "latent-kv": LatentKvOptions,
    "attach-query-mlp": AttachQueryMlpOptions,
    "attach-preproj": AttachPreprojOptions,
}


# ------------------------------------------------------------------------------------------------ heal
class FinetuneOptions(Options):
    """finetune: everything that decides the result of a heal (qkvconv.finetune.FinetuneConfig), plus the device."""

    data: str
    eval_data: Optional[str] = None
    train: Literal["new", "attention", "all"] = "new"
    steps: Optional[int] = Field(None, ge=1)
    tokens: Optional[int] = Field(None, ge=1)
    seq_len: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_new: Optional[float] = Field(None, gt=0)  # the added modules' peak lr (default: lr)
    warmup_steps: Optional[int] = Field(None, ge=0)
    weight_decay: float = 0.0
    max_grad_norm: float = Field(1.0, ge=0)  # 0: off
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_every: int = Field(50, ge=0)
    eval_seqs: int = Field(16, ge=1)
    save_every: int = Field(100, ge=0)
    seed: int = 0
    distill: float = Field(0.0, ge=0, le=1)
    teacher: Optional[str] = None
    eval_kl: bool = False
    hf_split: str = "train"
    lora: Optional[int] = Field(None, ge=1)
    lora_alpha: Optional[float] = Field(None, gt=0)
    gradient_checkpointing: bool = False
    stream: bool = False
    shuffle_buffer: int = Field(256, ge=1)
    device: str = "auto"

    def config(self, **override):
        """The library's FinetuneConfig for these options (`override`: fields replaced, e.g. resolved paths)."""
        from qkvconv.finetune import FinetuneConfig

        fields = self.model_dump(exclude={"device"}) | override
        fields["max_grad_norm"] = fields["max_grad_norm"] or None
        return FinetuneConfig(**fields)


# ------------------------------------------------------------------------------------------------ eval
class EvalOptions(Options):
    """eval: lm-eval tasks, limits, batch size, dtype and seed (deltas of a table are against its first model)."""

    tasks: list[str] = ["lambada_openai"]
    limit: Optional[int] = Field(None, ge=1)
    task_limits: dict[str, int] = {}
    batch_size: int = Field(16, ge=1)
    device: Optional[str] = None
    include_path: list[str] = []
    data_dir: Optional[str] = None
    dtype: Literal[DTYPES] = "float32"  # type: ignore[valid-type]
    seed: int = 1234

    @field_validator("tasks", mode="before")
    @classmethod
    def _split(cls, v):
        """"a,b" or ["a", "b,c"] → ["a", "b", "c"]."""
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list):
            return v
        return [t.strip() for x in items for t in (str(x).split(",") if isinstance(x, str) else [x]) if str(t).strip()]

    @field_validator("task_limits", mode="before")
    @classmethod
    def _pairs(cls, v):
        """TASK=N strings (the CLI's repeatable --task-limit) or a mapping."""
        if isinstance(v, list):
            out = {}
            for item in v:
                task, sep, n = str(item).partition("=")
                if not sep or not task.strip():
                    raise ValueError(f"task limit {item!r} must be TASK=N")
                out[task.strip()] = n.strip()
            return out
        return v

    @field_validator("task_limits")
    @classmethod
    def _positive(cls, v):
        for task, n in v.items():
            if n < 1:
                raise ValueError(f"the limit of {task} must be positive, not {n}")
        return v

    def resolve(self):
        """resolve_tasks for these options: (task manager, task names); reusable across evaluate calls."""
        from qkvconv.evaluate import resolve_tasks

        return resolve_tasks(self.tasks, self._data_dir(), [Path(p) for p in self.include_path])

    def _data_dir(self) -> Path | None:
        from qkvconv.evaluate import default_data_dir

        return Path(self.data_dir).expanduser() if self.data_dir else default_data_dir()

    def evaluate(self, entries, *, output: Path | None = None, console=None, log_samples: bool = False,
                 resolved=None):
        """qkvconv.evaluate.evaluate_models on `entries` with these options."""
        from qkvconv.evaluate import evaluate_models

        return evaluate_models(
            entries, tasks=self.tasks, limit=self.limit, batch_size=self.batch_size, device=self.device,
            data_dir=self._data_dir(), include_path=[Path(p) for p in self.include_path], output=output,
            seed=self.seed, console=console, task_limits=self.task_limits, log_samples=log_samples,
            resolved=resolved,
        )


def format_validation_error(e, *, names: Callable[[tuple], str] | None = None) -> str:
    """A pydantic ValidationError as one line per error: `field: message` (unknown keys: `field: unknown key`)."""
    lines = []
    for err in e.errors():
        where = (names or dotted)(tuple(err["loc"]))
        lines.append(f"{where}: {error_message(err)}" if where else error_message(err))
    return "; ".join(lines)


def error_message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key missing"
    return err["msg"].removeprefix("Value error, ")


def dotted(loc: tuple) -> str:
    """('variants', 1, 'steps', 0, 'share-kv', 'kv_head') → variants[1].steps[0].share-kv.kv_head"""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
