"""`data=shards`: stream webdataset shards (local paths or pipe: URLs) onto every rank and worker.

shards -> split by node and worker (or resampled, for multi-node) -> tar samples -> shuffle
-> decode + task choice (bad samples skipped and counted) -> mix sources by weight
-> duration-bucketed batches -> collate. Skip counts ride along in each batch.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
import webdataset as wds

from sparqle.data.audio import AudioError, load_audio
from sparqle.data.bucketing import bucket_batches
from sparqle.data.collate import collate
from sparqle.data.shards import index_urls, metadata_to_utterance, read_index
from sparqle.data.tasks import TaskSampler

log = logging.getLogger(__name__)
AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg")


class SkipCounter:
    """Counts what the pipeline drops, by reason; lives in one worker process."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        log.warning("skipping %s: %s", reason, detail)

    def shard_error(self, exc: Exception) -> bool:
        """webdataset handler: count an unreadable/truncated shard and go on."""
        self.add("unreadable shard", repr(exc))
        return True

    def pop(self) -> dict[str, int]:
        out, self.counts = dict(self.counts), Counter()
        return out


def expand_urls(urls: str | list[str]) -> list[str]:
    """An index .json, a brace pattern, a pipe: URL, or a list of those -> shard URLs."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for u in items:
        out += index_urls(u) if u.endswith(".json") else list(wds.shardlists.expand_urls(u))
    if not out:
        raise ValueError(f"no shards in {urls!r}")
    return out


def total_seconds(urls: str | list[str]) -> float | None:
    items = [urls] if isinstance(urls, str) else list(urls)
    if not all(u.endswith(".json") for u in items):
        return None
    return sum(s["seconds"] for u in items for s in read_index(u)["shards"])


def decode_samples(
    raw: Iterable[dict[str, Any]],
    sample_rate: int,
    tasks: TaskSampler,
    counter: SkipCounter,
    train: bool,
    min_seconds: float = 0.0,
    max_seconds: float | None = None,
) -> Iterator[dict[str, Any]]:
    rng = random.Random(torch.initial_seed()) if train else None
    for s in raw:
        where = f"{s.get('__url__', '?')}:{s.get('__key__', '?')}"
        ext = next((e for e in AUDIO_EXTENSIONS if e in s), None)
        try:
            meta = json.loads(s["json"])
        except (KeyError, ValueError, TypeError):
            counter.add("bad metadata", where)
            continue
        if ext is None:
            counter.add("no audio", where)
            continue
        utt = metadata_to_utterance(meta, s["__key__"])
        choice = tasks.choose(utt, rng)
        if choice is None or not choice.target.strip():
            counter.add("no text", where)
            continue
        try:
            audio = load_audio(s[ext], sample_rate, name=where)
        except AudioError as exc:
            counter.add(
                "empty audio"
                if "empty" in str(exc)
                else "NaN audio"
                if "NaN" in str(exc)
                else "undecodable audio",
                where,
            )
            continue
        seconds = len(audio) / sample_rate
        if seconds < min_seconds or (max_seconds is not None and seconds > max_seconds):
            counter.add("duration out of range", f"{where} ({seconds:.2f} s)")
            continue
        yield choice.sample(utt, audio)


def batches_with_counts(
    batches: Iterable[list[dict]], counter: SkipCounter
) -> Iterator[dict[str, Any]]:
    """Collate, attaching the skips seen so far; one batch is held back so none are lost at the end."""
    held = None
    for b in batches:
        if held is not None:
            yield _finish(held, counter)
        held = b
    if held is not None:
        yield _finish(held, counter)


def _finish(samples: list[dict], counter: SkipCounter) -> dict[str, Any]:
    batch = collate(samples)
    batch["skipped"] = counter.pop()
    batch["num_skipped"] = sum(batch["skipped"].values())
    return batch


class ShardDataModule(L.LightningDataModule):
    """Sources are named: {name: {urls, weight, tasks}}; `urls` is an index .json, a brace
    pattern or pipe: URLs. `resampled: true` draws shards with replacement (infinite streams,
    equal on every rank: the mode for multi-GPU) with an epoch length taken from the index.
    """

    def __init__(
        self,
        train: Mapping[str, Mapping[str, Any]] | None = None,
        val: Mapping[str, Any] | None = None,
        test: Mapping[str, Any] | None = None,
        sample_rate: int = 16000,
        max_seconds_per_batch: float = 240.0,
        max_batch_size: int = 64,
        max_tokens: int | None = None,
        token_overhead: int = 128,
        min_seconds: float = 0.0,
        max_seconds: float | None = 30.0,
        pool_size: int = 2000,
        shuffle_buffer: int = 1000,
        num_workers: int = 4,
        resampled: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_sources = {k: dict(v) for k, v in (train or {}).items()}
        self.val_source, self.test_source = val, test
        self.sample_rate = sample_rate
        self.bucket = {
            "max_seconds": max_seconds_per_batch,
            "max_batch_size": max_batch_size,
            "max_tokens": max_tokens,
            "token_overhead": token_overhead,
            "sample_rate": sample_rate,
        }
        self.min_seconds, self.max_seconds = min_seconds, max_seconds
        self.pool_size, self.shuffle_buffer = pool_size, shuffle_buffer
        self.num_workers = num_workers
        self.resampled = resampled
        self.seed = seed
        for name, src in self.train_sources.items():
            if "urls" not in src:
                raise ValueError(f"data.train.{name}.urls is not set")

    def _source(
        self, src: Mapping[str, Any], train: bool, counter: SkipCounter
    ) -> wds.DataPipeline:
        urls = expand_urls(src["urls"])
        tasks = TaskSampler(dict(src.get("tasks") or {"transcribe": 1.0}))
        if train and self.resampled:
            stages: list[Any] = [wds.ResampledShards(urls, seed=self.seed)]
        else:
            stages = [wds.SimpleShardList(urls)]
            if train:  # the same permutation on every rank, so the split stays a partition
                stages.append(wds.detshuffle(bufsize=len(urls), seed=self.seed))
            stages += [wds.split_by_node, wds.split_by_worker]
        stages.append(wds.tarfile_to_samples(handler=counter.shard_error))
        if train:
            stages.append(wds.shuffle(self.shuffle_buffer))
        stages.append(
            lambda raw: decode_samples(
                raw,
                self.sample_rate,
                tasks,
                counter,
                train,
                self.min_seconds if train else 0.0,
                self.max_seconds if train else None,
            )
        )
        return wds.DataPipeline(*stages)

    def pipeline(self, split: str) -> wds.DataPipeline:
        counter = SkipCounter()
        if split == "train":
            if not self.train_sources:
                raise ValueError("data.train has no sources")
            sources = [self._source(s, True, counter) for s in self.train_sources.values()]
            weights = [float(s.get("weight", 1.0)) for s in self.train_sources.values()]
            mixed = (
                sources[0]
                if len(sources) == 1
                else wds.RandomMix(sources, weights, longest=not self.resampled)
            )
            pool = self.pool_size
        else:
            src = self.val_source if split == "val" else self.test_source
            if not src:
                raise ValueError(f"data.{split} is not set")
            mixed, pool = self._source(src, False, counter), self.pool_size
        rng_seed = self.seed if split != "train" else None

        def batches(samples):
            rng = random.Random(rng_seed if rng_seed is not None else torch.initial_seed())
            return batches_with_counts(
                bucket_batches(samples, pool_size=pool, rng=rng, **self.bucket), counter
            )

        pipe = wds.DataPipeline(mixed, batches)
        if split == "train" and self.resampled:
            pipe = pipe.with_epoch(self.batches_per_worker())
        return pipe

    def eval_dataloader(self, task: str, batch_size: int | None = None) -> wds.WebLoader:
        """The test source (else the validation one), every clip with `task`'s target."""
        src = self.test_source or self.val_source
        if not src:
            raise ValueError("data.test (or data.val) is not set")
        counter = SkipCounter()
        pipe = self._source({**src, "tasks": {task: 1.0}}, False, counter)
        bucket = self.bucket | ({"max_batch_size": batch_size} if batch_size else {})
        stream = wds.DataPipeline(
            pipe,
            lambda s: batches_with_counts(
                bucket_batches(s, pool_size=self.pool_size, rng=random.Random(0), **bucket), counter
            ),
        )
        return wds.WebLoader(stream, batch_size=None, num_workers=self.num_workers)

    def batches_per_worker(self) -> int:
        """Epoch length for resampled streams: the indexed audio once, spread over ranks and workers."""
        seconds = sum(total_seconds(s["urls"]) or 0 for s in self.train_sources.values())
        if seconds == 0:
            raise ValueError("resampled mode needs index .json urls to know the epoch length")
        world = self.trainer.world_size if self.trainer is not None else 1
        per_batch = self.bucket["max_seconds"] * 0.9  # bucketing fills batches to ~90-99%
        return max(1, math.ceil(seconds / per_batch / world / max(1, self.num_workers)))

    def _loader(self, split: str) -> wds.WebLoader:
        return wds.WebLoader(
            self.pipeline(split),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def train_dataloader(self) -> wds.WebLoader:
        return self._loader("train")

    def val_dataloader(self) -> wds.WebLoader:
        return self._loader("val")

    def test_dataloader(self) -> wds.WebLoader:
        return self._loader("test")
