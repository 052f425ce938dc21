from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import FAMILIES, build_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """family -> path of a tiny random HF checkpoint (safetensors + tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny(f, root / f) for f in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
