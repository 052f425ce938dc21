"""Transforms: pure functions from a state dict (and arch spec) to a new state dict and layout block."""

from qkvconv.transforms.absorb_query import AbsorbResult, absorb_query, wq_condition
from qkvconv.transforms.attach import AttachResult, added_module_prefixes, attach_preproj, attach_query_mlp
from qkvconv.transforms.share_kv import ShareResult, share_kv

__all__ = ["AbsorbResult", "absorb_query", "wq_condition", "AttachResult", "added_module_prefixes", "attach_preproj", "attach_query_mlp", "ShareResult", "share_kv"]
