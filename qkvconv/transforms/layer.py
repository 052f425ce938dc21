"""What every transform returns for one decoder layer: the unit of the streaming driver (qkvconv.stream)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerResult:
    """Layer i after a transform: tensors added or replaced, keys removed, the layer's entry in the config's qkvconv
    block, and what the transform measured (cond(W_Q), the calibrated fit, ...)."""

    tensors: dict[str, torch.Tensor]  # full state-dict keys
    removed: list[str]  # keys of the input layer that no longer exist
    entry: dict
    info: dict = field(default_factory=dict)

    def apply(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Update `state_dict` (a copy the caller owns) in place: drop `removed`, add `tensors`."""
        for key in self.removed:
            state_dict.pop(key, None)
        state_dict.update(self.tensors)


def layer_dtype(sd: dict[str, torch.Tensor], prefix: str) -> torch.dtype:
    """The dtype of the layer whose keys start with `prefix` (e.g. "model.layers.3.")."""
    return next(t.dtype for k, t in sd.items() if k.startswith(prefix))


def column_signs(vecs: torch.Tensor) -> torch.Tensor:
    """±1 per column of `vecs` (n, m) that makes each column's largest-magnitude entry positive.

    An eigen- or singular vector is defined up to its sign, and LAPACK (CPU) and cuSOLVER (GPU) pick different ones
    for the same matrix: multiplying by these signs gives the vectors one sign everywhere, so a fit built from them
    is the same on every device (a direction placed into a rotary key unit is not a sign-free choice there)."""
    pivot = vecs.abs().argmax(0, keepdim=True)  # (1, m)
    signs = vecs.gather(0, pivot).sign().squeeze(0)
    return torch.where(signs == 0, torch.ones_like(signs), signs)
