"""Provenance for every result and checkpoint qkvconv writes: versions, seeds, input hashes."""

from __future__ import annotations

import hashlib
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

PACKAGES = ("qkvconv", "torch", "transformers", "lm_eval", "safetensors", "accelerate", "peft", "gguf", "datasets")
_HASHED_SUFFIXES = (".safetensors", ".gguf", ".bin", ".json", ".model", ".txt")


def library_versions() -> dict[str, str | None]:
    from qkvconv.compat import installed

    return {"python": platform.python_version(), **{name: installed(name.replace("_", "-")) for name in PACKAGES}}


class HashCancelled(Exception):
    pass


def sha256_file(path: Path, chunk: int = 1 << 22, stop=None) -> str:
    """stop: a threading.Event checked between 4 MB blocks (a hash on a thread must not outlive an interrupt)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if stop is not None and stop.is_set():
                raise HashCancelled(str(path))
            h.update(block)
    return h.hexdigest()


def hash_path(path: str | Path, stop=None) -> str:
    """sha256 of a file, or of a checkpoint directory's weight/config files (names and contents, sorted)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p, stop=stop)
    if not p.is_dir():
        return f"hub:{path}"  # a hub id: the revision is not known offline
    h = hashlib.sha256()
    for f in sorted(x for x in p.iterdir() if x.is_file() and x.suffix in _HASHED_SUFFIXES):
        h.update(f.name.encode())
        h.update(sha256_file(f, stop=stop).encode())
    return h.hexdigest()


def machine() -> dict:
    """What the numbers ran on: CPU model, cores, memory, OS (psutil where present, /proc/cpuinfo for the model)."""
    import os

    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import psutil

        memory = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        memory = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "os": platform.platform()}


def manifest(**extra) -> dict:
    """A manifest block: library versions, the tested-range verdicts and device (`qkvconv env`), command line,
    time, plus whatever the caller records."""
    from qkvconv.compat import environment

    return {
        "versions": library_versions(),
        "environment": environment(),
        "machine": machine(),
        "argv": sys.argv,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
