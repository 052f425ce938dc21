"""How `finetune` runs: the accelerate engine, sharding, whole state dicts, LoRA, throughput.

One loop serves one CPU, one GPU, DDP and FSDP: `accelerate.Accelerator` sets up the processes, the device, bf16
autocast (fp32 master weights) and wraps the model (DDP, or FSDP / DeepSpeed per the user's `accelerate launch`
config). accelerate does not shard on CPUs (it falls back to DDP there), so when a launch asks for FSDP
(ACCELERATE_USE_FSDP, what `accelerate launch --use_fsdp` sets) on CPU processes, `shard` applies torch's own
FSDP2 (`fully_shard`, one unit per decoder layer + the root, accelerate's TRANSFORMER_BASED_WRAP); the frozen teacher
of --distill is sharded the same way under any FSDP.

State dicts go through torch.distributed.checkpoint.state_dict, which reads and writes plain, DDP, FSDP1 and FSDP2
modules alike, keyed by the parameters' own names: one resume format (qkvconv's state.pt) for every strategy.

LoRA (Hu et al. 2021, W' = W + (α/r)·B·A) comes from PEFT; MFU = 6·N·tokens/s / peak FLOP/s (Kaplan et al. 2020,
6 FLOPs per parameter per token for forward + backward), with peak FLOP/s from a small table of device names.
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext

import torch

from qkvconv.errors import QkvconvError

# dense peak FLOP/s by device-name substring (first match): bf16 tensor cores, fp32 (no TF32) — vendor data sheets
PEAK_FLOPS = [
    ("H200", 989e12, 67e12), ("H100 PCIe", 756e12, 51e12), ("H100", 989e12, 67e12), ("GH200", 989e12, 67e12),
    ("B200", 2250e12, 80e12), ("A100", 312e12, 19.5e12), ("A10G", 125e12, 31.2e12), ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12), ("RTX 4090", 165e12, 82.6e12), ("RTX 3090", 71e12, 35.6e12), ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
]


def make_accelerator(device: str, precision: str):
    """The Accelerator for --device auto|cpu|cuda and --precision fp32|bf16 (bf16: autocast, fp32 master weights)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if device not in ("auto", "cpu", "cuda"):
        raise QkvconvError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise QkvconvError("--device cuda: no CUDA device is available")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # one process may run several finetunes with other settings
        AcceleratorState._reset_state(reset_partial_state=True)
    # cpu: accelerate joins launched CPU processes (gloo) only when told so; without it each would run alone
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return Accelerator(cpu=cpu, mixed_precision="bf16" if precision == "bf16" else "no")


def strategy(acc) -> str:
    """single | ddp | fsdp | fsdp-cpu (torch FSDP2 applied by qkvconv) | deepspeed | the accelerate type's name."""
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.NO:
        return "single"
    if kind == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp-cpu"
    return "ddp" if kind in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU) else str(kind).split(".")[-1].lower()


def shard(module: torch.nn.Module, layers: torch.nn.ModuleList, device: torch.device) -> torch.nn.Module:
    """torch FSDP2 in place: each decoder layer one unit, the rest (embeddings, final norm, head) the root's.

    Every process first takes rank 0's weights (FSDP's sync_module_states): under an FSDP launch, transformers may
    load the checkpoint on rank 0 only and leave the other ranks freshly initialised (cpu_ram_efficient_loading;
    transformers 5.0 does, 5.24 does not), and sharding those would mix random shards into the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(t.data, src=0)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def local_parameters(model: torch.nn.Module) -> int:
    """Parameters this process holds (a DTensor shard counts its local part)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())


def checkpoint_layers(net: torch.nn.Module) -> None:
    """Gradient (activation) checkpointing of every decoder layer, HF's own: the backward recomputes each layer's
    forward (non-reentrant, RNG state restored: dropout draws the same masks)."""
    enable = getattr(net, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def no_sync(model, acc, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP); FSDP2 reduces every micro-batch."""
    return nullcontext() if last or acc.num_processes == 1 else acc.no_sync(model)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, acc, model) -> float:
    """Clip the global gradient norm (sharded gradients included); the norm before clipping."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP or acc.distributed_type == DistributedType.DEEPSPEED:
        norm = acc.clip_grad_norm_(model.parameters(), max_norm)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor (FSDP2): the norm over every shard
        norm = norm.full_tensor()
    return float(norm)


def _options(acc, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=acc.num_processes > 1, **kw)


def model_state(model, acc, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU, on the main process ({} on the others); every process must call."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_options(acc, ignore_frozen_params=trainable_only))
    return {k: v.detach().cpu().clone() for k, v in sd.items()} if acc.is_main_process else {}


def optimizer_state(model, opt, acc) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=_options(acc))


def load_states(model, opt, acc, model_sd: dict, opt_sd: dict) -> None:
    """Put saved trainable weights and optimizer state back (saved whole, loaded into any sharding)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    unexpected = set_model_state_dict(model, model_sd, options=options).unexpected_keys
    if unexpected:
        raise QkvconvError(f"--resume: the saved state has weights this model lacks ({sorted(unexpected)[:3]} ...)")
    set_optimizer_state_dict(model, opt, opt_sd, options=options)


# ------------------------------------------------------------------------------------------------- LoRA
def lora_targets(net: torch.nn.Module, selected: set[str]) -> list[str]:
    """Names of the Linear / Conv1D modules whose weight `--train` selected (the output head excluded): LoRA's targets."""
    from transformers.pytorch_utils import Conv1D

    head = net.get_output_embeddings()
    return [name for name, m in net.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head and f"{name}.weight" in selected]


def trained_beside_lora(net: torch.nn.Module, selected: set[str], targets: list[str]) -> list[torch.nn.Parameter]:
    """The selected parameters LoRA leaves fully trainable: the small ones outside the adapted projections (norm gains,
    biases, pos2d terms); never the embeddings or the output head (vocabulary-sized: what LoRA is there to spare)."""
    adapted = {f"{t}.weight" for t in targets}
    big = {id(p) for m in (net.get_input_embeddings(), net.get_output_embeddings()) if m is not None
           for p in m.parameters()}
    return [p for n, p in net.named_parameters() if n in selected and n not in adapted and id(p) not in big]


def lora_config(rank: int, alpha: float | None, targets: list[str]):
    from peft import LoraConfig

    if not targets:
        raise QkvconvError("--lora: the --train selection holds no linear projection to adapt")
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0, bias="none",
                      target_modules=targets)


def _peft_model(net: torch.nn.Module, config):
    """peft.get_peft_model, without the FutureWarning that peft ≤ 0.21 triggers by reading transformers' deprecated
    `is_gradient_checkpointing` (transformers ≥ 5.2x): a stray line through the progress display otherwise."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(net, config)


def add_lora(net: torch.nn.Module, config, keep_trainable: list[torch.nn.Parameter]):
    """PEFT's LoRA model around `net` (adapters zero-started: B = 0, so the model is unchanged at step 0); the
    selected parameters outside the adapted projections (norms, pos2d terms, ...) stay fully trainable."""
    model = _peft_model(net, config)
    for p in keep_trainable:
        p.requires_grad_(True)
    return model


def merge_lora(base: torch.nn.Module, config, adapted_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W + (α/r)·B·A folded into each adapted projection: a normal checkpoint's state dict (PEFT's merge_and_unload)."""
    model = _peft_model(base, config)
    missing, unexpected = model.load_state_dict(adapted_state, strict=False)
    if unexpected or missing:
        raise QkvconvError(f"LoRA merge: the adapted state does not fit the model ({(missing + unexpected)[:3]} ...)")
    return model.merge_and_unload().state_dict()


# ------------------------------------------------------------------------------------------- throughput
def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of a CUDA device from PEAK_FLOPS (None on a CPU or an unlisted device)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bf16, fp32 in PEAK_FLOPS:
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def mfu(n_params: int, tokens_per_s: float, flops: float | None, processes: int) -> float | None:
    """Model FLOPs utilisation: 6·N·tokens/s over the peak of every device of the run."""
    return None if not flops else 6 * n_params * tokens_per_s / (flops * processes)


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """Peak GPU memory allocated (bytes; None on a CPU) and the process's peak resident memory."""
    import sys

    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = rss if sys.platform == "darwin" else rss * 1024
    except ImportError:  # Windows
        rss = None
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_gpu_bytes": gpu, "peak_rss_bytes": rss}
