"""Paired tests of two models scored on the same documents: is a difference in an lm-eval metric real?

Both tests take lm-eval's per-document values (`log_samples=True`) of a candidate model A and a reference
model B on the same doc_ids, in the same order (`paired_values` aligns them).

- McNemar's exact test (McNemar 1947), for 0/1 metrics such as `acc`: only the discordant documents
  carry information. With n10 = #(A right, B wrong) and n01 = #(A wrong, B right), under H0 (equal
  accuracy) n10 ~ Binomial(n10 + n01, 1/2); p is the exact two-sided binomial p-value (scipy).
- The paired bootstrap (Efron & Tibshirani 1993, ch. 16; Koehn 2004 for NLP), for every metric: resample
  document indices with replacement, the same indices for both models, and recompute each model's
  metric with lm-eval's own aggregation function (`lm_eval.api.metrics`: mean, perplexity,
  weighted_perplexity, bits_per_byte, ...). The CI is the percentile interval of the resampled deltas;
  the two-sided p-value is that of the bootstrap distribution shifted to the null (delta 0):
  p = (1 + #{|δ* − δ| ≥ |δ|}) / (1 + iters).

Everything is seeded: the same inputs and seed give the same numbers on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Union

from qkvconv.errors import QkvconvError

Value = Union[float, Sequence[float]]  # a doc's value: 0/1, a loglikelihood, or [loglikelihood, count]

DEFAULT_ITERS = 10_000
DEFAULT_SEED = 1234
DEFAULT_CONFIDENCE = 0.95
ALPHA = 0.05  # "significant" in reports


@dataclass(frozen=True)
class PairedTest:
    """A's metric minus B's on the same `n` documents, with its CI and a two-sided p-value."""

    test: str  # "McNemar exact" | "paired bootstrap"
    n: int  # paired documents
    value_a: float  # the metric of A and B on those documents (lm-eval's aggregation)
    value_b: float
    delta: float  # value_a - value_b
    ci_low: float  # paired-bootstrap percentile interval of delta at `confidence`
    ci_high: float
    p_value: float
    confidence: float
    iters: int
    seed: int
    discordant: tuple[int, int] | None = None  # McNemar: (n10 A right B wrong, n01 A wrong B right)

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def aggregation_function(name: str) -> Callable[[list], float]:
    """lm-eval's aggregation function registered as `name` (mean, perplexity, weighted_perplexity, bits_per_byte)."""
    from lm_eval.api.registry import AGGREGATION_REGISTRY, get_aggregation

    import lm_eval.api.metrics  # noqa: F401  (registers the aggregations)

    if name not in AGGREGATION_REGISTRY:
        raise QkvconvError(
            f"unknown lm-eval aggregation '{name}'; use one of {', '.join(sorted(AGGREGATION_REGISTRY.keys()))}"
        )
    return get_aggregation(name)


def _as_items(values: Sequence[Value]) -> list:
    """JSON lists of [loglikelihood, count] back to the tuples lm-eval's weighted aggregations unpack."""
    return [tuple(v) if isinstance(v, (list, tuple)) else v for v in values]


def is_binary(values: Sequence[Value]) -> bool:
    """Every value is 0 or 1 (acc, exact_match): McNemar applies."""
    return bool(values) and all(not isinstance(v, (list, tuple)) and v in (0, 1) for v in values)


def mcnemar(a: Sequence[float], b: Sequence[float]) -> tuple[int, int, float]:
    """(n10, n01, p): discordant counts of paired 0/1 values and McNemar's exact two-sided p-value."""
    from scipy.stats import binomtest

    _check_pair(a, b)
    if not (is_binary(a) and is_binary(b)):
        raise QkvconvError("McNemar's test needs 0/1 values per document (e.g. acc)")
    n10 = sum(1 for x, y in zip(a, b) if x == 1 and y == 0)
    n01 = sum(1 for x, y in zip(a, b) if x == 0 and y == 1)
    # H0: a discordant document favours A or B with probability 1/2
    p = 1.0 if n10 + n01 == 0 else float(binomtest(n10, n10 + n01, 0.5, alternative="two-sided").pvalue)
    return n10, n01, min(1.0, p)


def paired_bootstrap(
    a: Sequence[Value], b: Sequence[Value], aggregation: str, *, iters: int = DEFAULT_ITERS,
    seed: int = DEFAULT_SEED, confidence: float = DEFAULT_CONFIDENCE,
) -> PairedTest:
    """Paired bootstrap of agg(A) − agg(B): documents resampled jointly, each resample aggregated by lm-eval."""
    import numpy as np

    _check_pair(a, b)
    if iters < 1:
        raise QkvconvError(f"bootstrap iterations must be positive, got {iters}")
    if not 0 < confidence < 1:
        raise QkvconvError(f"confidence must be in (0, 1), got {confidence}")
    agg = aggregation_function(aggregation)
    items_a, items_b = _as_items(a), _as_items(b)
    value_a, value_b = float(agg(items_a)), float(agg(items_b))
    delta = value_a - value_b

    rng = np.random.default_rng(seed)
    n = len(items_a)
    arr_a, arr_b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)  # (n,) or (n, 2)
    deltas = np.empty(iters)
    for i in range(iters):
        idx = rng.integers(0, n, n)  # the same documents for both models
        deltas[i] = agg(arr_a[idx].tolist()) - agg(arr_b[idx].tolist())  # lists of floats or of [ll, count]
    tail = (1 - confidence) / 2
    low, high = (float(x) for x in np.quantile(deltas, [tail, 1 - tail]))
    # null distribution: the resampled deltas shifted to mean-free about delta; p counts |δ* − δ| ≥ |δ|
    extreme = int(np.count_nonzero(np.abs(deltas - delta) >= abs(delta) - 1e-12 * max(1.0, abs(delta))))
    p = (1 + extreme) / (1 + iters)
    return PairedTest(
        test="paired bootstrap", n=n, value_a=value_a, value_b=value_b, delta=delta, ci_low=low, ci_high=high,
        p_value=min(1.0, p), confidence=confidence, iters=iters, seed=seed,
    )


def paired_test(
    a: Sequence[Value], b: Sequence[Value], aggregation: str, *, iters: int = DEFAULT_ITERS,
    seed: int = DEFAULT_SEED, confidence: float = DEFAULT_CONFIDENCE,
) -> PairedTest:
    """The report's test: McNemar's exact p for 0/1 values aggregated by mean, the paired bootstrap's p otherwise;
    the delta's CI is always the paired bootstrap's."""
    boot = paired_bootstrap(a, b, aggregation, iters=iters, seed=seed, confidence=confidence)
    if aggregation == "mean" and is_binary(a) and is_binary(b):
        n10, n01, p = mcnemar(a, b)
        return PairedTest(
            test="McNemar exact", n=boot.n, value_a=boot.value_a, value_b=boot.value_b, delta=boot.delta,
            ci_low=boot.ci_low, ci_high=boot.ci_high, p_value=p, confidence=confidence, iters=iters, seed=seed,
            discordant=(n10, n01),
        )
    return boot


def paired_values(
    doc_ids_a: Sequence[int], values_a: Sequence[Value], doc_ids_b: Sequence[int], values_b: Sequence[Value],
) -> tuple[list[Value], list[Value]]:
    """Both models' values on the documents both scored (the intersection of doc_ids), in A's order."""
    by_a = _by_doc(doc_ids_a, values_a)
    by_b = _by_doc(doc_ids_b, values_b)
    common = [d for d in by_a if d in by_b]
    return [by_a[d] for d in common], [by_b[d] for d in common]


def _by_doc(doc_ids: Sequence[int], values: Sequence[Value]) -> dict[int, Value]:
    if len(doc_ids) != len(values):
        raise QkvconvError(f"{len(doc_ids)} doc_ids but {len(values)} per-document values")
    out = dict(zip(doc_ids, values))
    if len(out) != len(doc_ids):
        raise QkvconvError("per-document values name a doc_id twice; one value per document is expected")
    return out


def _check_pair(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise QkvconvError(f"paired tests need the same documents for both models, got {len(a)} and {len(b)} values")
    if not a:
        raise QkvconvError("paired tests need at least one document scored by both models")
    for v in list(a) + list(b):
        for x in v if isinstance(v, (list, tuple)) else (v,):
            if not isinstance(x, (int, float)) or not math.isfinite(x):  # bools are ints: acc as True/False
                raise QkvconvError(f"per-document values must be finite numbers, got {v!r}")
