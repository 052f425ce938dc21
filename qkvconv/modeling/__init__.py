"""Module variants that converted checkpoints need at load time (see modeling_qkvconv.py)."""

from qkvconv.modeling.modeling_qkvconv import FORMAT, apply_qkvconv_layout

__all__ = ["FORMAT", "apply_qkvconv_layout"]
