"""Sampling is pure numpy: logits + RNG + params -> token ids. Checked against direct computations."""

import random

import numpy as np
import pytest

from edgecraft.runtime.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filtered_logits,
    sample,
)

LOGITS = np.array([[1.0, 3.0, 2.0, -1.0, 0.5], [0.0, -2.0, 4.0, 1.0, 3.5]], dtype=np.float32)  # (2, 5)


def draws(params: SamplingParams, n: int = 2000, seed: int = 0, logits=LOGITS, seen=None) -> np.ndarray:
    rng = random.Random(seed)
    return np.stack([sample(logits, rng, params, seen) for _ in range(n)])  # (n, B)


def test_greedy_is_argmax_and_ignores_the_rng():
    ids = sample(LOGITS, random.Random(0), SamplingParams(temperature=0))
    assert ids.tolist() == [1, 2]
    assert ids.dtype == np.int64


def test_top_k_restricts_support_to_the_k_largest():
    got = draws(SamplingParams(temperature=1.0, top_k=2))
    assert set(got[:, 0]) == {1, 2}
    assert set(got[:, 1]) == {2, 4}


def test_top_k_one_is_greedy():
    assert (draws(SamplingParams(temperature=5.0, top_k=1), n=50) == [1, 2]).all()


def test_top_p_keeps_the_nucleus_and_renormalises():
    params = SamplingParams(temperature=1.0, top_p=0.8)
    p = np.exp(LOGITS[0].astype(np.float64))
    p /= p.sum()  # token 1: 0.61, token 2: 0.22 -> {1, 2} holds 0.83 >= 0.8
    z = filtered_logits(LOGITS, params)
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    expected = np.zeros(5)
    expected[[1, 2]] = p[[1, 2]] / p[[1, 2]].sum()
    np.testing.assert_allclose(probs[0], expected, rtol=1e-12)
    assert set(draws(params)[:, 0]) == {1, 2}


def test_tiny_top_p_keeps_the_most_likely_token():
    assert (draws(SamplingParams(temperature=1.0, top_p=1e-9), n=50) == [1, 2]).all()


def test_sampling_frequencies_follow_the_softmax_with_temperature():
    got = draws(SamplingParams(temperature=2.0), n=20000)[:, 0]
    p = np.exp(LOGITS[0].astype(np.float64) / 2.0)
    p /= p.sum()
    np.testing.assert_allclose(np.bincount(got, minlength=5) / len(got), p, atol=0.015)


def test_same_seed_same_tokens_different_seed_different_tokens():
    params = SamplingParams(temperature=1.0)
    assert (draws(params, n=200, seed=7) == draws(params, n=200, seed=7)).all()
    assert (draws(params, n=200, seed=7) != draws(params, n=200, seed=8)).any()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    seen = np.zeros((2, 5), dtype=bool)
    seen[0, [1, 3]] = True
    out = apply_repetition_penalty(LOGITS, seen, 2.0)
    np.testing.assert_allclose(out[0], [1.0, 1.5, 2.0, -2.0, 0.5])
    np.testing.assert_allclose(out[1], LOGITS[1])
    assert LOGITS[0, 1] == 3.0  # input untouched
    # greedy with a strong penalty moves row 0 off its seen favourite
    assert sample(LOGITS, random.Random(0), SamplingParams(0, repetition_penalty=2.0), seen).tolist() == [2, 2]


def test_repetition_penalty_without_seen_is_an_error():
    with pytest.raises(ValueError, match="seen"):
        sample(LOGITS, random.Random(0), SamplingParams(0, repetition_penalty=1.3))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_invalid_parameters_are_rejected_not_clamped(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)
