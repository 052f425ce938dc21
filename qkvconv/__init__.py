"""qkvconv: rewrite the attention projections of pretrained transformer checkpoints."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a stock or qkvconv-converted checkpoint (HF dir, .gguf, hub id); returns (model, tokenizer)."""
    from qkvconv.checkpoint import load as _load

    loaded = _load(path, **kwargs)
    return loaded.model, loaded.tokenizer


__all__ = ["__version__", "load"]
