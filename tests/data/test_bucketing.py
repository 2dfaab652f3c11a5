import random

import numpy as np

from sparqle.data.bucketing import bucket_batches, padded_fraction


def librispeech_like_seconds(n: int, seed: int = 0) -> list[float]:
    """Mostly 10-17 s with a tail of short utterances, as in LibriSpeech's training sets."""
    rng = np.random.default_rng(seed)
    long = np.clip(rng.normal(14.0, 2.5, int(n * 0.85)), 2, 35)
    short = rng.uniform(1.0, 10.0, n - len(long))
    return list(np.concatenate([long, short]))


def _samples(seconds):
    return [{"seconds": float(s), "target": "x" * 40} for s in seconds]


def test_bucketing_keeps_padding_under_five_percent():
    seconds = librispeech_like_seconds(6000)
    samples = _samples(seconds)
    random.Random(0).shuffle(samples)
    batches = list(bucket_batches(samples, max_seconds=240, pool_size=2000))
    lens = [[s["seconds"] for s in b] for b in batches]
    assert sum(map(len, lens)) == len(samples)
    assert all(max(b) * len(b) <= 240 for b in lens)
    bucketed = padded_fraction(lens)
    mean_bs = len(samples) // len(batches)
    flat = [s["seconds"] for s in samples]
    random_batches = [flat[i : i + mean_bs] for i in range(0, len(flat), mean_bs)]
    assert bucketed <= 0.05
    assert padded_fraction(random_batches) > 0.2


def test_token_and_size_bounds():
    samples = _samples([5.0] * 50)
    batches = list(bucket_batches(samples, max_seconds=1000, max_batch_size=7))
    assert max(len(b) for b in batches) == 7
    batches = list(bucket_batches(samples, max_seconds=1000, max_tokens=600, token_overhead=100))
    # each sample estimates 100 + 40 // 3 + 1 = 114 tokens, so 5 fit under 600
    assert max(len(b) for b in batches) == 5
