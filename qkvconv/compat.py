"""The versions qkvconv is tested on, and every dependence on a library's private conventions, in one place.

TESTED is the range the test suite really ran on (CI runs the fast suite on both ends, see .ci/run); it must
match the bounds in pyproject.toml. A version outside it still runs, with one warning line naming the range.

Private conventions of transformers that the *shipped* modeling file relies on live in its own compatibility
section (qkvconv/modeling/modeling_qkvconv.py: the cache keyword, Cache.update/get_seq_length, the attention
interface), because that file is copied next to every converted checkpoint and must stand alone; this module
re-exports what qkvconv itself needs from there. The rest:
- transformers.initialization.no_init_weights (5.x; transformers.modeling_utils.no_init_weights before);
- lm-eval's TaskManager.task_index entries (objects with .yaml_path; dicts before 0.4.12): task_yaml_path; its
  YAML loader lm_eval.tasks._yaml_loader.load_yaml (tests), and `!function module.name` resolving an importable
  module (qkvconv/tasks/*.yaml): both from lm-eval 0.4.12, which is why the range starts there;
- generate(..., output_logits=True, return_dict_in_generate=True) returning `.logits` and the cache;
- the weight conversion mapping transformers applies on load (5.x: conversion_mapping.get_model_conversion_mapping,
  core_model_loading.rename_source_key / WeightConverter.convert): load_mapping, used by stream.MappedSource to read
  per-expert MoE checkpoints under the stacked names the modules have.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from importlib import metadata

from packaging.version import InvalidVersion, Version

# name -> (lowest tested, highest tested), both inclusive; pyproject.toml's bounds say the same.
TESTED: dict[str, tuple[str, str]] = {
    "transformers": ("5.0.0", "5.24.0"),
    "lm-eval": ("0.4.12", "0.4.13"),
}
# reported by `qkvconv env` and in every manifest, without a tested range of their own
REPORTED = ("qkvconv", "torch", "transformers", "lm-eval", "accelerate", "peft", "safetensors", "gguf", "datasets",
            "tokenizers")


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def in_range(name: str, version: str | None = None) -> bool | None:
    """Whether `name` (installed, or `version`) lies in its tested range; None when it has no range or is absent."""
    version = version or installed(name)
    if name not in TESTED or version is None:
        return None
    low, high = TESTED[name]
    try:
        return Version(low) <= Version(version) <= Version(high)
    except InvalidVersion:
        return False


def untested() -> list[str]:
    """One phrase per installed package outside its tested range, e.g. 'transformers 5.25.0 (tested 5.0.0 … 5.24.0)'."""
    return [f"{n} {installed(n)} (tested {TESTED[n][0]} … {TESTED[n][1]})" for n in TESTED if in_range(n) is False]


_warned = False


def warn_if_untested(stream=None) -> str | None:
    """Print one warning line (once per process) when a package is outside its tested range; return it."""
    global _warned
    bad = untested()
    if not bad or _warned:
        return None
    _warned = True
    line = f"qkvconv warning: untested versions: {'; '.join(bad)}; results may be wrong (see `qkvconv env`)"
    print(line, file=stream or sys.stderr)
    return line


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} (×{torch.cuda.device_count()})"
    return f"cpu ({torch.get_num_threads()} threads)"


def environment() -> dict:
    """Versions of qkvconv and its main libraries, each with whether it is in the tested range, and the device."""
    import platform

    packages = {}
    for name in REPORTED:
        entry = {"version": installed(name)}
        if name in TESTED:
            entry["tested"] = list(TESTED[name])
            entry["in_range"] = in_range(name)
        packages[name] = entry
    return {"python": platform.python_version(), "packages": packages, "device": device_description()}


@contextmanager
def no_init_weights():
    """Skip the random initialisation of a model whose every weight is loaded afterwards."""
    try:
        from transformers.initialization import no_init_weights as ctx  # transformers >= 5
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers.modeling_utils import no_init_weights as ctx
    with ctx():
        yield


def take_cache(kwargs: dict):
    """Pop the KV cache from an attention module's keyword arguments (see the shipped modeling file)."""
    from qkvconv.modeling.modeling_qkvconv import take_cache as take

    return take(kwargs)


def cache_argument(model, cache) -> dict:
    """A model call's KV-cache keyword argument: `cache=` where its forward takes that name (transformers 5.24 on,
    where `past_key_values=` is deprecated, to be removed in 5.40), else `past_key_values=` (5.0 ... 5.23)."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def output_cache(output):
    """The KV cache a model output or generate() result carries (`.cache` from 5.24, else `.past_key_values`)."""
    from qkvconv.modeling.modeling_qkvconv import output_cache as cache_of

    return cache_of(output)


def task_yaml_path(entry) -> str | None:
    """Where an lm-eval TaskManager.task_index entry's YAML lives (None for python tasks / unknown)."""
    where = entry.get("yaml_path") if isinstance(entry, dict) else getattr(entry, "yaml_path", None)
    return None if where in (None, -1) else str(where)


def load_task_yaml(path) -> dict:
    """An lm-eval task YAML as lm-eval reads it (`!function` resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path)


def cache_bytes(cache) -> int:
    """Bytes of the tensors a transformers Cache object holds (its per-layer `keys` / `values`, 5.x)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


class LoadMapping:
    """transformers' weight conversion mapping for one model (the renamings and converters from_pretrained applies
    to a checkpoint's keys). Empty where transformers has none (or no such machinery: before 5.x)."""

    def __init__(self, model):
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming
        except ImportError:  # pragma: no cover - transformers 4.x: no conversion on load
            self.renamings, self.converters = [], []
            return
        mapping = get_model_conversion_mapping(model)
        self.model = model
        self.renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self.converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}

    def rename(self, key: str, meta_state_dict: dict) -> tuple[str, str | None]:
        """(the name `key` loads under, the converter source pattern it matched or None), as from_pretrained does."""
        if not self.renamings and not self.converters:
            return key, None
        from transformers.core_model_loading import rename_source_key

        new, pattern = rename_source_key(key, self.renamings, self.converters, self.model.base_model_prefix,
                                         meta_state_dict)
        if new not in meta_state_dict and key in meta_state_dict:  # from_pretrained keeps such a key as it is
            return key, None
        return new, pattern

    def convert(self, target: str, members: list[tuple[str, str, object]]) -> "object":
        """The tensor `target` from its checkpoint tensors [(key, converter pattern, read() -> tensor)], by the
        converter's own operations (e.g. MergeModulelist then Concatenate), in the order given."""
        import copy

        conv = copy.deepcopy(self.by_pattern[members[0][1]])
        for key, pattern, read in members:
            conv.add_tensor(target, key, pattern, read)
        out = conv.convert(target, model=self.model, config=self.model.config)
        if isinstance(out, tuple):  # early 5.x (5.0): (tensors, conversion errors), the errors only logged
            out, errors = out
            if errors:
                raise RuntimeError(f"{target}: {errors}")
        return out[target]

    @staticmethod
    def order(keys: list[str]) -> list[str]:
        """`keys` in the order from_pretrained converts them (expert 10 after expert 9)."""
        try:
            from transformers.core_model_loading import dot_natural_key
        except ImportError:  # pragma: no cover
            return sorted(keys)
        return sorted(keys, key=dot_natural_key)


__all__ = ["TESTED", "LoadMapping", "cache_bytes", "environment", "in_range", "no_init_weights", "output_cache",
           "take_cache", "untested", "warn_if_untested"]
