"""Read checkpoints (HF directory, sharded safetensors, GGUF, hub id) and write them atomically.

Reading never modifies the input. Writing goes to a temporary sibling directory that is renamed into
place only once complete, so an interrupted run leaves no half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from qkvconv.archs import ArchSpec, spec_for
from qkvconv.errors import CheckpointError, QkvconvError, first_line
from qkvconv import __version__
from qkvconv.manifest import hash_path, manifest

RECORD_FILE = "qkvconv.json"
MODELING_FILE = "modeling_qkvconv.py"
DEFAULT_SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Source:
    """Where a checkpoint comes from. `path` is a directory, a .gguf file, or a hub id."""

    kind: Literal["hf_dir", "gguf", "hub"]
    path: str

    @property
    def label(self) -> str:
        return Path(self.path).name if self.kind != "hub" else self.path


@dataclass
class Loaded:
    """A model ready to use, with what qkvconv knows about it."""

    model: torch.nn.Module
    tokenizer: object
    spec: ArchSpec
    source: Source
    source_hash: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config


# --------------------------------------------------------------------------------------- reading


def _check_safetensors(path: Path) -> None:
    """Fail clearly on a truncated or corrupt safetensors file, before transformers sees it."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); re-download or re-export it") from None
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: header promises {8 + n + end} bytes, file has {size}; re-download it"
        )


def _check_hf_dir(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; expected a Hugging Face model directory or a .gguf file")
    tensors = sorted(path.glob("*.safetensors"))
    pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt")) + sorted(path.glob("*.pth"))
    if not tensors and pickles and not allow_pickle:
        raise CheckpointError(
            f"{path} holds only pickled weights ({pickles[0].name}), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    if not tensors and not pickles:
        raise CheckpointError(f"{path} has config.json but no weight files (*.safetensors)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path} is missing shard {missing[0]} named in model.safetensors.index.json")
    for t in tensors:
        _check_safetensors(t)


def resolve_source(src: str | os.PathLike, *, allow_pickle: bool = False) -> Source:
    """Classify and sanity-check `src` without loading weights."""
    s = str(src)
    p = Path(s).expanduser()
    if p.is_dir():
        _check_hf_dir(p, allow_pickle)
        return Source("hf_dir", str(p.resolve()))
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return Source("gguf", str(p.resolve()))
        if p.suffix == ".gguf":
            raise CheckpointError(f"{p} is not a valid GGUF file (bad magic bytes); re-download it")
        raise CheckpointError(f"{p} is a file but neither a GGUF file nor a model directory")
    looks_like_hub_id = s.count("/") == 1 and not s.startswith((".", "/", "~")) and "\\" not in s
    if looks_like_hub_id:
        return Source("hub", s)
    raise CheckpointError(f"{s}: no such file or directory (expected an HF model directory, a .gguf file or a hub id)")


def _load_config(source: Source, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        if source.kind == "gguf":
            p = Path(source.path)
            return AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except QkvconvError:
        raise
    except (OSError, ValueError, KeyError) as e:
        first = first_line(e)
        raise CheckpointError(f"cannot read the config of {source.path}: {first}") from None


def qkvconv_block(config) -> dict | None:
    """The qkvconv layout block of a converted checkpoint's config, or None for a stock model."""
    block = getattr(config, "qkvconv", None)
    return block if isinstance(block, dict) else None


def load(
    src: str | os.PathLike | Source,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    with_hash: bool = False,
    tokenizer: bool = True,
) -> Loaded:
    """Load a stock or qkvconv-converted checkpoint as an eval-mode causal LM and its tokenizer (None with
    tokenizer=False: the decode check reads token ids only, and a tokenizer costs ~0.5 s to load)."""
    source = src if isinstance(src, Source) else resolve_source(src, allow_pickle=allow_pickle)
    with _gguf_parsed_once(source):
        return _load(source, dtype=dtype, device=device, allow_pickle=allow_pickle,
                     trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                     with_hash=with_hash, tokenizer=tokenizer)


def _load(source: Source, *, dtype, device, allow_pickle, trust_remote_code, attn_implementation, with_hash,
          tokenizer) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _load_config(source, trust_remote_code)
    block = qkvconv_block(config)
    spec = spec_for(block["model_type"] if block else getattr(config, "model_type", None))
    auto_map = getattr(config, "auto_map", None) or {}
    if auto_map and not block and not trust_remote_code:
        raise CheckpointError(
            f"{source.path} ships its own modeling code (auto_map); pass --trust-remote-code if you trust it"
        )
    kwargs: dict = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        if source.kind == "gguf":
            p = Path(source.path)
            model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, **kwargs)
            tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name) if tokenizer else None
            _drop_gguf_quantization(model)
        else:
            if block:  # our own modeling code, from the installed package (not the copy in the folder)
                from qkvconv.modeling import modeling_qkvconv

                cls = getattr(modeling_qkvconv, f"Qkvconv{block['base_class']}")
                model = cls.from_pretrained(source.path, config=config, use_safetensors=not allow_pickle, **kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    source.path, config=config, use_safetensors=None if allow_pickle else True,
                    trust_remote_code=trust_remote_code, **kwargs,
                )
            tok = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code) if tokenizer else None
    except QkvconvError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = first_line(e)
        raise CheckpointError(f"cannot load {source.path}: {first}") from None
    model.to(device).eval()
    return Loaded(model, tok, spec, source, hash_path(source.path) if with_hash else None)


@contextmanager
def _gguf_parsed_once(source: Source):
    """Read a GGUF file's metadata once per load instead of once per reader.

    transformers parses the whole file for the config (twice: ours and from_pretrained's), the weights and the
    tokenizer, and rebuilds gguf's tensor-name table for every submodule: on a 2-core AMD EPYC 4 × 7.5 s of
    metadata parsing (SmolLM2's 49k-token vocabulary) and 397 × 22 ms of tables, ~42 s of a ~45 s load. Within
    this context gguf's reader is built once per file, the metadata-only results are kept (each caller gets its
    own deep copy: they edit them) and the name tables are kept per (architecture, layers). Every hook is
    looked up by name and skipped if this transformers or gguf lacks it; the result is the same load, slower."""
    if source.kind != "gguf":
        yield
        return
    import copy
    import functools

    try:
        import gguf
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - transformers reports a missing gguf itself
        yield
        return
    patched: list[tuple[object, str, object]] = []

    def patch(owner, name: str, make) -> None:
        original = getattr(owner, name, None)
        if callable(original):
            patched.append((owner, name, original))
            setattr(owner, name, make(original))

    readers: dict[str, object] = {}
    metadata: dict[str, object] = {}

    def reader(original):
        make = _plain_array_reader(original)

        @functools.wraps(original)
        def cached(path, *args, **kwargs):
            if args or kwargs:
                return original(path, *args, **kwargs)
            key = os.path.realpath(path)
            if key not in readers:
                readers[key] = make(path)
            return readers[key]
        return cached

    def checkpoint(original):
        @functools.wraps(original)
        def cached(path, return_tensors=False, *args, **kwargs):
            if return_tensors or args or kwargs:
                return original(path, return_tensors, *args, **kwargs)
            key = os.path.realpath(path)
            if key not in metadata:
                metadata[key] = original(path, return_tensors=False)
            return copy.deepcopy(metadata[key])
        return cached

    patch(gguf, "GGUFReader", reader)
    patch(gguf_utils, "load_gguf_checkpoint", checkpoint)
    patch(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None))
    # transformers' GGUF reader draws its own bar (qkvconv shows its own status)
    patch(gguf_utils, "tqdm", lambda bar: functools.partial(bar, disable=True))
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def _plain_array_reader(reader_class):
    """gguf's reader over a plain read-only ndarray view of its memory map instead of the np.memmap itself.

    It reads each metadata value as a slice of the map, and a slice of an np.memmap runs two Python-level numpy
    hooks (__getitem__, __array_finalize__): 2.8 M of them for SmolLM2's vocabulary, ~5 of the reader's 7 s. A
    plain view of the same pages slices in C; the bytes and the read-only flag are the same, and the view keeps
    the map alive. Where `reader_class` is not a class, or stores its map elsewhere, this is the reader as is."""
    import numpy as np

    if not isinstance(reader_class, type):
        return reader_class

    class PlainArrayReader(reader_class):
        @property
        def data(self):
            return self.__dict__["_qkvconv_data"]

        @data.setter
        def data(self, value):
            self.__dict__["_qkvconv_data"] = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    PlainArrayReader.__name__ = PlainArrayReader.__qualname__ = reader_class.__name__
    return PlainArrayReader


def _drop_gguf_quantization(model) -> None:
    """GGUF weights arrive dequantized (real fp32 tensors); the leftover quantization config only blocks saving."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


# --------------------------------------------------------------------------------------- writing


def check_output(out: str | os.PathLike, *, force: bool, inputs: list[Source] = ()) -> Path:
    """Refuse an existing output (unless force) and an output that is, or is inside, an input."""
    out_p = Path(out).expanduser().resolve()
    for src in inputs:
        if src.kind == "hub":
            continue
        inp = Path(src.path).resolve()
        inp_dir = inp if inp.is_dir() else inp.parent
        if out_p == inp or out_p == inp_dir or inp_dir in out_p.parents and src.kind == "hf_dir":
            raise CheckpointError(f"output {out_p} would overwrite or nest in the input {inp}; choose another path")
    if out_p.exists() and not force:
        raise CheckpointError(f"output {out_p} already exists; pass --force to replace it")
    if out_p.exists() and not out_p.is_dir():
        raise CheckpointError(f"output {out_p} exists and is not a directory")
    return out_p


def untie(state_dict: dict[str, torch.Tensor], config, spec: ArchSpec) -> dict[str, torch.Tensor]:
    """Drop the output embedding when the config ties it to the input embedding (safetensors refuses shared storage)."""
    if getattr(config, "tie_word_embeddings", False) and spec.output_embedding in state_dict:
        return {k: v for k, v in state_dict.items() if k != spec.output_embedding}
    return state_dict


def write_metadata(directory: Path, *, config, tokenizer, record: dict | None, generation_config=None) -> None:
    """Everything of a checkpoint but its weights: config (and the shipped modeling code for a qkvconv layout),
    tokenizer, generation config, qkvconv.json."""
    config.save_pretrained(directory)
    if qkvconv_block(config):
        src = Path(__file__).parent / "modeling" / MODELING_FILE
        shutil.copyfile(src, directory / MODELING_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if record is not None:
        (directory / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str))
    _respect_umask(directory)


def write_checkpoint(
    out: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor],
    config,
    tokenizer,
    record: dict,
    force: bool = False,
    generation_config=None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write an HF directory (sharded safetensors, config, tokenizer, record) atomically at `out`."""
    from qkvconv.stream import ShardWriter, atomic_output

    out_p = check_output(out, force=force)
    need = sum(t.numel() * t.element_size() for t in state_dict.values())
    with atomic_output(out_p, force=force, need_bytes=need) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        try:
            for k, v in state_dict.items():
                writer.add(k, v)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        write_metadata(tmp, config=config, tokenizer=tokenizer, record=record, generation_config=generation_config)
    return out_p


def _respect_umask(directory: Path) -> None:
    """safetensors writes through a private temp file (mode 0600); give every file the usual mode."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def history_record(*, transform: str, options: dict, source: Source, source_hash: str | None, details: dict,
                   seed: int) -> dict:
    """The record of a written checkpoint: the source's own history (a qkvconv checkpoint has one) plus one entry
    {transform, options, source, **details}, and the manifest."""
    history = (read_record(source.path) or {}).get("history", []) if source.kind == "hf_dir" else []
    entry = {"transform": transform, "options": options,
             "source": {"path": source.path, "kind": source.kind, "sha256": source_hash}, **details}
    return {"qkvconv_version": __version__, "history": [*history, entry], "manifest": manifest(seed=seed)}


def write_with_history(
    output, *, transform: str, options: dict, source: Source, source_hash: str | None, details: dict, seed: int,
    state_dict: dict, config, spec: ArchSpec, tokenizer, generation_config, force: bool,
) -> Path:
    """Write a checkpoint whose record is history_record(...)."""
    record = history_record(transform=transform, options=options, source=source, source_hash=source_hash,
                            details=details, seed=seed)
    return write_checkpoint(
        output, state_dict=untie(state_dict, config, spec), config=config, tokenizer=tokenizer,
        generation_config=generation_config, record=record, force=force,
    )


def read_record(path: str | os.PathLike) -> dict | None:
    f = Path(path) / RECORD_FILE
    return json.loads(f.read_text()) if f.is_file() else None
