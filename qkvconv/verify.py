"""Equivalence checks: does a converted model compute what the original did?

Calibration text is the user's own file, by default the public-domain text shipped in qkvconv/data (the same
tokens on every machine), or with calib="sample" sequences sampled from the original model itself. Random
token ids are not calibration: they exercise none of the directions real text does.

Exactness (Exactness, measure_exactness) separates the two sources of a difference: the algebra (original and
converted both run in float64) and the rounding of the output dtype (each model against its own float64
forward), so that a bound measures the conversion and not the CPU, thread count or kernel.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qkvconv.errors import QkvconvError
from qkvconv.modeling.modeling_qkvconv import _norm_at, rms_norm_eps


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


DEFAULT_CALIB = Path(__file__).parent / "data" / "calibration.txt"
SAMPLE = "sample"  # calib=SAMPLE: sequences sampled from the original model


def calibration_ids(
    model, tokenizer, *, calib: Path | str | None = None, num_seqs: int = 8, seq_len: int = 128, seed: int = 0
) -> tuple[torch.Tensor, str]:
    """(num_seqs, seq_len) token ids from `calib` text (default: qkvconv's shipped calibration text), or sampled
    from `model` itself with calib="sample"."""
    if calib is None:
        calib = DEFAULT_CALIB
    if str(calib) != SAMPLE:
        path = Path(calib)
        if not path.is_file():
            raise QkvconvError(f"calibration file {path} does not exist")
        if path.stat().st_size > _WHOLE_FILE_BYTES:
            return _file_windows(path, tokenizer, num_seqs, seq_len)
        text = path.read_text(encoding="utf-8", errors="replace")
        ids = _leading_ids(tokenizer, text, seq_len) if num_seqs == 1 else None  # the one window starts at token 0
        if ids is None:
            ids = tokenizer(text, return_tensors="pt").input_ids[0]
        need = num_seqs * seq_len
        if ids.numel() < seq_len:
            raise QkvconvError(f"calibration file {path} has {ids.numel()} tokens; need at least {seq_len}")
        n = min(num_seqs, ids.numel() // seq_len)
        starts = torch.linspace(0, ids.numel() - seq_len, n).long()  # spread windows over the whole file
        windows = torch.stack([ids[s : s + seq_len] for s in starts])
        name = "qkvconv calibration text" if path == DEFAULT_CALIB else f"file:{path.name}"
        return windows, f"{name} ({min(need, n * seq_len)} tokens)"
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
_LEADING_SLACK = 16  # tokens past the window that a text's leading piece must give (a cut word's own tokens differ)


def _leading_ids(tokenizer, text: str, seq_len: int) -> torch.Tensor | None:
    """The whole text's first `seq_len` + _LEADING_SLACK token ids, tokenizing only a leading piece of it, cut at a
    whitespace (doubled until it gives that many): what a one-window calibration reads (an exact conversion's
    verification), without tokenizing the shipped 256 KB text whole (0.27 s of SmolLM2's ~7 s absorb-query). None
    where the piece would be the whole text."""
    want = 8 * seq_len  # characters
    while want < len(text):
        cut = next((j for j in range(want, len(text)) if text[j].isspace()), len(text))
        if cut >= len(text):
            return None
        ids = tokenizer(text[:cut], return_tensors="pt").input_ids[0]
        if ids.numel() >= seq_len + _LEADING_SLACK:
            return ids[: seq_len + _LEADING_SLACK]
        want *= 2
    return None


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
    parts = [model(ids[i : i + batch_size].to(device), use_cache=False).logits.cpu() for i in range(0, len(ids), batch_size)]
    return torch.cat(parts)


class _Accumulator:
    """Streams the LogitError statistics over batches and, within a batch, over blocks of POSITIONS positions, so
    no (n, L, vocab) float64 tensor is held: at L 256 and a 32k vocabulary one sequence's float64 temporaries were
    ~0.5 GB (the peak of a streamed 4 GiB conversion's verification), a block of 32 positions' are ~60 MB."""

    POSITIONS = 32

    def __init__(self) -> None:
        self.max_abs = self.sum_abs = self.sum_kl = self.max_ref = 0.0
        self.agree = self.count = self.elements = 0

    def add(self, ref: torch.Tensor, new: torch.Tensor) -> None:
        """ref, new: (batch, positions, vocab) logits of the reference and the tested model."""
        for s in range(0, ref.shape[1], self.POSITIONS):
            self._add(ref[:, s : s + self.POSITIONS], new[:, s : s + self.POSITIONS])

    def _add(self, ref: torch.Tensor, new: torch.Tensor) -> None:
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
        acc.add(ref_logits[i : i + batch_size], model(ids[i : i + batch_size].to(device), use_cache=False).logits.cpu())
    return acc.result(source)


def capture_attention_input(layer, spec, fn):
    """Call fn(h) with each input h the layer's attention block sees: the pre-attention norm's output, or the
    attention module's own input where there is no such norm (olmo2 reads the raw residual). Returns the hook."""
    if spec.attn_norm is not None:
        return layer.get_submodule(spec.attn_norm).register_forward_hook(lambda _m, _i, out: fn(out.detach()))
    attn = layer.get_submodule(spec.o_proj.rsplit(".", 1)[0])
    return attn.register_forward_pre_hook(
        lambda _m, args, kwargs: fn((args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)


@torch.no_grad()
def attention_inputs(model, spec, ids: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Per layer, the inputs the attention block sees (output of the pre-attention norm), (n_tokens, d)."""
    layers = model.get_submodule(spec.layers)
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        capture_attention_input(layer, spec, lambda out, i=i: store[i].append(out.reshape(-1, out.shape[-1]).cpu()))
        for i, layer in enumerate(layers)
    ]
    try:
        logits_of(model, ids, batch_size)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in store]


# ------------------------------------------------------------------------------------------ decoding
@dataclass(frozen=True)
class DecodeCheck:
    """Greedy decoding of the converted model with its KV cache, against the same model without a cache and
    against the original model, on prompts cut from the calibration tokens.

    Uncached decoding recomputes the whole sequence at every step; by causality its step-t logits are one
    use_cache=False forward over the cached run's sequence, which is how they are computed here. A step whose
    cached token is not the uncached argmax is a mismatch unless it is a tie: the uncached margin between the two
    tokens is within `tie_tolerance`, four times the original model's own cached-vs-uncached logit gap on this
    machine and dtype (floored at four ulps of the largest logit), i.e. rounding, not a broken cache.
    """

    prompts: int
    prompt_tokens: int
    new_tokens: int
    cached_vs_uncached: float  # fraction of generated tokens that uncached greedy decoding chooses too
    mismatches: int  # disagreements larger than the tie tolerance (any makes the check fail)
    max_abs_gap: float  # max |Δlogit| cached step logits vs uncached, converted model
    original_gap: float  # the same for the original model: this machine's rounding between the two paths
    tie_tolerance: float
    vs_original: float  # fraction of generated tokens the original also chooses, given the same prefix
    identical_to_original: int  # prompts whose whole greedy continuation equals the original's
    cache_tokens: int  # tokens the cache holds after generation (per layer)
    expected_cache_tokens: int

    @property
    def passed(self) -> bool:
        return self.mismatches == 0 and self.cache_tokens == self.expected_cache_tokens

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


@torch.no_grad()
def _greedy(model, prompts: torch.Tensor, new_tokens: int, eos: list[int]):
    """Cached greedy generate(): (sequences, step logits (B, n, V) with EOS masked, cache tokens held).

    EOS is masked (min_new_tokens), every other logits processor is off, so each token is the raw argmax."""
    from qkvconv.compat import output_cache

    device = next(model.parameters()).device
    prompts = prompts.to(device)
    gen = model.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, num_beams=1, use_cache=True, return_dict_in_generate=True, output_logits=True,
        pad_token_id=eos[0] if eos else 0, eos_token_id=eos or None, repetition_penalty=1.0,
        no_repeat_ngram_size=0, temperature=None, top_k=None, top_p=None,
    )
    logits = torch.stack(gen.logits, 1).float().cpu()
    if eos:
        logits[..., eos] = float("-inf")
    cache = output_cache(gen)
    held = cache.get_seq_length() if cache is not None else 0
    return gen.sequences.cpu(), logits, held


@torch.no_grad()
def _uncached(model, sequences: torch.Tensor, start: int, eos: list[int]) -> torch.Tensor:
    """Logits predicting tokens start … end of `sequences`, computed with no cache: (B, n, V)."""
    device = next(model.parameters()).device
    keep = sequences.shape[1] - start + 1  # the LM head runs on these last positions only (the vocab is wide)
    try:
        logits = model(sequences.to(device), use_cache=False, logits_to_keep=keep).logits
    except TypeError:  # a model class without logits_to_keep
        logits = model(sequences.to(device), use_cache=False).logits
    logits = logits[:, -keep:-1].float().cpu()
    if eos:
        logits[..., eos] = float("-inf")
    return logits


def _finite_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    keep = torch.isfinite(a) & torch.isfinite(b)
    return float((a - b).abs()[keep].max()) if keep.any() else 0.0


DECODE_PROMPTS, DECODE_PROMPT_TOKENS, DECODE_NEW_TOKENS = 2, 32, 6  # a cache written by a prompt, then read and
# extended by 5 single-token steps: every cache path (prefill, append, read) runs; more steps only repeat them, and
# each step reads every weight once (memory-bound: ~0.14 s for SmolLM2 on 2 cores)


def decode_check(original, converted, ids: torch.Tensor, *, prompts: int = DECODE_PROMPTS,
                 prompt_tokens: int = DECODE_PROMPT_TOKENS, new_tokens: int = DECODE_NEW_TOKENS) -> DecodeCheck:
    """Greedy decoding checked three ways (see DecodeCheck) on the first `prompts` calibration sequences."""
    eos = getattr(original.generation_config, "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    p = ids[:prompts, : min(prompt_tokens, ids.shape[1])]
    L = p.shape[1]
    ref_seq, ref_cached, _ = _greedy(original, p, new_tokens, eos)
    ref_uncached = _uncached(original, ref_seq, L, eos)
    original_gap = _finite_gap(ref_cached, ref_uncached)
    seq, cached, held = _greedy(converted, p, new_tokens, eos)
    uncached = _uncached(converted, seq, L, eos)
    chosen = seq[:, L:]  # (B, n)
    scale = float(ref_cached[torch.isfinite(ref_cached)].abs().max())
    ulp = torch.finfo(next(converted.parameters()).dtype).eps * scale
    tol = max(4 * original_gap, 4 * ulp)
    margin = uncached.max(-1).values - uncached.gather(-1, chosen[..., None])[..., 0]  # ≥ 0; 0 where they agree
    agree = margin == 0
    # the original's choice after the converted's prefix: its pass over ref_seq where that is the same sequence (the
    # usual case of an exact conversion), else one over seq
    ref_next = (ref_uncached if torch.equal(seq, ref_seq) else _uncached(original, seq, L, eos)).argmax(-1)
    return DecodeCheck(
        prompts=p.shape[0], prompt_tokens=L, new_tokens=new_tokens,
        cached_vs_uncached=float(agree.float().mean()), mismatches=int((margin > tol).sum()),
        max_abs_gap=_finite_gap(cached, uncached), original_gap=original_gap, tie_tolerance=tol,
        vs_original=float((ref_next == chosen).float().mean()),
        identical_to_original=int((seq == ref_seq).all(-1).sum()),
        cache_tokens=held, expected_cache_tokens=L + new_tokens - 1,
    )


# ------------------------------------------------------------------------------------------ exactness
ALGEBRAIC_REL_BOUND = 1e-9  # float64 original vs float64 converted: max |Δlogit| / max |logit|
ROUNDING_RATIO_BOUND = 2.0  # converted's mean |logit_dtype − logit_float64| ≤ this × the original's own
ROUNDING_MAX_RATIO_BOUND = 8.0  # and its max ≤ this × the original's own max


@dataclass(frozen=True)
class Exactness:
    """An exact conversion's error, split into the algebra and the output dtype's rounding.

    algebraic: original and converted both in float64 (transformers' RMSNorm, which normalises in float32
    whatever the input, computed in float64 for this), max |Δlogit| relative to max |logit|: rounding level of
    float64 on every machine when the algebra is right. rounding: each model in the output dtype against its
    own float64 forward; the ratio says how much noisier the conversion made the model. A conversion passes when
    algebraic_rel ≤ ALGEBRAIC_REL_BOUND and the mean and max ratios are within their bounds.
    """

    dtype: str
    algebraic_max_abs: float
    algebraic_rel: float
    rounding_original: float  # mean |Δlogit|, original in dtype vs float64
    rounding_converted: float  # mean |Δlogit|, converted in dtype vs its float64 forward
    rounding_original_max: float
    rounding_converted_max: float
    tokens: int
    algebra_tokens: int | None = None  # tokens of the float64 pair (and of the rounding ratios), when fewer
    algebraic_bound: float = ALGEBRAIC_REL_BOUND
    ratio_bound: float = ROUNDING_RATIO_BOUND
    max_ratio_bound: float = ROUNDING_MAX_RATIO_BOUND

    @property
    def rounding_ratio(self) -> float:
        return _ratio(self.rounding_converted, self.rounding_original)

    @property
    def rounding_max_ratio(self) -> float:
        return _ratio(self.rounding_converted_max, self.rounding_original_max)

    @property
    def algebra_ok(self) -> bool:
        return self.algebraic_rel <= self.algebraic_bound

    @property
    def rounding_ok(self) -> bool:
        return self.rounding_ratio <= self.ratio_bound and self.rounding_max_ratio <= self.max_ratio_bound

    @property
    def passed(self) -> bool:
        return self.algebra_ok and self.rounding_ok

    def as_dict(self) -> dict:
        return {**asdict(self), "rounding_ratio": self.rounding_ratio, "rounding_max_ratio": self.rounding_max_ratio,
                "passed": self.passed}


def _ratio(a: float, b: float) -> float:
    if a == 0:
        return 0.0
    return a / b if b > 0 else float("inf")


def _rms64(self, x: torch.Tensor, gain_offset: float = 0.0) -> torch.Tensor:
    if x.dtype != torch.float64:
        return type(self).forward(self, x)
    return _norm_at(self, x, gain_offset)


@contextlib.contextmanager
def pure_float64(*models, gain_offset: float = 0.0):
    """Inside: every transformers RMSNorm of `models` computes in float64 when fed float64, instead of in float32
    as transformers does; gain_offset: their gain is (gain_offset + weight) (ArchSpec.norm_gain_offset).
    Outside: as before."""
    patched = [m for model in models for m in model.modules() if rms_norm_eps(m) is not None and hasattr(m, "weight")]
    for m in patched:
        m.forward = functools.partial(_rms64, m, gain_offset=gain_offset)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


class _Stat:
    def __init__(self) -> None:
        self.sum = self.max = 0.0
        self.n = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        d = (a.double() - b.double()).abs()
        self.sum += float(d.sum())
        self.max = max(self.max, float(d.max()))
        self.n += d.numel()

    @property
    def mean(self) -> float:
        return self.sum / max(self.n, 1)


@torch.no_grad()
def measure_exactness(original64, converted64, original, converted, ids: torch.Tensor, source: str,
                      batch_size: int = 2, gain_offset: float = 0.0) -> tuple[Exactness, LogitError]:
    """Exactness of `converted` (output dtype) against `original` (the same dtype), with both models' float64
    versions as the references; also the LogitError of converted against original in the output dtype."""
    device = next(original.parameters()).device
    algebra, r_orig, r_conv, scale = _Stat(), _Stat(), _Stat(), 0.0
    acc = _Accumulator()
    for i in range(0, len(ids), batch_size):
        batch = ids[i : i + batch_size].to(device)
        with pure_float64(original64, converted64, gain_offset=gain_offset):
            ref64 = original64(batch, use_cache=False).logits.double().cpu()
            new64 = converted64(batch, use_cache=False).logits.double().cpu()
        ref = original(batch, use_cache=False).logits.cpu()
        new = converted(batch, use_cache=False).logits.cpu()
        algebra.add(ref64, new64)
        r_orig.add(ref, ref64)
        r_conv.add(new, new64)
        scale = max(scale, float(ref64.abs().max()))
        acc.add(ref, new)
    dtype = str(next(converted.parameters()).dtype).removeprefix("torch.")
    exact = Exactness(
        dtype=dtype, algebraic_max_abs=algebra.max, algebraic_rel=algebra.max / max(scale, 1e-30),
        rounding_original=r_orig.mean, rounding_converted=r_conv.mean, rounding_original_max=r_orig.max,
        rounding_converted_max=r_conv.max, tokens=acc.count,
    )
    return exact, acc.result(source)
