"""Per-layer sensitivity, measured: the model's KL to the original when ONE layer is replaced (issue 16).

For each layer i and each candidate replacement c of it (a LayerResult, e.g. the layer's latent at one rank):

    KL_i(c) = mean_t Σ_v p(v | x_<t) · (log p(v | x_<t) − log p_{i←c}(v | x_<t))   (nats per token)

where p is the original model and p_{i←c} the original with layer i replaced by c, every other layer original,
on probe sequences. Summed over layers it is the additive model of the whole conversion's KL that a rank allocation
minimises (Palu, arXiv 2407.21118 §3.3, searches ranks by a Fisher proxy of the same quantity; here it is measured).

Streamed like the conversion itself (stream.py): each layer is read once. The original stream carries the fitting
sequences, and their attention inputs fit the candidates exactly as the conversion will; each candidate, once
built, carries its own copy of the probe sequences' hidden states through the original layers after it. Memory:
one layer's weights plus (candidates so far) × probe tokens × hidden size hidden states (probe_bytes), never the
whole model; compute: each candidate costs a forward of the probe tokens from its layer to the logits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

import torch

from qkvconv.stream import (Float64View, LayerSkeletons, Plan, Stream, folded_dtypes, heap_for_temporaries,
                            layer_heap, load_layer, read_layer, release, transform_device)

Candidates = Callable[[Float64View, int, torch.Tensor], dict]  # (layer tensors, i, attn_input) -> {key: LayerResult}


def probe_bytes(candidates: int, probe_tokens: int, hidden_size: int, dtype: torch.dtype) -> int:
    """What the candidates' probe streams hold at most: one (probe_tokens, hidden_size) block each."""
    return candidates * probe_tokens * hidden_size * torch.empty((), dtype=dtype).element_size()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; anything narrower is measured in float32 (the transform's error, not the rounding)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def layer_sensitivity(plan: Plan, ids: torch.Tensor, fit_rows: list[int], probe_rows: list[int],
                      candidates: Candidates, config_for: Callable[[list[dict]], object], *,
                      dtype: torch.dtype = torch.float32, device: str = "cpu", batch_size: int = 4,
                      progress: Callable[[str], None] | None = None) -> tuple[list[dict[Hashable, float]], dict]:
    """KL_i(c) (module docstring) for every layer i and every candidate c that candidates(sd64, i, attn_input)
    returns for it: ([{key: KL} per layer], timings). attn_input (n·L, d): layer i's original attention inputs over
    fit_rows (as stream_convert passes them); probe_rows: the rows of `ids` the KL is measured on.
    config_for(entries) -> the config of a model whose layers are all `entries` (a candidate's skeleton)."""
    with heap_for_temporaries():
        return _layer_sensitivity(plan, ids, fit_rows, probe_rows, candidates, config_for, dtype, device,
                                  batch_size, progress)


def _layer_sensitivity(plan, ids, fit_rows, probe_rows, candidates, config_for, dtype, device, batch_size,
                       progress):
    from qkvconv.verify import capture_attention_input

    t0 = time.perf_counter()
    spec, dims = plan.spec, plan.dims
    n_layers = dims.num_hidden_layers
    rows = sorted(set(fit_rows) | set(probe_rows))
    at = {r: j for j, r in enumerate(rows)}
    fit, probe = [at[r] for r in fit_rows], [at[r] for r in probe_rows]
    stream = Stream(plan.config, spec, plan.tensors, dtype, ids[rows], device, batch_size)
    hidden = stream.embed()  # (n, L, d): the original model's hidden states entering the next layer
    orig_keep = {f"{spec.layers}.{k}": d for k, d in folded_dtypes(stream.layers).items()}
    skeletons = LayerSkeletons(spec, n_layers, config_for, device)  # one per candidate entry
    probes: dict[tuple[int, Hashable], torch.Tensor] = {}  # (layer, candidate) -> its probe hidden states
    timings = {"original": 0.0, "candidates": 0.0, "fit": 0.0}

    heap = layer_heap(plan)
    for i in range(n_layers):
        if progress:
            progress(f"sensitivity: layer {i + 1}/{n_layers}")
        prefix = f"{spec.layers}.{i}."
        layer_src, sd64 = read_layer(plan, i, device)
        t = time.perf_counter()
        module = load_layer(stream.layers[i], layer_src, prefix, dtype, orig_keep, device)
        layer_in = hidden[probe]  # what layer i reads on the probe rows: each of its candidates starts here
        captured: list[torch.Tensor] = []
        hook = capture_attention_input(module, spec, captured.append)
        hidden = stream.run_layer(module, hidden)
        hook.remove()
        attn_input = torch.cat(captured)[fit].reshape(-1, dims.hidden_size)
        del captured
        for key in probes:  # every earlier candidate's stream through the original layer i
            probes[key] = stream.run_layer(module, probes[key])
        release(module)
        timings["original"] += time.perf_counter() - t
        t = time.perf_counter()
        with transform_device(device):
            made = candidates(sd64, i, attn_input)
        timings["fit"] += time.perf_counter() - t
        t = time.perf_counter()
        for c, res in made.items():  # layer i replaced by candidate c, on the probe rows
            new = {k: x for k, x in layer_src.items() if k not in set(res.removed)} | res.tensors
            cand = load_layer(skeletons.layers(res.entry, dtype)[i], new, prefix, dtype,
                              skeletons.keep(res.entry, dtype), device)
            probes[(i, c)] = stream.run_layer(cand, layer_in)
            release(cand)
        timings["candidates"] += time.perf_counter() - t
        del layer_src, sd64, made, attn_input, layer_in
        heap.layer_done()
    if progress:
        progress("sensitivity: logits")
    t = time.perf_counter()
    kl: list[dict[Hashable, float]] = [{} for _ in range(n_layers)]
    for j, row in enumerate(probe):
        ref = stream.logits(hidden[row], seq=row).double().log_softmax(-1)  # (1, L, vocab)
        p = ref.exp()
        for (i, c), h in probes.items():
            new = stream.logits(h[j], seq=row).double().log_softmax(-1)
            kl[i][c] = kl[i].get(c, 0.0) + float((p * (ref - new)).sum(-1).mean()) / len(probe)
    timings["logits"] = time.perf_counter() - t
    timings = {k: round(v, 3) for k, v in timings.items()} | {"total": round(time.perf_counter() - t0, 3)}
    return kl, timings
