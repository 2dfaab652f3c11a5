"""Duration-bucketed dynamic batching for streamed samples.

A pool of samples is sorted by duration and cut into batches whose padded audio stays under
`max_seconds` (and whose estimated LLM tokens stay under `max_tokens`); the batches of a pool
are then shuffled. Sorting inside a large pool keeps padding to a few percent. Samples carry
`seconds` (from the shard's metadata) and `target`, so bucketing runs before any audio is
decoded: a pool holds encoded clips, not waveforms.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Sample = dict[str, Any]


def estimated_tokens(sample: Sample, per_sample_overhead: int) -> int:
    """A cheap LLM-token estimate: ~3 bytes per token of target, plus prompt and speech tokens."""
    return per_sample_overhead + len(sample["target"].encode()) // 3 + 1


def pool_to_batches(
    pool: list[Sample],
    max_seconds: float,
    max_batch_size: int,
    max_tokens: int | None,
    token_overhead: int,
) -> list[list[Sample]]:
    pool = sorted(pool, key=lambda s: s["seconds"])
    batches, current, longest, tokens_longest = [], [], 0.0, 0
    for s in pool:
        n = s["seconds"]
        tok = estimated_tokens(s, token_overhead)
        new_longest, new_tok = max(longest, n), max(tokens_longest, tok)
        size = len(current) + 1
        too_long = size * new_longest > max_seconds
        too_many_tokens = max_tokens is not None and size * new_tok > max_tokens
        if current and (too_long or too_many_tokens or size > max_batch_size):
            batches.append(current)
            current, new_longest, new_tok = [], n, tok
        current.append(s)
        longest, tokens_longest = new_longest, new_tok
    if current:
        batches.append(current)
    return batches


def sample_bytes(sample: Sample) -> int:
    """What a waiting sample holds in memory: its encoded audio or features (or decoded audio)."""
    for key in ("encoded", "features"):
        if key in sample:
            return len(sample[key])
    audio = sample.get("audio")
    return int(getattr(audio, "nbytes", 0))


def bucket_batches(
    samples: Iterable[Sample],
    max_seconds: float,
    max_batch_size: int = 256,
    max_tokens: int | None = None,
    pool_size: int = 2000,
    token_overhead: int = 128,
    rng: random.Random | None = None,
    pool_bytes: int | None = None,
) -> Iterator[list[Sample]]:
    """Pools of `pool_size` samples (or fewer, where they reach `pool_bytes` first) sorted by
    duration and cut into batches, each pool's batches shuffled."""
    rng = rng or random.Random(0)
    pool: list[Sample] = []
    held = 0
    for s in samples:
        pool.append(s)
        held += sample_bytes(s) if pool_bytes else 0
        if len(pool) >= pool_size or (pool_bytes and held >= pool_bytes):
            batches = pool_to_batches(pool, max_seconds, max_batch_size, max_tokens, token_overhead)
            rng.shuffle(batches)
            yield from batches
            pool, held = [], 0
    if pool:
        batches = pool_to_batches(pool, max_seconds, max_batch_size, max_tokens, token_overhead)
        rng.shuffle(batches)
        yield from batches


def padded_fraction(batches: Iterable[list[int]]) -> float:
    """Share of padding in padded batches, given each batch's lengths."""
    pad = total = 0
    for lens in batches:
        if lens:
            total += max(lens) * len(lens)
            pad += max(lens) * len(lens) - sum(lens)
    return pad / total if total else 0.0


def as_stage(fn: Callable[..., Iterator], **kwargs) -> Callable[[Iterable], Iterator]:
    """A webdataset pipeline stage from a generator function and its options."""
    return lambda src: fn(src, **kwargs)
