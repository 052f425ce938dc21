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


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    from common import build_tiny_gguf

    return build_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small seeded word-salad text file for finetune tests (800 sentences of 12 words)."""
    import random

    words = "the cat sat on a mat and the dog ran to the park while small birds sang in tall green trees".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(800)))
    return path


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = Path(os.environ.get("QKVCONV_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not d.is_dir():
        pytest.skip(f"offline data folder {d} not found (set QKVCONV_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from qkvconv.defaults import default_checkpoint

    try:
        return default_checkpoint()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"real checkpoint unavailable: {e}")
