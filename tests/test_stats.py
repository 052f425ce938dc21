"""Paired tests on constructed cases whose answers are known in closed form."""

from __future__ import annotations

import math
import random

import pytest

from qkvconv.errors import QkvconvError
from qkvconv.stats import mcnemar, paired_bootstrap, paired_test, paired_values


def test_mcnemar_exact_p_of_one_sided_discordance():
    # 10 documents only A gets right, none only B: p = P(X=10) + P(X=0) for X ~ Bin(10, 1/2) = 2 * 0.5**10
    a = [1] * 10 + [1] * 5 + [0] * 7
    b = [0] * 10 + [1] * 5 + [0] * 7
    assert mcnemar(a, b) == (10, 0, 2 * 0.5**10)
    # b=3, c=1: two-sided exact p = 2 * P(X <= 1 | n=4) = 2 * (1 + 4) / 16
    n10, n01, p = mcnemar([1, 1, 1, 0, 1], [0, 0, 0, 1, 1])
    assert (n10, n01) == (3, 1) and p == pytest.approx(10 / 16)
    t = paired_test(a, b, "mean", iters=500)
    assert t.test == "McNemar exact" and t.discordant == (10, 0) and t.p_value == 2 * 0.5**10 and t.significant
    assert t.delta == pytest.approx(10 / 22) and t.value_a == pytest.approx(15 / 22)


def test_identical_models_have_delta_zero_and_p_one():
    rng = random.Random(0)
    acc = [rng.randint(0, 1) for _ in range(50)]
    ll = [-rng.random() * 5 for _ in range(50)]
    pairs = [[-rng.random() * 100, rng.randint(10, 30)] for _ in range(20)]
    for values, agg in [(acc, "mean"), (ll, "perplexity"), (pairs, "weighted_perplexity"), (pairs, "bits_per_byte")]:
        t = paired_test(values, list(values), agg, iters=300)
        assert t.delta == 0 and t.p_value == 1 and (t.ci_low, t.ci_high) == (0, 0) and not t.significant, agg


def test_bootstrap_of_a_shifted_perplexity_excludes_zero():
    rng = random.Random(1)
    ref = [-2 - rng.random() for _ in range(200)]  # loglikelihoods per document
    better = [x + 0.05 + 0.02 * rng.gauss(0, 1) for x in ref]  # every document a little more likely
    t = paired_bootstrap(better, ref, "perplexity", iters=2000, seed=7)
    # perplexity = exp(-mean ll): lm-eval's aggregation, recomputed here in closed form
    expected = math.exp(-sum(better) / 200) - math.exp(-sum(ref) / 200)
    assert t.delta == pytest.approx(expected)
    assert t.ci_high < 0 and t.ci_low < t.delta < t.ci_high
    assert t.p_value == pytest.approx(1 / 2001) and t.significant
    # noise without a shift: CI covers 0, p large
    noise = [x + 0.3 * rng.gauss(0, 1) for x in ref]
    noisy = paired_bootstrap([x - sum(n - r for n, r in zip(noise, ref)) / 200 for x in noise], ref, "perplexity",
                             iters=2000, seed=7)
    assert noisy.ci_low < 0 < noisy.ci_high and noisy.p_value > 0.5


def test_bootstrap_is_seeded_and_pairs_documents():
    rng = random.Random(2)
    a = [[-rng.random() * 50, rng.randint(5, 10)] for _ in range(30)]
    b = [[x - 1.0, n] for x, n in a]
    one = paired_bootstrap(a, b, "weighted_perplexity", iters=400, seed=3)
    assert one == paired_bootstrap(a, b, "weighted_perplexity", iters=400, seed=3)
    assert one != paired_bootstrap(a, b, "weighted_perplexity", iters=400, seed=4)
    # pairing: B loses 0.1 nats on every byte of every document, so every resample (the same documents for both)
    # has the same bits_per_byte delta, 0.1 / ln 2; unpaired resampling would spread it
    worse = [[x - 0.1 * n, n] for x, n in a]
    t = paired_bootstrap(a, worse, "bits_per_byte", iters=400)
    assert t.delta == pytest.approx(-0.1 / math.log(2))
    assert t.ci_low == pytest.approx(t.delta) and t.ci_high == pytest.approx(t.delta) and t.significant


def test_paired_values_take_the_intersection_in_a_order():
    va, vb = paired_values([3, 1, 2, 7], [0.3, 0.1, 0.2, 0.7], [2, 3, 9], [2.0, 3.0, 9.0])
    assert (va, vb) == ([0.3, 0.2], [3.0, 2.0])
    with pytest.raises(QkvconvError, match="twice"):
        paired_values([1, 1], [0, 1], [1], [0])
    with pytest.raises(QkvconvError, match="doc_ids but"):
        paired_values([1, 2], [0], [1], [0])


def test_bad_inputs_are_one_clear_error():
    with pytest.raises(QkvconvError, match="same documents"):
        paired_bootstrap([1, 0], [1], "mean")
    with pytest.raises(QkvconvError, match="at least one document"):
        paired_bootstrap([], [], "mean")
    with pytest.raises(QkvconvError, match="unknown lm-eval aggregation 'meen'"):
        paired_bootstrap([1], [0], "meen")
    with pytest.raises(QkvconvError, match="0/1 values"):
        mcnemar([0.5], [1])
    with pytest.raises(QkvconvError, match="finite"):
        paired_bootstrap([float("nan")], [0.0], "mean")
