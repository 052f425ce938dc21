"""Equivalence checks: does a converted model compute what the original did?

Calibration text is the user's own file, or sequences sampled from the original model itself (so no
data has to ship with the package). Random token ids are not calibration: they exercise none of
the directions real text does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qkvconv.errors import QkvconvError


@dataclass(frozen=True)
class LogitError:
    """How far a converted model's next-token logits are from the original's on the same tokens."""

    max_abs: float  # max |Δlogit|
    mean_abs: float  # mean |Δlogit|
    max_rel: float  # max |Δlogit| / max |logit|
    kl: float  # mean KL(p_original ‖ p_converted) per token, nats
    top1_agreement: float  # fraction of positions whose argmax agrees
    tokens: int
    source: str  # what the calibration tokens were

    def as_dict(self) -> dict:
        return asdict(self)


def calibration_ids(
    model, tokenizer, *, calib: Path | None = None, num_seqs: int = 8, seq_len: int = 128, seed: int = 0
) -> tuple[torch.Tensor, str]:
    """(num_seqs, seq_len) token ids from `calib` text, else sampled from `model` itself."""
    if calib is not None:
        path = Path(calib)
        if not path.is_file():
            raise QkvconvError(f"calibration file {path} does not exist")
        if path.stat().st_size > _WHOLE_FILE_BYTES:
            return _file_windows(path, tokenizer, num_seqs, seq_len)
        ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"), return_tensors="pt").input_ids[0]
        need = num_seqs * seq_len
        if ids.numel() < seq_len:
            raise QkvconvError(f"calibration file {path} has {ids.numel()} tokens; need at least {seq_len}")
        n = min(num_seqs, ids.numel() // seq_len)
        starts = torch.linspace(0, ids.numel() - seq_len, n).long()  # spread windows over the whole file
        windows = torch.stack([ids[s : s + seq_len] for s in starts])
        return windows, f"file:{path.name} ({min(need, n * seq_len)} tokens)"
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    start = torch.full((num_seqs, 1), bos, dtype=torch.long, device=device)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # ancestral sampling at temperature 1, reproducible, global RNG untouched
        ids = model.generate(
            start, attention_mask=torch.ones_like(start), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=tokenizer.eos_token_id,
        )
    return ids.cpu(), f"sampled from the original model (seed {seed}, {num_seqs}×{seq_len} tokens)"


_WHOLE_FILE_BYTES = 4 << 20  # files up to this are tokenized whole; larger ones are read in windows


def _file_windows(path: Path, tokenizer, num_seqs: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """`num_seqs` windows of `seq_len` tokens read at evenly spaced byte offsets of a large text file.

    Only the bytes needed are read and tokenized (a 65 MB corpus is not tokenized whole): each window
    starts after the first whitespace at its offset, so no window begins mid-word or mid-character.
    """
    size = path.stat().st_size
    windows = []
    with open(path, "rb") as f:
        for i in range(num_seqs):
            want = 8 * seq_len  # bytes; doubled until the piece holds seq_len tokens
            while True:
                start = int(i * max(size - want, 0) / max(num_seqs - 1, 1))
                f.seek(start)
                text = f.read(want).decode("utf-8", errors="ignore")
                cut = next((j for j, ch in enumerate(text) if ch.isspace()), 0) if start else 0
                ids = tokenizer(text[cut:], add_special_tokens=False).input_ids
                if len(ids) >= seq_len or want >= size:
                    break
                want *= 2
            if len(ids) < seq_len:
                raise QkvconvError(f"calibration file {path} has too few tokens for {seq_len}-token windows")
            windows.append(torch.tensor(ids[:seq_len]))
    return torch.stack(windows), f"file:{path.name} ({num_seqs}×{seq_len} tokens at spread offsets)"


@torch.no_grad()
def logits_of(model, ids: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    device = next(model.parameters()).device
    parts = [model(ids[i : i + batch_size].to(device)).logits.cpu() for i in range(0, len(ids), batch_size)]
    return torch.cat(parts)


class _Accumulator:
    """Streams the LogitError statistics over batches, so no full (n, L, vocab) float64 tensor is held."""

    def __init__(self) -> None:
        self.max_abs = self.sum_abs = self.sum_kl = self.max_ref = 0.0
        self.agree = self.count = self.elements = 0

    def add(self, ref: torch.Tensor, new: torch.Tensor) -> None:
        ref, new = ref.double(), new.double()
        diff = (ref - new).abs()
        lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(new, -1)
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        self.max_ref = max(self.max_ref, float(ref.abs().max()))
        self.sum_kl += float((lp.exp() * (lp - lq)).sum())
        self.agree += int((ref.argmax(-1) == new.argmax(-1)).sum())
        self.count += ref.shape[0] * ref.shape[1]
        self.elements += diff.numel()

    def result(self, source: str) -> LogitError:
        return LogitError(
            max_abs=self.max_abs,
            mean_abs=self.sum_abs / self.elements,
            max_rel=self.max_abs / max(self.max_ref, 1e-30),
            kl=max(self.sum_kl / self.count, 0.0),
            top1_agreement=self.agree / self.count,
            tokens=self.count,
            source=source,
        )


def compare_logits(ref: torch.Tensor, new: torch.Tensor, source: str, chunk: int = 2) -> LogitError:
    """LogitError between two (n, L, vocab) logit tensors, computed in float64 chunk by chunk."""
    acc = _Accumulator()
    for i in range(0, ref.shape[0], chunk):
        acc.add(ref[i : i + chunk], new[i : i + chunk])
    return acc.result(source)


@torch.no_grad()
def compare_model(ref_logits: torch.Tensor, model, ids: torch.Tensor, source: str, batch_size: int = 2) -> LogitError:
    """LogitError of `model` on `ids` against stored reference logits, streaming over batches."""
    acc = _Accumulator()
    device = next(model.parameters()).device
    for i in range(0, len(ids), batch_size):
        acc.add(ref_logits[i : i + batch_size], model(ids[i : i + batch_size].to(device)).logits.cpu())
    return acc.result(source)


@torch.no_grad()
def attention_inputs(model, spec, ids: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Per layer, the inputs the attention block sees (output of the pre-attention norm), (n_tokens, d)."""
    layers = model.get_submodule(spec.layers)
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        layer.get_submodule(spec.attn_norm).register_forward_hook(
            lambda _m, _i, out, i=i: store[i].append(out.detach().reshape(-1, out.shape[-1]).cpu())
        )
        for i, layer in enumerate(layers)
    ]
    try:
        logits_of(model, ids, batch_size)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in store]
