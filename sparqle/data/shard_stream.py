"""The training stream of `data=shards`: webdataset shards -> decoded, collated batches, the same
batches in the same order on a rerun, and resumable mid-epoch.

Per rank and loader worker, one stream whose every random choice (shard order or draws, the
shuffle buffer, task choice, source mixing, batch bucketing) comes from a generator seeded by
(seed, epoch, rank, worker, what) alone: nothing from the process's global state, so a resumed
run draws what the uninterrupted one drew.

    shards (this worker's share of the epoch's order; several ranks: drawn with replacement)
    -> tar samples -> shuffle buffer -> metadata + task choice (no decoding yet)
    -> mix sources by weight -> duration-bucketed batches -> [skip what was consumed]
    -> decode -> collate, tagged (worker, index)

Resuming (`StreamPosition`): each worker's stream is rebuilt and fast-forwarded over the batches
it had delivered, on metadata only (tar members are read, no audio is decoded), and the loader's
workers take their roles rotated so that the worker whose batch came next comes first: the
loader's round-robin then continues exactly where it stood.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np
import torch
import webdataset as wds

from sparqle.data.batch import Batch
from sparqle.data.bucketing import bucket_batches
from sparqle.data.shard_samples import (
    SkipCounter,
    batches_with_counts,
    decode_batch,
    parse_samples,
)
from sparqle.data.tasks import TaskSampler

log = logging.getLogger(__name__)


class Epoch:
    """The epoch number, in shared memory so that persistent loader workers, which keep their
    copy of the pipeline from one epoch to the next, read the number the trainer set."""

    def __init__(self) -> None:
        self._shared = multiprocessing.RawValue("q", 0)

    @property
    def value(self) -> int:
        return self._shared.value

    @value.setter
    def value(self, epoch: int) -> None:
        self._shared.value = epoch

    def __getstate__(self) -> dict:
        # shared memory travels only to the processes being started (loader workers); any other
        # copy (a pickled DataModule) takes the number as it stands
        if get_spawning_popen() is None:
            return {"plain": self.value}
        return {"shared": self._shared}

    def __setstate__(self, state: dict) -> None:
        if "shared" in state:
            self._shared = state["shared"]
        else:
            self.__init__()
            self.value = state["plain"]


def bounded_shuffle(
    samples: Iterable[dict], size: int, max_bytes: int | None, rng: random.Random
) -> Iterator[dict]:
    """A shuffle buffer of up to `size` samples, or fewer where their bytes reach `max_bytes`:
    each new sample goes in, and while the buffer is full a random one comes out."""
    buffer: list[dict] = []
    held = 0
    for sample in samples:
        buffer.append(sample)
        held += _raw_bytes(sample)
        while len(buffer) >= size or (max_bytes and held >= max_bytes and len(buffer) > 1):
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            out = buffer.pop()
            held -= _raw_bytes(out)
            yield out
    rng.shuffle(buffer)
    yield from buffer


def _raw_bytes(sample: dict) -> int:
    return sum(len(v) for v in sample.values() if isinstance(v, bytes | bytearray))


def seeded(*parts: Any) -> random.Random:
    """A generator that depends on `parts` alone (str seeds hash deterministically)."""
    return random.Random(":".join(map(str, parts)))


def mix(
    sources: list[Iterator[dict]], weights: list[float], rng: random.Random, longest: bool
) -> Iterator[dict]:
    """Draw each next candidate from a source chosen by weight (webdataset's RandomMix, with a
    generator of its own); `longest`: until every source is dry, else until the first is."""
    sources, weights = list(sources), list(weights)
    while sources:
        cum = np.cumsum(np.asarray(weights) / np.sum(weights))
        i = min(int(np.searchsorted(cum, rng.random())), len(sources) - 1)
        try:
            yield next(sources[i])
        except StopIteration:
            if not longest:
                return
            del sources[i], weights[i]


@dataclass
class StreamPosition:
    """Where an epoch's training stream stood: per worker, how many batches the loop consumed;
    `next_worker`, whose batch came next. Valid for the same ranks x workers layout only."""

    epoch: int
    world: int
    workers: int
    consumed: dict[int, int] = field(default_factory=dict)
    next_worker: int = 0


class PositionLog:
    """Wraps the training loader in the main process: records which worker's batch each one
    was, so the position can be cut at the number of batches the loop actually consumed
    (Lightning fetches one ahead)."""

    def __init__(self, loader: Iterable[Batch], workers: int) -> None:
        self.loader, self.workers = loader, max(1, workers)
        self.delivered: list[tuple[int, int]] = []
        self.start = StreamPosition(0, 1, self.workers)

    def __iter__(self) -> Iterator[Batch]:
        self.delivered = []
        for batch in self.loader:
            self.delivered.append(batch.stream)
            batch.stream = None
            yield batch

    def position(self, epoch: int, world: int, processed: int) -> StreamPosition:
        """After `processed` batches of `epoch` (this rank's), counting those a resumed epoch
        had consumed before it started."""
        start = (
            self.start if self.start.epoch == epoch else StreamPosition(epoch, world, self.workers)
        )
        consumed = dict(start.consumed)
        fresh = self.delivered[: max(0, processed - sum(start.consumed.values()))]
        for worker, index in fresh:
            consumed[worker] = max(consumed.get(worker, 0), index + 1)
        if len(self.delivered) > len(fresh):
            next_worker = self.delivered[len(fresh)][0]
        elif fresh:
            next_worker = (fresh[-1][0] + 1) % self.workers
        else:
            next_worker = start.next_worker
        return StreamPosition(epoch, world, self.workers, consumed, next_worker)


class TrainStream(torch.utils.data.IterableDataset):
    """One rank's training stream (see the module docstring); iterated once per epoch by each
    loader worker. `sources`: [(urls, tasks, weight)]; `batches_per_worker`: the epoch length of
    resampled streams (None: every shard of the split once)."""

    def __init__(
        self,
        sources: list[tuple[list[str], Mapping[str, float], float]],
        *,
        seed: int,
        epoch: Epoch,
        rank: int,
        world: int,
        resampled: bool,
        batches_per_worker: int | None,
        sample_rate: int,
        bucket: Mapping[str, Any],
        pool_size: int,
        shuffle_buffer: int,
        min_seconds: float,
        max_seconds: float | None,
        feature_dim: int | None,
        resume: StreamPosition | None = None,
        pool_mb: float | None = None,
        text_case: str | None = None,
    ) -> None:
        super().__init__()
        self.sources = sources
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        self.resampled, self.batches_per_worker = resampled, batches_per_worker
        self.sample_rate, self.bucket = sample_rate, dict(bucket)
        self.pool_size, self.shuffle_buffer = pool_size, shuffle_buffer
        self.min_seconds, self.max_seconds = min_seconds, max_seconds
        self.feature_dim = feature_dim
        self.resume = resume
        self.text_case = text_case
        # a worker's memory for waiting samples: a third for the shuffle buffer, the rest for
        # the bucketing pool (None: bounded by their sample counts alone)
        total = None if pool_mb is None else int(pool_mb * 2**20)
        self.shuffle_bytes = None if total is None else total // 3
        self.pool_bytes = None if total is None else total - total // 3

    def _shards(self, urls: list[str], source: int, worker: int, workers: int, epoch: int):
        key = (self.seed, epoch, self.rank, worker, source)
        if self.resampled:  # with replacement, for as long as the stream is read
            rng = seeded(*key, "draws")
            while True:
                yield {"url": rng.choice(urls)}
        order = list(urls)
        seeded(self.seed, epoch, source, "order").shuffle(order)  # the same on every worker
        for url in order[worker::workers]:
            yield {"url": url}

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.epoch.value
        resume = self.resume
        if resume is not None and (resume.epoch, resume.world, resume.workers) != (
            epoch,
            self.world,
            workers,
        ):
            resume = None
        worker = (physical + resume.next_worker) % workers if resume else physical
        skip = resume.consumed.get(worker, 0) if resume else 0
        key = (self.seed, epoch, self.rank, worker)
        counter = SkipCounter()
        streams = []
        for i, (urls, tasks, _) in enumerate(self.sources):
            raw = wds.tarfile_to_samples(handler=counter.shard_error)(
                self._shards(urls, i, worker, workers, epoch)
            )
            shuffled = bounded_shuffle(
                raw, self.shuffle_buffer, self.shuffle_bytes, seeded(*key, i, "shuffle")
            )
            streams.append(
                parse_samples(
                    shuffled,
                    self.sample_rate,
                    TaskSampler(dict(tasks), self.text_case),
                    counter,
                    seeded(*key, i, "tasks"),
                    self.min_seconds,
                    self.max_seconds,
                )
            )
        weights = [w for _, _, w in self.sources]
        cands = (
            streams[0]
            if len(streams) == 1
            else mix(streams, weights, seeded(*key, "mix"), longest=not self.resampled)
        )
        batches = bucket_batches(
            cands,
            pool_size=self.pool_size,
            pool_bytes=self.pool_bytes,
            rng=seeded(*key, "bucket"),
            **self.bucket,
        )
        batches = itertools.islice(enumerate(batches), self.batches_per_worker)
        for _ in itertools.islice(batches, skip):  # fast-forward: metadata only
            pass
        if skip:
            counter.pop()  # counted in the run that consumed them
        decoded = (
            (index, decode_batch(b, self.sample_rate, counter, self.feature_dim))
            for index, b in batches
        )
        for index, batch in batches_with_counts(decoded, counter):
            batch.stream = (worker, index)
            yield batch
