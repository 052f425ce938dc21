"""The streaming driver: convert a checkpoint one decoder layer at a time, disk to disk, and verify it on the way.

Memory holds one layer of the input (its float64 working copy and its converted tensors), the embedding rows and
the LM head the calibration tokens need, and the calibration hidden states, never the model:

    for each layer i:   read layer i (safe_open, tensor by tensor; each checked against what config.json implies
                        and for NaN/Inf) → run the original layer i on the original stream of hidden states
                        (capturing its attention inputs for calibrated transforms) → transform (float64) → one
                        cast → write each tensor to the output shard as it comes → run the converted layer i on
                        the converted stream
    at the end:         final norm + LM head (streamed over the vocabulary) on both streams → LogitError (and
                        Exactness, for exact transforms: float64 and output-dtype streams side by side)

A layer runs as the model's own module (the skeleton is built on the meta device and one layer at a time is given
real weights), fed the hidden states and the keyword arguments the model itself passes its layers (captured from
the model's forward), so no family's attention code is re-implemented here. A checkpoint that is not sharded
safetensors (GGUF, a hub id, pickled .bin) is loaded into memory first and streamed from there: the same driver.

Like mergekit's lazy loader + tensor writer and llm-compressor's sequential calibration pipeline.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import json
import os
import shutil
import signal
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from qkvconv.archs import ArchSpec, Dims, dims_of, spec_for
from qkvconv.errors import CheckpointError, TransformError, first_line
from qkvconv.modeling.modeling_qkvconv import _set_module

# ------------------------------------------------------------------------------------------ reading
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class TensorSource:
    """Named tensors of a checkpoint, read one at a time. Subclasses: SafetensorsSource (lazy), StateDictSource."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def take_rows(self, key: str, index: list[int]) -> torch.Tensor:
        """Rows `index` of a 2-D tensor (the embedding rows the calibration tokens use)."""
        return self.get(key)[index]

    def nbytes(self, key: str) -> int:
        n = 1
        for s in self.shape(key):
            n *= s
        return n * (torch.finfo(self.dtype(key)).bits // 8 if self.dtype(key).is_floating_point else
                    torch.iinfo(self.dtype(key)).bits // 8)

    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self.keys())

    def close(self) -> None:
        pass


class SafetensorsSource(TensorSource):
    """The *.safetensors files of an HF directory (one file or an index of shards), read with safe_open.

    Each read opens its shard afresh: a tensor's memory map lives as long as the tensor, so the input's pages
    leave the process with the layer that used them (a handle kept open maps the whole file for the whole run)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        self._where: dict[str, str] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for f in files:
            with safe_open(str(path / f), framework="pt") as h:
                for k in h.keys():
                    if k in self._where:
                        raise CheckpointError(f"{path}: tensor {k} is stored twice ({self._where[k]} and {f})")
                    self._where[k] = f
                    s = h.get_slice(k)
                    self._meta[k] = (tuple(s.get_shape()), _ST_DTYPES.get(s.get_dtype(), torch.float32))

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def _open(self, key: str):
        from safetensors import safe_open

        return safe_open(str(self.path / self._where[key]), framework="pt")

    def get(self, key: str) -> torch.Tensor:
        with self._open(key) as h:
            return h.get_tensor(key)

    def take_rows(self, key: str, index: list[int]) -> torch.Tensor:
        with self._open(key) as h:
            s = h.get_slice(key)
            return torch.stack([s[i : i + 1][0] for i in index])


class RenamedSource(TensorSource):
    """`source` with some keys under other names: {name here: name in the files}. transformers 5 renames a few
    legacy checkpoint names on load (GPT-NeoX's embed_out → lm_head); qkvconv streams under the module's names."""

    def __init__(self, source: TensorSource, aliases: dict[str, str]):
        self.inner, self.aliases = source, aliases
        back = {v: k for k, v in aliases.items()}
        self._keys = [back.get(k, k) for k in source.keys()]

    def keys(self) -> list[str]:
        return self._keys

    def _k(self, key: str) -> str:
        return self.aliases.get(key, key)

    def shape(self, key):
        return self.inner.shape(self._k(key))

    def dtype(self, key):
        return self.inner.dtype(self._k(key))

    def get(self, key):
        return self.inner.get(self._k(key))

    def take_rows(self, key, index):
        return self.inner.take_rows(self._k(key), index)


class MappedSource(TensorSource):
    """`source` as transformers 5 loads it into `model`: by its weight conversion mapping (conversion_mapping.py),
    which renames keys and merges the per-expert tensors of MoE checkpoints into the stacked parameters the modules
    have. The merge runs transformers' own operations (compat.LoadMapping), on the meta device for shapes and on one
    parameter's tensors when it is read. Before / after, for E experts of hidden size d and intermediate size I:

        Mixtral (hub), in model.layers.{i}.:
          block_sparse_moe.gate.weight                   (E, d)  -> mlp.gate.weight
          block_sparse_moe.experts.{e}.w1.weight (gate)  (I, d)  +
          block_sparse_moe.experts.{e}.w3.weight (up)    (I, d)  -> mlp.experts.gate_up_proj  (E, 2I, d)
          block_sparse_moe.experts.{e}.w2.weight (down)  (d, I)  -> mlp.experts.down_proj     (E, d, I)
        Qwen2-MoE, Qwen3-MoE:
          mlp.experts.{e}.gate_proj.weight, up_proj.weight (I, d) -> mlp.experts.gate_up_proj (E, 2I, d)
          mlp.experts.{e}.down_proj.weight                  (d, I) -> mlp.experts.down_proj    (E, d, I)

    gate_up_proj[e] = cat(gate_e, up_e) along the rows; experts in natural order (10 after 9). Keys the mapping does
    not place in the model keep their own names (check_against_config names them)."""

    def __init__(self, source: TensorSource, model: nn.Module):
        from qkvconv.compat import LoadMapping

        self.inner, self.mapping = source, LoadMapping(model)
        meta = model.state_dict()
        self._members: dict[str, list[tuple[str, str | None]]] = {}  # name here -> [(key in the files, pattern)]
        for k in self.mapping.order(source.keys()):
            new, pattern = self.mapping.rename(k, meta)
            self._members.setdefault(new, []).append((k, pattern))
        first = {m[0][0]: n for n, m in self._members.items()}
        self._keys = [first[k] for k in source.keys() if k in first]  # the files' order
        self._meta = {n: self._meta_of(n) for n, m in self._members.items() if m[0][1] is not None}

    def _meta_of(self, key: str) -> torch.Tensor:
        try:
            return self._read(key, lambda k: torch.empty(self.inner.shape(k), dtype=self.inner.dtype(k), device="meta"))
        except (RuntimeError, ValueError, IndexError) as e:
            n = len(self._members[key])
            raise CheckpointError(f"{self._members[key][0][0]} and the other {n - 1} tensors that make {key} do not "
                                  f"stack ({first_line(e)}); is an expert's tensor missing?") from None

    @property
    def changes_names(self) -> bool:
        return any(len(m) > 1 or m[0][0] != n for n, m in self._members.items())

    def _read(self, key: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        members = self._members[key]
        if members[0][1] is None:  # renamed (or not) only
            return read(members[0][0])
        return self.mapping.convert(key, [(k, p, lambda k=k: read(k)) for k, p in members])

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key):
        return tuple(self._meta[key].shape) if key in self._meta else self.inner.shape(self._members[key][0][0])

    def dtype(self, key):
        return self._meta[key].dtype if key in self._meta else self.inner.dtype(self._members[key][0][0])

    def get(self, key):
        return self._read(key, self.inner.get)

    def take_rows(self, key, index):
        if key in self._meta:
            return self.get(key)[index]
        return self.inner.take_rows(self._members[key][0][0], index)


def module_names(source: TensorSource, model: nn.Module, spec: ArchSpec) -> TensorSource:
    """`source` under the names `model`'s modules have: as transformers' own load maps the files' keys (MappedSource:
    per-expert MoE tensors stacked), and where the files use a legacy name for the output embedding (the spec's
    output_embedding) that the model's module no longer has."""
    mapped = MappedSource(source, model)
    if mapped.changes_names:
        source = mapped
    key = output_embedding_key(model)
    have = set(source.keys())
    if key and key not in have and spec.output_embedding in have and key != spec.output_embedding:
        return RenamedSource(source, {key: spec.output_embedding})
    return source


def output_embedding_key(model: nn.Module) -> str | None:
    """The state-dict key of `model`'s output embedding (LM head) weight, by its own module name."""
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    return f"{name}.weight" if name else None


class StateDictSource(TensorSource):
    """An in-memory state dict (a GGUF dequantized by transformers, a hub or pickled checkpoint) as a source."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.sd = state_dict

    def keys(self) -> list[str]:
        return list(self.sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.sd[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.sd[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self.sd[key]


ALGEBRA_TOKENS = 32  # leading tokens of the first verified sequence that the float64 pair of an exact conversion
# runs on: causal attention makes a prefix's logits those of the whole sequence at the same positions
_FINITE_CHUNK = 1 << 22  # elements per sum in check_finite


def _all_finite(t: torch.Tensor, release: bool = False) -> bool:
    """No NaN/Inf in `t`, without a tensor-sized temporary: a NaN or Inf makes a sum non-finite, so a finite sum of
    each chunk proves it clean; a non-finite one (also an overflow of finite values) is checked element-wise.
    release: unmap each checked chunk's pages where `t` lies in a safetensors file mapping (release_file_pages)."""
    flat = t.reshape(-1)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    release = release and flat.data_ptr() == t.data_ptr() and _in_file_mapping(t)
    for s in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[s : s + _FINITE_CHUNK]
        if not bool(torch.isfinite(chunk.sum(dtype=acc))) and not bool(torch.isfinite(chunk).all()):
            return False
        if release:
            release_file_pages(chunk)
    return True


_MADV_DONTNEED = 4  # sys/mman.h (Linux)


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """The whole pages inside t's bytes (t contiguous): [first page start, last page end), empty when none."""
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return -(-start // page) * page, end // page * page


def _in_file_mapping(t: torch.Tensor) -> bool:
    """Whether t's bytes lie in one mapping of a *.safetensors file (/proc/self/maps), so that dropping its pages
    loses nothing: they are the file's. Anonymous memory (a dequantized or stacked tensor) is never released: there
    MADV_DONTNEED would zero it. False without /proc or for a non-contiguous tensor."""
    lo, hi = _byte_range(t) if t.device.type == "cpu" and t.is_contiguous() else (0, 0)
    if hi <= lo:  # nothing to release (or not a contiguous CPU tensor): /proc/self/maps is not read
        return False
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= start and end <= hi:
                    return len(fields) == 6 and fields[4] != "0" and fields[5].rstrip().endswith(".safetensors")
    except OSError:
        return False
    return False


def release_file_pages(t: torch.Tensor) -> None:
    """Unmap the resident pages of t, a contiguous tensor in a safetensors file mapping that nothing has written to
    (madvise MADV_DONTNEED): the pages stay in the page cache and the next read maps them again (minor faults, no
    disk read), but until then they are not this process's RSS. The layer read ahead (by the reader thread, while
    the layer before it is converted) is held that way instead of resident."""
    lib = _glibc()
    lo, hi = _byte_range(t)
    if lib is not None and hi > lo:
        import ctypes

        lib.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def check_finite(key: str, t: torch.Tensor, release: bool = False) -> torch.Tensor:
    """Refuse a NaN or Inf weight, naming the tensor (nothing is written). release: leave t's pages unmapped once
    checked where t is read from a safetensors file (see release_file_pages)."""
    if t.is_floating_point() and not _all_finite(t, release):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{key} holds {bad} NaN/Inf value{'s' if bad > 1 else ''} of {t.numel()}; "
                              "the checkpoint is corrupt (re-download or re-export it); nothing written")
    return t


# ------------------------------------------------------------------------------------ model skeletons
def model_class(config):
    """The class a checkpoint with `config` loads as: qkvconv's own for a converted checkpoint, else the stock one."""
    from transformers import AutoModelForCausalLM

    from qkvconv.checkpoint import qkvconv_block

    block = qkvconv_block(config)
    if block:
        from qkvconv.modeling import modeling_qkvconv

        return getattr(modeling_qkvconv, f"Qkvconv{block['base_class']}")
    return AutoModelForCausalLM._model_mapping[type(config)]


def skeleton(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model on the meta device (parameters only: buffers such as RoPE tables are real), in eval mode."""
    from accelerate import init_empty_weights

    from qkvconv.compat import no_init_weights

    config = copy.deepcopy(config)
    config.dtype = dtype
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = model_class(config)(config)
    if dtype == torch.float64 and getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        model.config._experts_implementation = "eager"  # MoE experts: grouped_mm has no float64 kernel
    _set_buffers_dtype(model, dtype)  # RoPE tables, compute-dtype markers follow the compute dtype
    return model.eval()


def expected_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor `model`'s config implies, with its shape (`model` built on the meta device: skeleton); the
    output embedding is left out when the config ties it to the input embedding."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = output_embedding_key(model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == head)}


def check_against_config(source: TensorSource, model: nn.Module, spec: ArchSpec, where: str) -> None:
    """Every tensor the config of `model` (a skeleton) implies exists with the shape it implies, and no tensor is
    left unexplained."""
    config = model.config
    expected = expected_tensors(model)
    have = set(source.keys())
    missing = [k for k in expected if k not in have]
    if missing:
        layers = getattr(config, "num_hidden_layers", "?")
        raise CheckpointError(
            f"{where}: config.json implies {len(missing)} tensor{'s' if len(missing) > 1 else ''} that no weight file "
            f"holds, e.g. {missing[0]} of shape {list(expected[missing[0]])} (config says {layers} layers); config "
            "and weights disagree: fix config.json or re-export the checkpoint"
        )
    for k, shape in expected.items():
        got = source.shape(k)
        if got != shape:
            dims = [f"dimension {d}: {a} in the weights, {b} in config.json" for d, (a, b) in
                    enumerate(zip(got, shape)) if a != b] or [f"rank {len(got)} in the weights, {len(shape)} in config.json"]
            raise CheckpointError(f"{where}: {k} has shape {list(got)}, config.json implies {list(shape)} "
                                  f"({dims[0]}); config and weights disagree")
    tied = getattr(config, "tie_word_embeddings", False)
    extra = sorted(have - set(expected) - ({output_embedding_key(model), spec.output_embedding} if tied else set()))
    if extra:
        raise CheckpointError(
            f"{where}: {len(extra)} tensor{'s' if len(extra) > 1 else ''} that config.json does not explain, e.g. "
            f"{extra[0]}; refusing to drop weights silently (is num_hidden_layers or the architecture wrong?)"
        )


def folded_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """State-dict key -> dtype of every parameter a converted model keeps at its own precision (keep_folded)."""
    out = {}
    for name, module in model.named_modules():
        if getattr(module, "_qkvconv_folded", None) is not None:
            for p, _ in module.named_parameters(recurse=False):
                out[f"{name}.{p}" if name else p] = module._qkvconv_folded
    return out


def _params_only(module: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    for m in module.modules():
        for name in list(m._parameters):
            if m._parameters[name] is not None:
                yield m, name


def materialize(module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
    """Give `module` (meta parameters) real ones from `tensors` (keys relative to it): each keeps its own dtype
    (folded maps stay at theirs), on `device`; a missing or unexpected tensor is an internal error."""
    missing, unexpected = module.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False,
                                                 assign=True)
    left = [n for n in missing if _is_param(module, n)]
    if left or unexpected:
        raise TransformError(f"internal: layer tensors do not fit the module (missing {left[:3]}, "
                             f"unexpected {unexpected[:3]})")
    for p in module.parameters():
        p.requires_grad_(False)


def _is_param(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    m = module.get_submodule(owner) if owner else module
    return leaf in m._parameters


def release(module: nn.Module) -> None:
    """Put `module`'s parameters back on the meta device (frees their memory; buffers stay)."""
    for m, name in _params_only(module):
        p = m._parameters[name]
        m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)


def _glibc():
    """glibc as a ctypes library, or None (macOS, musl, Windows: the heap helpers below do nothing there)."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _libc = False
    return _libc or None


_libc = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024


def return_freed_memory() -> None:
    """Give the heap's freed pages back to the OS (glibc malloc_trim; a no-op elsewhere)."""
    if lib := _glibc():
        lib.malloc_trim(0)


def _anonymous_bytes() -> int | None:
    """This process's resident anonymous memory (/proc/self/statm: resident − file-backed), None without /proc."""
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
    except OSError:
        return None
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


HEAP_SLACK_BYTES = 128 << 20  # at least; a layer of the checkpoint when that is larger (see layer_heap)


class HeapTrimmer:
    """Called between layers: gives the heap's freed pages back to the OS once anonymous memory has grown more than
    `slack` bytes past what the last trim left. A layer's temporaries land on the heap (see heap_for_temporaries) and
    fragment it: with no trim at all RssAnon grew by ~360 MB over the 44 layers of a 4 GiB bf16 LLaMA. A trim after
    every layer kept it flat but gave back pages the next layer at once faulted in and zeroed again: absorb-query
    --no-verify there spent 9.3 s of system time on it (2.9 s with a 256 MiB slack: 34.0 -> 30.1 s wall, writing
    nothing). Without /proc it trims after every layer."""

    def __init__(self, slack: int = HEAP_SLACK_BYTES, phases: bool = True):
        self.slack, self.phases = slack, phases
        self.floor = _anonymous_bytes()

    def layer_done(self) -> None:
        now = _anonymous_bytes()
        if now is None or self.floor is None or now > self.floor + self.slack:
            return_freed_memory()
            self.floor = _anonymous_bytes()

    def phase_done(self) -> None:
        """Within a layer (trim_heap): the same check, where `phases` (a pass over large layers, see layer_heap)."""
        if self.phases:
            self.layer_done()


LARGE_TEMPORARY_BYTES = 8 << 20  # in a pass over large layers, temporaries this large are mapped (see layer_heap)
MAPPED_PASS_SLACK_BYTES = 32 << 20  # ... and the heap, which then holds only smaller ones, is trimmed past this slack
PHASE_TRIM_LAYER_BYTES = 64 << 20  # layers of at least this many bytes in the checkpoint are also trimmed within


_pass_heap: HeapTrimmer | None = None  # the trimmer of the streamed pass under way (layer_heap), for trim_heap


def layer_heap(plan: "Plan") -> HeapTrimmer:
    """The trimmer of a pass over `plan`'s layers: a slack of one layer's bytes in the checkpoint, at least
    HEAP_SLACK_BYTES (on the 4 GiB benchmark 256 MiB put peak RSS at 26-27 % of the checkpoint, over the 25 % goal;
    128 MiB at 24-25 %, for ~5 s more of its ~45 s). It is also the one trim_heap uses until the pass ends, there
    only for layers of PHASE_TRIM_LAYER_BYTES or more: a trim and the re-faulting of what the next phase reuses cost
    ~50 ms, and at SmolLM2's size (14 MB layers) trims at every phase made share-kv calibrated 52-54 s -> 55-58 s;
    a 2048-wide layer's float64 copies and calibration activations are hundreds of MB.

    The heap is trimmed once first: what opening the checkpoint, the calibration text and the streams' set-up
    freed would otherwise stay under the pass and raise the floor its slack counts from (on the benchmark's 3-layer
    slice, 578 MiB of RssAnon at the first layer with 3 MiB of live tensors, where the imported libraries take ~0.31
    GiB). Over layers of PHASE_TRIM_LAYER_BYTES or more, temporaries of LARGE_TEMPORARY_BYTES or more are mapped for
    themselves again (glibc's mmap threshold, which heap_for_temporaries raised), so their pages go back the moment
    they are freed: a float64 copy of a 2048 × 5632 projection is 92 MB, a fit's chunk of attention outputs 26-52 MB.
    The heap then holds only the smaller temporaries, and its slack is MAPPED_PASS_SLACK_BYTES: on the 3-layer slice,
    share-kv --init calibrated peaked at 1.19 GiB of RssAnon with a 24 MiB slack, 1.26-1.43 GiB with 128 MiB (the
    slack of smaller layers)."""
    global _pass_heap
    layer = sum(plan.tensors.nbytes(k) for k in plan.layer_keys(0))
    return_freed_memory()
    large = layer >= PHASE_TRIM_LAYER_BYTES
    if large and (lib := _glibc()):
        lib.mallopt(_M_MMAP_THRESHOLD, LARGE_TEMPORARY_BYTES)
    _pass_heap = HeapTrimmer(MAPPED_PASS_SLACK_BYTES if large else max(HEAP_SLACK_BYTES, layer), phases=large)
    return _pass_heap


def trim_heap() -> None:
    """Between the phases of one layer's transform (a calibrated fit's activations, its normal equations, their
    solve): the same trim as between layers, on the pass's own slack. Where a phase's temporaries are spent, their
    pages would otherwise stay in the heap under the next phase's: on the 4 GiB benchmark's share-kv --init
    calibrated, a trim at the first solve gave back 0.55 GiB of a 1.50 GiB RssAnon. Only in a pass over large
    layers (layer_heap). A no-op outside a pass."""
    if _pass_heap is not None:
        _pass_heap.phase_done()


@contextlib.contextmanager
def heap_for_temporaries():
    """Within a layer, large temporaries (the fits' (candidates, tokens, features) blocks: 50-100 MB) reuse heap
    pages instead of fresh mmaps, each of which the kernel faults in and zeroes page by page: 28 of 171 CPU seconds
    of SmolLM2's share-kv k=v calibrated fit were that (system time 28.1 s -> 4.9 s with this, same user time).
    HeapTrimmer between layers still gives the pages back, so peak memory stays about one layer's worth; a pass over
    large layers maps its largest temporaries again (layer_heap). glibc only; the defaults (128 KiB, glibc's dynamic
    threshold's start) are set back on exit."""
    lib = _glibc()
    if lib:
        lib.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        lib.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        global _pass_heap
        _pass_heap = None
        if lib:
            lib.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
            lib.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
            lib.malloc_trim(0)


def _set_buffers_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point() and not name.startswith("inv_freq"):
                m._buffers[name] = b.to(dtype)


# ----------------------------------------------------------------------------------- running layers
class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0: records what the model passes its layers, then stops the forward."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)
        self.seen: tuple | None = None

    def forward(self, hidden, *args, **kwargs):
        self.seen = (hidden, args, kwargs)
        raise _Stop


class _Inject(nn.Module):
    """Stands in for the whole layer stack: returns the given final hidden states, so the model's own tail
    (final norm, LM head, softcapping) computes the logits."""

    def __init__(self, layer: nn.Module, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, hidden, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden  # the real layers' output type


class _LazyHead(nn.Module):
    """The LM head computed over the vocabulary in chunks from a weight kept in the checkpoint's dtype, so a
    float64 stream never holds a float64 copy of the (vocab, d) matrix."""

    CHUNK_BYTES = 32 << 20  # a chunk of the weight as it is multiplied: in the stream's dtype, or in float32 where a
    # half-precision stream computes in float32 (a float64 copy: 2048 rows at d 2048; sized on the bf16 weight, a
    # float32 copy was 64 MiB and set the peak of the 4 GiB benchmark's 3-layer slice, 0.88 GiB of RssAnon)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.w, self.b, self.dtype = weight, bias, dtype
        self.mapped = _in_file_mapping(weight)  # read from the checkpoint's file: its pages are let go chunk by chunk
        self.float32 = dtype in HALF_DTYPES and weight.device.type == "cpu" and slow_half_matmul(dtype)
        itemsize = 4 if self.float32 else torch.finfo(dtype).bits // 8
        self.chunk = max(1, self.CHUNK_BYTES // (weight.shape[1] * itemsize))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        out = x.new_empty(*x.shape[:-1], self.w.shape[0])  # filled chunk by chunk: no list of parts to concatenate
        xm = x.float() if self.float32 else x  # the same products, summed in float32, rounded once (copy_)
        for s in range(0, self.w.shape[0], self.chunk):
            part = self.w[s : s + self.chunk]
            w = part.to(device=x.device, dtype=self.dtype)
            y = out[..., s : s + len(w)]
            y.copy_(xm @ (w.float() if self.float32 else w).T)
            if self.b is not None:
                y += self.b[s : s + self.chunk].to(device=x.device, dtype=self.dtype)
            if self.mapped:  # each stream maps the head itself: resident, it would count once per stream in RSS
                release_file_pages(part)
        return out


def _real_tensors_to(model: nn.Module, device) -> None:
    """Move buffers and materialized parameters to `device`; meta parameters (layers not yet read) stay meta."""
    if str(device) == "cpu":
        return
    for m in model.modules():
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.to(device)
        for name, p in m._parameters.items():
            if p is not None and p.device.type != "meta":
                m._parameters[name] = nn.Parameter(p.data.to(device), requires_grad=False)


@contextlib.contextmanager
def cast_on_use(layer: nn.Module, dtype: torch.dtype):
    """Inside: floating parameters of `layer` not in `dtype` are cast to it only while the module that uses them
    runs. A float64 pass over a layer kept in the checkpoint's dtype then holds one module's float64 copies at a time
    (an MLP's projections one after another), not the whole layer's (a 2048-wide LLaMA layer: 92 MB in bf16, 361 MB
    in float64). The casts are exact, so the pass computes what it would with float64 weights throughout.

    A module is cast with everything under it where it may read its children's weights outside their own forward:
    qkvconv's own modules (AffineNorm reads its affine map's dtype, PreProj's hook its up-projection's) and any
    module that carries hooks (the branches qkvconv hangs on stock modules run in them). Elsewhere each module casts
    its own parameters. The cast runs before the module's other pre-hooks, and is undone after its other hooks."""
    def cast(p) -> bool:
        return p is not None and p.is_floating_point() and p.dtype != dtype

    stored: dict[nn.Module, list] = {}  # module -> (owner, name, parameter as held) while it runs

    def swap_in(module, args, whole: bool = False):
        stored[module] = [(m, n, p) for m in (module.modules() if whole else [module])
                          for n, p in m._parameters.items() if cast(p)]
        for m, n, p in stored[module]:
            m._parameters[n] = nn.Parameter(p.to(dtype), requires_grad=False)

    def swap_out(module, args, output):
        for m, n, p in stored.pop(module):
            m._parameters[n] = p

    def whole(m: nn.Module) -> bool:
        hooked = m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None)
        return m is not layer and next(m.children(), None) is not None and bool(
            hooked or type(m).__module__.startswith("qkvconv"))

    handles = []

    def visit(m: nn.Module) -> None:
        w = whole(m)
        if any(cast(p) for p in (m.parameters() if w else m._parameters.values())):
            handles.extend([m.register_forward_pre_hook(functools.partial(swap_in, whole=w), prepend=True),
                            m.register_forward_hook(swap_out)])
        if not w:
            for c in m.children():
                visit(c)

    visit(layer)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


HALF_DTYPES = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}


@functools.cache
def slow_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` (bfloat16 or float16) matrices without native instructions for it
    (AVX512-BF16 or AMX; AVX512-FP16): torch then runs a generic kernel several times slower than its float32 GEMM
    (a 1024 × 2048 × 5632 bf16 linear on a 2-core AMD EPYC with AVX2 only: 19 GFLOP/s against 128 in float32; a
    bf16 share-kv calibrated spent 255 of its 374 s there on 3 layers of the 4 GiB benchmark). Asked of oneDNN,
    which picks the kernel; where this torch cannot say, assumed slow (float32_linears is exact either way)."""
    probe = HALF_DTYPES.get(dtype)
    if probe is None:
        return False
    try:
        return not bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch without the probe
        return True


FLOAT32_WEIGHT_BYTES = 16 << 20  # float32_linears: the float32 copy of a weight is made this many bytes at a time


def _linear_in_float32(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if x.dtype != w.dtype or w.device.type != "cpu":
        return nn.Linear.forward(self, x)
    xf = x.float()
    out = x.new_empty(*x.shape[:-1], w.shape[0])
    rows = max(1, FLOAT32_WEIGHT_BYTES // (4 * w.shape[1]))  # output features at a time: no float32 copy of W whole
    for s in range(0, w.shape[0], rows):
        b = None if self.bias is None else self.bias[s : s + rows].float()
        out[..., s : s + rows] = torch.nn.functional.linear(xf, w[s : s + rows].float(), b)  # rounded once
    return out


@contextlib.contextmanager
def float32_linears(module: nn.Module, enabled: bool | None = None):
    """Inside: each plain nn.Linear under `module` whose weight is bfloat16 or float16 on the CPU computes in float32
    and rounds its output to its input's dtype once, where this CPU has no native GEMM for that dtype
    (slow_half_matmul; `enabled` forces it on or off). The result is what a half-precision GEMM computes: products
    of two bf16 (fp16) values are exact in float32, the GEMM sums them in float32 and rounds once at the end; only
    the order of the sums can differ, as it does between BLAS builds and thread counts. It costs a float32 copy of
    the input and of FLOAT32_WEIGHT_BYTES of the weight at a time while its module runs."""
    patched = []
    for m in module.modules():
        w = getattr(m, "weight", None)
        if (type(m).forward is nn.Linear.forward and isinstance(m, nn.Linear) and isinstance(w, torch.Tensor)
                and w.dtype in HALF_DTYPES and w.device.type == "cpu"
                and (slow_half_matmul(w.dtype) if enabled is None else enabled)):
            m.forward = _linear_in_float32.__get__(m)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _float64_norms(spec: ArchSpec, *modules: nn.Module):
    from qkvconv.verify import pure_float64

    return pure_float64(*modules, gain_offset=spec.norm_gain_offset)


class Stream:
    """The model's non-layer parts in one compute dtype: embeds calibration ids into the hidden states layer 0
    sees (with the keyword arguments the model passes its layers) and turns final hidden states into logits.

    The embedding holds only the rows the calibration ids use; the LM head stays in the checkpoint's dtype."""

    def __init__(self, config, spec: ArchSpec, source: TensorSource, dtype: torch.dtype, ids: torch.Tensor,
                 device, batch_size: int):
        self.spec, self.dtype, self.device, self.batch_size = spec, dtype, device, batch_size
        self.model = skeleton(config, dtype)
        self.layers = self.model.get_submodule(spec.layers)
        prefix = spec.layers + "."
        emb = self.model.get_input_embeddings()
        emb_key = next(k for k in spec.input_embeddings if k.endswith("weight"))
        self.vocab_ids, self.ids = torch.unique(ids, return_inverse=True)  # compact embedding: used rows only
        rows = source.take_rows(emb_key, [int(t) for t in self.vocab_ids])
        emb.weight = nn.Parameter(check_finite(emb_key, rows).to(device=device, dtype=dtype), requires_grad=False)
        head_key = output_embedding_key(self.model)
        tied = getattr(config, "tie_word_embeddings", False) or head_key not in source.keys()
        w_key = emb_key if tied else head_key
        head_w = check_finite(w_key, source.get(w_key), release=True)  # mapped again at the logits, at the end
        bias_key = head_key.removesuffix("weight") + "bias"
        head_b = source.get(bias_key) if bias_key in source.keys() else None
        rest = {k: check_finite(k, source.get(k)) for k in source.keys()
                if not k.startswith(prefix) and k not in (emb_key, head_key, bias_key)}
        head_path = head_key.removesuffix(".weight")
        _set_module(self.model, head_path, _LazyHead(head_w.to(device), None if head_b is None else head_b.to(device),
                                                     dtype))
        for k, v in rest.items():
            owner, _, leaf = k.rpartition(".")
            m = self.model.get_submodule(owner)
            m._parameters[leaf] = nn.Parameter(v.to(device=device, dtype=dtype), requires_grad=False)
        _real_tensors_to(self.model, device)
        self.layer0 = self.layers[0]
        self.kwargs: dict[int, tuple] = {}
        self.layer_returns_tuple = False

    def embed(self) -> torch.Tensor:
        """(n, L, d) hidden states entering layer 0, for every calibration sequence."""
        out = []
        for s in range(0, len(self.ids), self.batch_size):
            batch = self.ids[s : s + self.batch_size].to(self.device)
            hidden, args, kwargs = self._catch(batch)
            self.kwargs.setdefault(len(batch), (args, kwargs))
            out.append(hidden)
        return torch.cat(out)

    def _catch(self, batch: torch.Tensor):
        catcher = _Catcher(self.layer0)
        self.layers[0] = catcher
        try:
            with torch.no_grad(), self._f64():
                self.model(input_ids=batch, use_cache=False)
        except _Stop:
            pass
        finally:
            self.layers[0] = self.layer0
        if catcher.seen is None:
            raise TransformError("internal: the model's forward never reached its first layer")
        return catcher.seen

    def _f64(self):
        return _float64_norms(self.spec, self.model) if self.dtype == torch.float64 else contextlib.nullcontext()

    @torch.no_grad()
    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Layer `layer` (materialized in this stream's dtype; a float64 stream casts weights held in another dtype as
        each module runs, see cast_on_use) over hidden states (n, L, d), batch by batch."""
        out = None  # filled batch by batch: no list of outputs beside their concatenation
        with contextlib.ExitStack() as ctx:
            if self.dtype == torch.float64:  # weights may be held in the checkpoint's dtype: cast_on_use
                ctx.enter_context(_float64_norms(self.spec, layer))
                ctx.enter_context(cast_on_use(layer, torch.float64))
            elif self.dtype in HALF_DTYPES:
                ctx.enter_context(float32_linears(layer))
            for s in range(0, len(hidden), self.batch_size):
                h = hidden[s : s + self.batch_size]
                args, kwargs = self._kwargs_for(len(h))
                y = layer(h, *args, **kwargs)
                self.layer_returns_tuple = isinstance(y, tuple)  # transformers < 5.x: (hidden, ...)
                y = y[0] if isinstance(y, tuple) else y
                if out is None:
                    out = y.new_empty(len(hidden), *y.shape[1:])
                out[s : s + len(y)] = y
                del y
        return out if out is not None else hidden.clone()  # no rows

    def _kwargs_for(self, batch: int):
        if batch not in self.kwargs:
            _, args, kwargs = self._catch(self.ids[:batch].to(self.device))
            self.kwargs[batch] = (args, kwargs)
        return self.kwargs[batch]

    @torch.no_grad()
    def logits(self, *hidden: torch.Tensor, seq: int) -> torch.Tensor:
        """Logits (k, L, vocab) of calibration sequence `seq` from k versions of its final hidden states (L, d) (the
        original's and the converted model's: one pass over the LM head, whose chunks a float64 stream converts)."""
        stack = self.model.get_submodule(self.spec.layers)
        parent, _, name = self.spec.layers.rpartition(".")
        owner = self.model.get_submodule(parent) if parent else self.model
        setattr(owner, name, nn.ModuleList([_Inject(self.layer0, torch.stack(hidden), self.layer_returns_tuple)]))
        try:
            with self._f64():
                ids = self.ids[seq : seq + 1].to(self.device).expand(len(hidden), -1)
                return self.model(input_ids=ids, use_cache=False).logits
        finally:
            setattr(owner, name, stack)


# ------------------------------------------------------------------------------------------ writing
_HEADER_BYTES = (1 << 16) - 8  # header room reserved at the start of each shard (a shard closes early when it is
# full): with the 8-byte length in front, the tensor data starts 64 KiB in, on a block boundary
_BLOCK = 4096  # O_DIRECT alignment of buffer address, length and file offset (any logical block size up to 4 KiB)
_STAGE_BYTES = 8 << 20  # the direct writer's staging buffer: the disk gets writes of this size (RSS: a shared
# mapping; 32 MiB wrote no faster: dd oflag=direct of 2 GiB took 3.9-4.0 s at 32 or 8 MiB a write, 2-core EPYC)
_RELEASE_CHUNK = 16 << 20  # bytes of an input tensor written before its pages are released (release_file_pages)


class _BufferedShardFile:
    """One shard written through the page cache (the fallback, and the choice when the file is read back soon)."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self._f.write(b"\0" * (8 + _HEADER_BYTES))

    def write(self, data: memoryview) -> None:
        self._f.write(data)

    def close(self, header: bytes) -> None:
        self._f.seek(0)
        self._f.write(header)
        self._f.flush()
        os.fsync(self._f.fileno())
        self.abort()

    def abort(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None
            f.close()


class _DirectShardFile:
    """One shard written around the page cache (O_DIRECT): the bytes are gathered in a page-aligned staging buffer and
    written in large aligned blocks, the unaligned tail and the header through an ordinary descriptor at close.

    A buffered write of a large file costs the CPU a copy into the page cache and the kernel's writeback of it (dd of
    4 GiB on the 2-core benchmark machine: 6.7-9.1 s of system time, 12-14 s with fsync); a direct one costs neither
    (0.7 s of system time, 5.2 s). open() raises OSError where the file system has no O_DIRECT (tmpfs)."""

    def __init__(self, path: Path):
        import mmap

        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            self._buf = mmap.mmap(-1, _STAGE_BYTES)  # anonymous mappings are page-aligned, as O_DIRECT needs
        except BaseException:
            os.close(self._fd)
            raise
        self._view = memoryview(self._buf)
        self._fill = 0  # bytes staged
        self._pos = 0  # file offset of the staging buffer's first byte
        self.write(memoryview(bytes(8 + _HEADER_BYTES)))

    def write(self, data: memoryview) -> None:
        data = data.cast("B")
        while len(data):
            k = min(len(data), _STAGE_BYTES - self._fill)
            self._view[self._fill : self._fill + k] = data[:k]
            self._fill += k
            data = data[k:]
            if self._fill == _STAGE_BYTES:
                self._flush(_STAGE_BYTES)

    def _flush(self, n: int) -> None:
        """Write the first n (a multiple of _BLOCK) staged bytes and move the rest to the front."""
        done = 0
        while done < n:
            try:
                done += os.write(self._fd, self._view[done:n])
            except OSError as e:
                if e.errno != errno.EINVAL or not self._drop_direct():
                    raise
        self._pos += n
        rest = self._fill - n
        self._view[:rest] = self._view[n : self._fill]
        self._fill = rest

    def _drop_direct(self) -> bool:
        """A file system that opened the file with O_DIRECT but refuses a direct write (EINVAL: an alignment it needs
        beyond _BLOCK): the rest goes through the page cache. False if the flag was already off."""
        import fcntl

        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        if not flags & os.O_DIRECT:
            return False
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        return True

    def close(self, header: bytes) -> None:
        self._flush(self._fill // _BLOCK * _BLOCK)
        os.close(self._fd)
        self._fd = None
        fd = os.open(self.path, os.O_WRONLY)
        try:
            if self._fill:
                os.pwrite(fd, self._view[: self._fill], self._pos)
            os.pwrite(fd, header, 0)
            os.fsync(fd)  # the direct blocks' metadata, the tail and the header
        finally:
            os.close(fd)
        self.abort()

    def abort(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        if self._buf is not None:
            self._view.release()
            self._buf.close()
            self._buf = None


def _shard_file(path: Path, direct: bool):
    """A direct shard file where asked and the platform and file system allow it, else a buffered one."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return _DirectShardFile(path)
        except OSError:  # EINVAL: no O_DIRECT on this file system (tmpfs); the buffered file reports real errors
            with contextlib.suppress(OSError):
                path.unlink()
    return _BufferedShardFile(path)


class ShardWriter:
    """Writes tensors into sharded safetensors as they come; the shard's header is written into room reserved at its
    start when the shard closes (valid safetensors: the JSON header is padded with spaces, as safetensors itself
    pads it).

    The bytes are written, and each closed shard fsynced, by one background thread, so the disk works while the
    caller computes the next layer; at most `max_pending_bytes` of tensors wait for it (add() blocks beyond that).
    A write error surfaces at the next add() or at finish(); abort() stops the thread and closes the open file.

    direct: write around the page cache (O_DIRECT, see _DirectShardFile) where the file system allows it: for an
    output nothing reads back soon (a large model, or no decode check).

    huggingface_hub's split_torch_state_dict_into_shards and safetensors' save_file both need every tensor of a
    shard in memory at once; streaming is the point here, hence this writer."""

    def __init__(self, directory: Path, max_shard_bytes: int, max_pending_bytes: int = 128 << 20,
                 direct: bool = False):
        import queue
        import threading

        self.dir, self.max, self.max_pending, self.direct = directory, max_shard_bytes, max_pending_bytes, direct
        self.shards: list[tuple[str, list[str]]] = []
        self.total = 0
        self._entries: dict = {}
        self._header_len = 0
        self._offset = 0
        self._open_shard = False
        self._jobs: queue.Queue = queue.Queue()
        self._pending = 0  # bytes queued and not yet written
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._stopped = False
        self._f = None  # the file the worker writes (touched by the worker only, and by abort once it has stopped)
        self._thread = threading.Thread(target=self._work, name="qkvconv-shard-writer", daemon=True)
        self._thread.start()

    # ---- worker side
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, n = job
            try:
                if self._error is None and not self._stopped:
                    fn()
            except BaseException as e:  # kept for the caller (an ENOSPC becomes its one-line message upstream)
                self._error = e
            finally:
                with self._cv:
                    self._pending -= n
                    self._cv.notify_all()

    def _w_open(self, name: str) -> None:
        self._f = _shard_file(self.dir / name, self.direct)

    def _w_write(self, t: torch.Tensor) -> None:
        data = (t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)).reshape(-1)
        if not _in_file_mapping(t):
            self._f.write(memoryview(data.numpy()))
            return
        for s in range(0, len(data), _RELEASE_CHUNK):  # an input tensor passing through: its pages leave as written
            chunk = data[s : s + _RELEASE_CHUNK]
            self._f.write(memoryview(chunk.numpy()))
            release_file_pages(chunk)

    def _w_close(self, header: bytes) -> None:
        self._f.close(struct.pack("<Q", _HEADER_BYTES) + header)  # on an error the file stays for abort() to close
        self._f = None

    # ---- caller side
    def _submit(self, fn, n: int = 0) -> None:
        with self._cv:
            while self._pending > 0 and self._pending + n > self.max_pending and self._error is None:
                self._cv.wait()
            self._pending += n
        self._raise()
        self._jobs.put((fn, n))

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _header(self, entries: dict) -> bytes:
        return json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()

    @staticmethod
    def _header_piece(key: str, entry: dict) -> int:
        """Bytes that `key: entry` adds to _header(): a comma and the pair (the header's length is kept as a running
        sum; encoding the whole header for every tensor was quadratic in the tensors of a shard)."""
        return len(json.dumps({key: entry}, separators=(",", ":")).encode()) - 1

    def add(self, key: str, t: torch.Tensor) -> None:
        try:
            self._add(key, t)
        except BaseException:
            self.abort()
            raise

    def _add(self, key: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        entry = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [self._offset, self._offset + n]}
        if self._open_shard and self._entries and (
            self._offset + n > self.max or self._header_len + self._header_piece(key, entry) > _HEADER_BYTES
        ):
            self._close()
        if not self._open_shard:
            self._open()
            entry["data_offsets"] = [0, n]
        if n:
            self._submit(lambda: self._w_write(t), n)
        self._entries[key] = entry
        self._header_len += self._header_piece(key, entry)
        self._offset += n
        self.total += n
        self.shards[-1][1].append(key)

    def _open(self) -> None:
        name = f"shard-{len(self.shards) + 1:05d}.tmp"
        self._submit(lambda: self._w_open(name))
        self._entries, self._offset, self._open_shard = {}, 0, True
        self._header_len = len(self._header({}))
        self.shards.append((name, []))

    def _close(self) -> None:
        header = self._header(self._entries)
        assert len(header) == self._header_len <= _HEADER_BYTES, (len(header), self._header_len)
        header += b" " * (_HEADER_BYTES - len(header))
        self._submit(lambda: self._w_close(header))
        self._open_shard = False

    def _drain(self) -> None:
        self._jobs.put(None)  # after every queued job
        self._thread.join()

    def finish(self) -> list[str]:
        """Close the last shard, wait for the disk, and give the shards their final names (plus the index when there
        are several)."""
        try:
            if self._open_shard:
                self._close()
            if not self.shards:
                self._open()
                self._close()
            self._drain()
            self._raise()
        except BaseException:
            self.abort()
            raise
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        weight_map = {}
        for (tmp, keys), name in zip(self.shards, names):
            (self.dir / tmp).rename(self.dir / name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names

    def abort(self) -> None:
        """Stop the worker (queued writes are dropped) and close the open shard; safe to call twice."""
        self._stopped = True
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        if self._f is not None:
            try:
                self._f.abort()
            except OSError:  # a full disk refuses the final flush too
                pass
            self._f = None
        self._open_shard = False


# ------------------------------------------------------------------------------ atomic output, signals
TMP_TAG = ".qkvconv-tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Temporary directories left next to `out` by a killed run (SIGKILL, power loss) whose process is gone."""
    removed = []
    for p in out.parent.glob(f".{out.name}{TMP_TAG}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt():
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, so every exit path runs the cleanup
    that removes the temporary output; the signal is also recorded (errors.interrupted_by), for the CLI to report
    an interrupt that a library turned into another exception."""
    import threading

    from qkvconv.errors import interrupted_by

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        interrupted_by.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def disk_free(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


@contextlib.contextmanager
def atomic_output(out: Path, *, force: bool, need_bytes: int | None = None) -> Iterator[Path]:
    """A temporary directory next to `out` that becomes `out` only if the block completes; on any error or
    interrupt it is removed. A full disk becomes one clear error."""
    import errno

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    if need_bytes is not None:
        free = disk_free(out.parent)
        if need_bytes > free:
            raise CheckpointError(f"not enough disk space for {out}: the output needs about {need_bytes / 1e9:.2f} GB, "
                                  f"{free / 1e9:.2f} GB free; nothing written")
    tmp = out.parent / f".{out.name}{TMP_TAG}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with interrupts_as_keyboard_interrupt():
            yield tmp
            trash = None
            if out.exists():
                if not force:
                    raise CheckpointError(f"output {out} already exists; pass --force to replace it")
                trash = out.parent / f".{out.name}.qkvconv-old-{os.getpid()}"
                out.rename(trash)
            tmp.rename(out)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"no space left on the device while writing {out}; nothing written "
                                  f"(the temporary files were removed)") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------- driver
LayerFn = Callable[[dict, int, dict, "torch.Tensor | None"], "object"]


@dataclass
class Plan:
    """What the driver needs to know about the input before reading any weight."""

    source: object  # checkpoint.Source
    config: object
    spec: ArchSpec
    dims: Dims
    tensors: TensorSource
    tokenizer: object
    generation_config: object = None
    loaded: object = None  # the in-memory model for sources that are not sharded safetensors

    @property
    def layer_prefix(self) -> str:
        return self.spec.layers + "."

    def layer_keys(self, i: int) -> list[str]:
        p = f"{self.spec.layers}.{i}."
        return [k for k in self.tensors.keys() if k.startswith(p)]

    def rest_keys(self) -> list[str]:
        return [k for k in self.tensors.keys() if not k.startswith(self.layer_prefix)]

    def source_dtype(self) -> torch.dtype:
        floats = [self.tensors.dtype(k) for k in self.layer_keys(0) if self.tensors.dtype(k).is_floating_point]
        return max(set(floats), key=floats.count) if floats else torch.float32


def open_plan(source, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> Plan:
    """Read the config, check the weights against it (headers only) and open them for streaming."""
    from transformers import AutoTokenizer, GenerationConfig

    from qkvconv.checkpoint import _load_config, load, qkvconv_block

    path = Path(source.path)
    if source.kind == "hf_dir" and any(path.glob("*.safetensors")):
        config = _load_config(source, trust_remote_code)
        block = qkvconv_block(config)
        spec = spec_for(block["model_type"] if block else getattr(config, "model_type", None))
        if (getattr(config, "auto_map", None) or {}) and not block and not trust_remote_code:
            raise CheckpointError(f"{path} ships its own modeling code (auto_map); pass --trust-remote-code if you "
                                  "trust it")
        model = skeleton(config)  # what config.json implies, on the meta device
        tensors = module_names(SafetensorsSource(path), model, spec)
        check_against_config(tensors, model, spec, str(path))
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError):
            tokenizer = None
        try:
            generation = GenerationConfig.from_pretrained(path)
        except OSError:
            generation = None
        return Plan(source, config, spec, dims_of(config, spec), tensors, tokenizer, generation)
    loaded = load(source, dtype=torch.float32, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    sd = loaded.model.state_dict()
    if getattr(loaded.config, "tie_word_embeddings", False):
        sd.pop(output_embedding_key(loaded.model), None)
    return Plan(source, loaded.config, loaded.spec, dims_of(loaded.config, loaded.spec), StateDictSource(sd),
                loaded.tokenizer, getattr(loaded.model, "generation_config", None), loaded)


class Float64View:
    """A layer's tensors as float64, upcast on first access (a lossy transform reads only its attention weights).

    A tensor read from a safetensors file mapping is unmapped again once upcast (release_file_pages): the original
    pass released the layer's pages, and the transform's reads would map the attention weights back for the rest of
    the pass (RSS grew by ~20 MB a layer over the first layers of the 4 GiB benchmark's share-kv calibrated)."""

    def __init__(self, tensors: dict[str, torch.Tensor], device="cpu"):
        self._src, self._cache, self.device = tensors, {}, device

    def _upcast(self, key: str) -> torch.Tensor:
        src = self._src[key]
        t = src.to(self.device)
        t = t.double() if t.is_floating_point() else t
        if t.data_ptr() != src.data_ptr() and _in_file_mapping(src):
            release_file_pages(src)
        return t

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = self._upcast(key)
        return self._cache[key]

    def fresh(self, key: str) -> torch.Tensor:
        """key as float64 without keeping it here (the cached copy where there is one): freed with its last user."""
        return self._cache[key] if key in self._cache else self._upcast(key)

    def __contains__(self, key) -> bool:
        return key in self._src

    def __iter__(self):
        return iter(self._src)

    def __len__(self) -> int:
        return len(self._src)

    def keys(self):
        return self._src.keys()

    def items(self):
        return ((k, self[k]) for k in self._src)

    def values(self):
        return (self[k] for k in self._src)

    def get(self, key, default=None):
        return self[key] if key in self._src else default


@dataclass
class Streamed:
    """What the driver measured and produced."""

    entries: list[dict]  # each layer's entry in the qkvconv block
    infos: list[dict]  # what the transform reported per layer
    error: object = None  # verify.LogitError (None without verification)
    exactness: object = None  # verify.Exactness (exact transforms)
    output_bytes: int = 0
    converted_config: object = None
    timings: dict = field(default_factory=dict)


def _relative(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items()}


# ------------------------------------------------------------------------------- one streamed pass, layer by layer
# What every streamed pass over the layers does (stream_convert for the converted model it writes and verifies,
# sensitivity.py for each candidate it measures): read layer i's tensors, load them into layer i of a skeleton,
# run it, release it.
def read_layer(plan: Plan, i: int, device="cpu") -> tuple[dict[str, torch.Tensor], Float64View]:
    """Layer i's tensors (full keys), each checked finite (a NaN/Inf is named, see check_finite), and a float64
    view of them for the transform. A tensor mapped from a safetensors file is left unmapped once checked (its pages
    stay in the page cache): the reader thread reads layer i + 1 while layer i is converted, and so its pages are
    not held resident beside layer i's until they are used."""
    tensors = {k: check_finite(k, plan.tensors.get(k), release=True) for k in plan.layer_keys(i)}
    return tensors, Float64View(tensors, device)


def transform_device(device) -> contextlib.AbstractContextManager:
    """The context a layer transform runs in, so that its own new tensors (eye, zeros, ...) are made on `device`; on
    the CPU, where they are made anyway, none: the device context's Python hook runs on every torch call (0.2-0.5 s
    of SmolLM2's absorb-query transform)."""
    return torch.device(device) if torch.device(device).type != "cpu" else contextlib.nullcontext()


def cast_layer(tensors: dict[str, torch.Tensor], dtype: torch.dtype, keep: dict[str, torch.dtype]
               ) -> dict[str, torch.Tensor]:
    """Floating tensors cast to `dtype`, the folded maps to the dtype `keep` gives them (full key -> dtype, see
    folded_dtypes): a layer as a model in `dtype` holds it, and as it is written."""
    return {k: x.to(keep.get(k, dtype)) if x.is_floating_point() else x for k, x in tensors.items()}


def load_layer(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype,
               keep: dict[str, torch.dtype], device="cpu") -> nn.Module:
    """materialize() layer `module` with `tensors` (full keys under `prefix`) cast by cast_layer."""
    materialize(module, _relative(cast_layer(tensors, dtype, keep), prefix), device)
    return module


class LayerSkeletons:
    """The layer lists of models whose layers are all one layer entry, one skeleton per (entry, dtype), built on
    first use (config_for(entries) -> the model's config): a streamed pass loads layer i of the list its layer's
    entry needs. keep(): the dtypes of the folded maps those layers keep, by full key."""

    def __init__(self, spec: ArchSpec, n_layers: int, config_for: Callable[[list[dict]], object], device="cpu"):
        self.spec, self.n_layers, self.config_for, self.device = spec, n_layers, config_for, device
        self._layers: dict[tuple[str, torch.dtype], nn.Module] = {}
        self._keep: dict[tuple[str, torch.dtype], dict[str, torch.dtype]] = {}

    def layers(self, entry: dict, dtype: torch.dtype) -> nn.Module:
        key = (json.dumps(entry, sort_keys=True), dtype)
        if key not in self._layers:
            model = skeleton(self.config_for([entry] * self.n_layers), dtype)
            _real_tensors_to(model, self.device)
            self._layers[key] = model.get_submodule(self.spec.layers)
        return self._layers[key]

    def keep(self, entry: dict, dtype: torch.dtype) -> dict[str, torch.dtype]:
        key = (json.dumps(entry, sort_keys=True), dtype)
        if key not in self._keep:
            self._keep[key] = {f"{self.spec.layers}.{k}": d for k, d in folded_dtypes(self.layers(entry, dtype)).items()}
        return self._keep[key]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _CalibrationInputs:
    """The attention inputs of the calibration rows, gathered batch by batch as the original layer runs: each batch's
    rows (the stream's rows in order, `batch` at a time) are copied into their place in one (rows, L, d) tensor, and
    the rest are dropped. Keeping every batch and selecting at the end held the inputs three times over (the batches,
    their concatenation, the selection: ~110 MiB at a 2048-wide bf16 layer on 40 × 256 tokens), at the moment the
    original pass's file pages were still mapped: the RSS peak of the 4 GiB benchmark's share-kv calibrated."""

    def __init__(self, rows: list[int]):
        self.slot = {r: j for j, r in enumerate(rows)}  # stream row -> calibration row
        self.seen, self.out = 0, None

    def add(self, batch: torch.Tensor) -> None:  # (b, L, d): the stream's rows seen … seen + b
        if self.out is None:
            self.out = batch.new_empty(len(self.slot), *batch.shape[1:])
        for k in range(batch.shape[0]):
            j = self.slot.get(self.seen + k)
            if j is not None:
                self.out[j] = batch[k]
        self.seen += batch.shape[0]

    def rows(self) -> torch.Tensor:
        """(rows·L, d), in calibration-row order."""
        if self.out is None or self.seen <= max(self.slot):  # a calibration row the layer never saw
            raise TransformError("internal: the original layer's attention inputs were not all captured")
        return self.out.flatten(0, -2)


def stream_convert(
    plan: Plan,
    out_dir: Path | None,
    layer_fn: Callable,
    *,
    dtype: torch.dtype,
    config_for: Callable[[list[dict]], object],
    ids: torch.Tensor | None = None,
    verify_rows: list[int] | None = None,
    calib_rows: list[int] | None = None,
    exact: bool = False,
    device: str = "cpu",
    batch_size: int = 4,
    max_shard_bytes: int = 2 * 1024**3,
    progress: Callable[[str], None] | None = None,
    source_label: str = "",
    direct_io: bool = False,
) -> Streamed:
    """Convert `plan`'s checkpoint layer by layer into `out_dir` (tensors only; None: write nothing), verifying on
    the way when `ids` are given.

    layer_fn(sd64, i, attn_input) -> LayerResult: the transform of layer i on its float64 tensors (attn_input: the
    original layer's calibration attention inputs (n·L, d) over `calib_rows`, when calib_rows is given).
    config_for(entries) -> the converted config. Tensors the converted model keeps at their own precision (folded
    maps, folded_dtypes) are cast to it, the rest to `dtype`. exact: also run float64 streams and measure Exactness.
    direct_io: write the shards around the page cache (ShardWriter), for an output nothing reads back soon."""
    try:
        with heap_for_temporaries():
            return _stream_convert(plan, out_dir, layer_fn, dtype=dtype, config_for=config_for, ids=ids,
                                   verify_rows=verify_rows, calib_rows=calib_rows, exact=exact,
                                   device=device, batch_size=batch_size, max_shard_bytes=max_shard_bytes,
                                   progress=progress, source_label=source_label, direct_io=direct_io,
                                   writers=(writers := []))
    except BaseException:
        for w in writers:
            w.abort()  # close the open shard, so the caller can remove the temporary directory (and unmount)
        raise


def _stream_convert(plan, out_dir, layer_fn, *, dtype, config_for, ids, verify_rows, calib_rows, exact,
                    device, batch_size, max_shard_bytes, progress, source_label, direct_io, writers: list) -> Streamed:
    from qkvconv.verify import Exactness, _Accumulator, _Stat

    t0 = time.perf_counter()
    spec, dims, src = plan.spec, plan.dims, plan.tensors
    n_layers = dims.num_hidden_layers
    writer = ShardWriter(out_dir, max_shard_bytes, direct=direct_io) if out_dir is not None else None
    writers.append(writer) if writer is not None else None
    variants = ([torch.float64] if exact and dtype != torch.float64 else []) + [dtype] if ids is not None else []
    verify_rows = list(range(len(ids))) if ids is not None and verify_rows is None else (verify_rows or [])
    orig_rows = sorted(set(verify_rows) | set(calib_rows or []))
    # The float64 pair proves the algebra, which any token exercises: it runs on the first ALGEBRA_TOKENS tokens of
    # the first verified sequence only (row 0 of its own stream); the output-dtype pair runs on every verified token.
    algebra_rows = verify_rows[:1] if len(variants) == 2 else verify_rows
    n64 = min(ALGEBRA_TOKENS, ids.shape[1]) if len(variants) == 2 else None
    streams = {v: Stream(plan.config, spec, src, v, ids[algebra_rows, :n64] if v != dtype else ids, device, batch_size)
               for v in variants}
    h_orig = {v: streams[v].embed()[orig_rows] if v == dtype else streams[v].embed() for v in variants}
    pos = {r: j for j, r in enumerate(orig_rows)}
    ver_in_orig = [pos[r] for r in verify_rows]
    h_conv = {v: h_orig[v][ver_in_orig].clone() if v == dtype else h_orig[v].clone() for v in variants}
    calib_in_orig = [pos[r] for r in calib_rows] if calib_rows else None
    orig_skel = {v: streams[v].layers for v in variants}
    orig_keep = {f"{spec.layers}.{k}": d for k, d in folded_dtypes(orig_skel[dtype]).items()} if variants else {}
    converted = LayerSkeletons(spec, n_layers, config_for, device)
    entries, infos = [], []
    timings = {"transform": 0.0, "verify": 0.0, "io": 0.0}

    if writer is not None:  # the non-layer tensors (embeddings, final norm, LM head) pass through
        t = time.perf_counter()
        for k in plan.rest_keys():
            writer.add(k, check_finite(k, src.get(k), release=True).to(dtype))
        timings["io"] += time.perf_counter() - t
    heap = layer_heap(plan)
    # layer i + 1 is read (paged in, checked finite) by one thread while layer i is converted. That thread must not
    # call torch.set_num_threads: MKL's thread count is process-wide, and changing it while this thread is inside
    # LAPACK broke a solve ("oneMKL ERROR: Parameter 6 was incorrect on entry to DLASWP", SmolLM2 share-kv calibrated)
    with ThreadPoolExecutor(1, thread_name_prefix="qkvconv-layer-reader") as reader:
        ahead = reader.submit(read_layer, plan, 0, device) if n_layers else None
        for i in range(n_layers):
            if progress:
                progress(f"layer {i + 1}/{n_layers}")
            prefix = f"{spec.layers}.{i}."
            t = time.perf_counter()
            layer_src, sd64 = ahead.result()
            ahead = reader.submit(read_layer, plan, i + 1, device) if i + 1 < n_layers else None
            timings["io"] += time.perf_counter() - t
            attn_input = None
            t = time.perf_counter()
            for v in variants:  # the original layer i on the original streams
                module = orig_skel[v][i]
                if v == torch.float64:  # as read; run_layer casts each module's weights as it runs (cast_on_use)
                    materialize(module, _relative(layer_src, prefix), device)
                else:
                    load_layer(module, layer_src, prefix, v, orig_keep, device)
                hook = None
                if calib_rows and v == dtype:
                    from qkvconv.verify import capture_attention_input

                    calib_inputs = _CalibrationInputs(calib_in_orig)
                    hook = capture_attention_input(module, spec, calib_inputs.add)
                h_orig[v] = streams[v].run_layer(module, h_orig[v])
                if hook is not None:
                    hook.remove()
                    attn_input = calib_inputs.rows()
                    del calib_inputs
                release(module)
            for x in layer_src.values():  # the pages the original pass mapped leave RSS until the writer reads them
                if _in_file_mapping(x):  # (92 MB at a 2048-wide bf16 layer, beside the transform's peak)
                    release_file_pages(x)
            timings["verify"] += time.perf_counter() - t
            trim_heap()  # each phase's spent temporaries leave the heap before the next phase's (see trim_heap)
            t = time.perf_counter()
            with transform_device(device):
                res = layer_fn(sd64, i, attn_input)
            timings["transform"] += time.perf_counter() - t
            # the float64 upcasts and the calibration inputs are spent: not held through the write and the converted
            # pass (~80 MiB at a 2048-wide layer)
            del sd64, attn_input
            trim_heap()
            entries.append(res.entry)
            infos.append(res.info)
            keep = converted.keep(res.entry, dtype)
            kept = {k: x for k, x in layer_src.items() if k not in set(res.removed)}
            out = cast_layer(kept | res.tensors, dtype, keep)
            if writer is not None:
                t = time.perf_counter()
                for k, x in out.items():
                    writer.add(k, x)
                timings["io"] += time.perf_counter() - t
            t = time.perf_counter()
            for v in variants if verify_rows else []:  # the converted layer i on the converted streams
                module = converted.layers(res.entry, v)[i]
                if v == torch.float64:  # kept tensors as read, the transform's in float64 (cast_on_use)
                    materialize(module, _relative(kept | res.tensors, prefix), device)
                else:
                    materialize(module, _relative(out, prefix), device)  # what was written, as written
                h_conv[v] = streams[v].run_layer(module, h_conv[v])
                release(module)
            timings["verify"] += time.perf_counter() - t
            del layer_src, out, kept, res
            heap.layer_done()
    result = Streamed(entries, infos, converted_config=config_for(entries))
    if writer is not None:
        t = time.perf_counter()
        writer.finish()
        result.output_bytes = writer.total
        timings["io"] += time.perf_counter() - t
    if variants and verify_rows:
        t = time.perf_counter()
        if progress:
            progress("logits")
        acc = _Accumulator()
        algebra, r_orig, r_conv, scale = _Stat(), _Stat(), _Stat(), 0.0
        for j, r in enumerate(verify_rows):
            o = ver_in_orig[j]
            ref, new = streams[dtype].logits(h_orig[dtype][o], h_conv[dtype][j], seq=r).cpu().split(1)
            acc.add(ref, new)
            if exact and j < len(algebra_rows):
                s64 = streams.get(torch.float64, streams[dtype])
                o64, r64 = (o, r) if s64 is streams[dtype] else (j, j)  # rows of the float64 stream's own ids
                pair = s64.logits(h_orig[s64.dtype][o64], h_conv[s64.dtype][j], seq=r64)
                ref64, new64 = pair.double().cpu().split(1)
                n = ref64.shape[1]  # the float64 pair's prefix of this sequence
                algebra.add(ref64, new64)
                r_orig.add(ref[:, :n], ref64)
                r_conv.add(new[:, :n], new64)
                scale = max(scale, float(ref64.abs().max()))
        result.error = acc.result(source_label)
        if exact:
            result.exactness = Exactness(
                dtype=_dtype_name(dtype), algebraic_max_abs=algebra.max, algebraic_rel=algebra.max / max(scale, 1e-30),
                rounding_original=r_orig.mean, rounding_converted=r_conv.mean, rounding_original_max=r_orig.max,
                rounding_converted_max=r_conv.max, tokens=acc.count, algebra_tokens=algebra.n // ref.shape[-1],
            )
        timings["verify"] += time.perf_counter() - t
    result.timings = {k: round(v, 3) for k, v in timings.items()} | {"total": round(time.perf_counter() - t0, 3)}
    return result
