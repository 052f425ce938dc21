"""Transforms: pure functions from a state dict (and arch spec) to a new state dict and layout block."""

from qkvconv.transforms.absorb_query import AbsorbResult, absorb_query, wq_condition

__all__ = ["AbsorbResult", "absorb_query", "wq_condition"]
