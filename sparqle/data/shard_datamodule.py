"""`data=shards`: stream webdataset shards (local paths or pipe: URLs) onto every rank and worker.

Training: sparqle/data/shard_stream.py (deterministic per rank and worker, resumable mid-epoch;
the checkpoint holds every rank's position). Bad samples are skipped and counted per reason; the
counts ride along in each batch.

Evaluation on several ranks: every rank forms the same batches, each `world` times a rank's
bounds, and decodes only its share (item i of a batch goes to rank i % world), so all ranks step
the same number of times and together see exactly what one process would.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict
from typing import Any

import lightning as L
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
from sparqle.data.shard_stream import Epoch, PositionLog, StreamPosition, TrainStream
from sparqle.data.shards import expand_urls, feature_record, total_seconds
from sparqle.data.tasks import TaskSampler
from sparqle.distributed import rank_world

log = logging.getLogger(__name__)


class ShardDataModule(L.LightningDataModule):
    """Sources are named: {name: {urls, weight, tasks}}; `urls` is an index .json, a brace
    pattern or pipe: URLs; a source without `tasks` trains on `data.tasks`. `resampled: true` draws shards with replacement (infinite streams,
    equal on every rank) with an epoch length taken from the index; training on more than one
    rank always streams this way, so every rank takes the same number of steps.
    """

    def __init__(
        self,
        train: Mapping[str, Mapping[str, Any]] | None = None,
        val: Mapping[str, Any] | None = None,
        test: Mapping[str, Any] | None = None,
        sample_rate: int = 16000,
        max_seconds_per_batch: float = 240.0,
        batch_size: int = 64,
        max_tokens: int | None = None,
        token_overhead: int | None = 128,
        min_seconds: float = 0.0,
        max_seconds: float | None = 30.0,
        pool_size: int = 2000,
        shuffle_buffer: int = 1000,
        num_workers: int = 4,
        resampled: bool = False,
        seed: int = 0,
        tasks: Mapping[str, float] | None = None,
        persistent_workers: bool = True,
        pin_memory: bool | None = None,
        pool_mb: float | str | None = "auto",
        text_case: str | None = None,
        global_batch_size: int | None = None,
    ) -> None:
        """`text_case`: lower lowercases every transcript and target, in training, validation and
        evaluation alike (the references scored against too). `global_batch_size`: read by
        train.py, which sets `batch_size` and the accumulation from it (config.apply_global_batch)."""
        super().__init__()
        if token_overhead is None:  # train.py measures it from the LLM's prompt
            if max_tokens is not None:
                raise ValueError(
                    "data.token_overhead=null with data.max_tokens set: give the LLM positions "
                    "per utterance besides its target (train.py measures it)"
                )
            token_overhead = 0
        self.tasks = dict(tasks or {"transcribe": 1.0})
        self.train_sources = {k: dict(v) for k, v in (train or {}).items()}
        self.val_source, self.test_source = val, test
        self.sample_rate = sample_rate
        self.bucket = {
            "max_seconds": max_seconds_per_batch,
            "max_batch_size": batch_size,
            "max_tokens": max_tokens,
            "token_overhead": token_overhead,
        }
        self.min_seconds, self.max_seconds = min_seconds, max_seconds
        self.pool_size, self.shuffle_buffer = pool_size, shuffle_buffer
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers and num_workers > 0
        # page-locked batches copy to the GPU asynchronously; nothing to gain without one
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.resampled = resampled
        self.seed = seed
        self.pool_mb = pool_mb
        self.text_case = text_case
        self._epoch = Epoch()
        self._resume: StreamPosition | None = None
        self._positions: PositionLog | None = None
        for name, src in self.train_sources.items():
            if "urls" not in src:
                raise ValueError(f"data.train.{name}.urls is not set")

    def set_epoch(self, epoch: int) -> None:
        """The shard order (and resampled draws) of each epoch differ, and are the same on a
        rerun; SparQLeModule calls this at every training epoch's start."""
        self._epoch.value = epoch

    def _rank_world(self) -> tuple[int, int]:
        """Taken in the main process and passed into the pipeline: a worker started by spawn or
        forkserver has no process group of its own to ask."""
        return rank_world(self.trainer)

    def _streams_resampled(self) -> bool:
        rank, size = self._rank_world()
        if size > 1 and not self.resampled:
            if rank == 0:
                log.info(
                    "data.resampled=false on %d ranks: shard streams would end after different "
                    "numbers of batches and stall the others, so each rank draws shards with "
                    "replacement for %d batches a worker per epoch (set data.resampled=true to "
                    "silence this)",
                    size,
                    self.batches_per_worker(),
                )
            return True
        return self.resampled

    def _source(self, src: Mapping[str, Any], counter: SkipCounter) -> wds.DataPipeline:
        """An evaluation source: its shards in order, split over workers, every clip once."""
        return wds.DataPipeline(
            wds.SimpleShardList(expand_urls(src["urls"])),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=counter.shard_error),
            lambda raw: parse_samples(
                raw,
                self.sample_rate,
                TaskSampler(dict(src.get("tasks") or self.tasks), self.text_case),
                counter,
                None,
            ),
        )

    def _batches(
        self, counter: SkipCounter, bucket: dict[str, Any], sources: Mapping[str, Mapping[str, Any]]
    ) -> Callable[[Iterable], Iterator[Batch]]:
        """Evaluation: candidates -> bucketed batches -> this rank's share -> decoded, collated.
        The bucket's bounds are per rank: a batch is formed for all ranks at once (`world` times
        the clips, seconds and tokens) and item i goes to rank i % world, so each rank decodes as
        much as one process would and every rank takes the same number of steps.
        `sources` ({config key: source}) tell the feature size where they are feature shards."""
        rank, size = self._rank_world()
        record = feature_record(sources)
        dim = record["hidden_size"] if record else None
        scaled = {
            **bucket,
            "max_batch_size": bucket["max_batch_size"] * size,
            "max_seconds": bucket["max_seconds"] * size,
            "max_tokens": None if bucket.get("max_tokens") is None else bucket["max_tokens"] * size,
        }

        def stage(cands):
            batches = bucket_batches(
                cands, pool_size=self.pool_size, rng=random.Random(self.seed), **scaled
            )
            decoded = (
                (None, decode_batch(b[rank::size], self.sample_rate, counter, dim)) for b in batches
            )
            return (batch for _, batch in batches_with_counts(decoded, counter))

        return stage

    def train_stream(self) -> TrainStream:
        """This rank's training stream (sparqle/data/shard_stream.py), resumed where a loaded
        checkpoint left it."""
        if not self.train_sources:
            raise ValueError("data.train has no sources")
        rank, size = self._rank_world()
        resampled = self._streams_resampled()
        named = {f"data.train.{k}": v for k, v in self.train_sources.items()}
        record = feature_record(named)
        return TrainStream(
            [
                (expand_urls(s["urls"]), s.get("tasks") or self.tasks, float(s.get("weight", 1.0)))
                for s in self.train_sources.values()
            ],
            seed=self.seed,
            epoch=self._epoch,
            rank=rank,
            world=size,
            resampled=resampled,
            batches_per_worker=self.batches_per_worker() if resampled else None,
            sample_rate=self.sample_rate,
            bucket=self.bucket,
            pool_size=self.pool_size,
            shuffle_buffer=self.shuffle_buffer,
            min_seconds=self.min_seconds,
            max_seconds=self.max_seconds,
            feature_dim=record["hidden_size"] if record else None,
            resume=self._resume,
            pool_mb=self.worker_pool_mb(),
            text_case=self.text_case,
        )

    def pipeline(self, split: str) -> Iterable[dict[str, Any]]:
        if split == "train":
            return self.train_stream()
        src = self.val_source if split == "val" else self.test_source
        if not src:
            raise ValueError(f"data.{split} is not set")
        counter = SkipCounter()
        return wds.DataPipeline(
            self._source(src, counter), self._batches(counter, self.bucket, {f"data.{split}": src})
        )

    def eval_dataloader(self, task: str, batch_size: int | None = None) -> wds.WebLoader:
        """The test source (else the validation one), every clip with `task`'s target."""
        src = self.test_source or self.val_source
        if not src:
            raise ValueError("data.test (or data.val) is not set")
        counter = SkipCounter()
        bucket = self.bucket | ({"max_batch_size": batch_size} if batch_size else {})
        # every rank reads every clip's metadata: rank 0 alone counts what is skipped there,
        # so the counts summed over ranks are the one-process counts
        rank, _ = self._rank_world()
        stream = wds.DataPipeline(
            self._source({**src, "tasks": {task: 1.0}}, counter if rank == 0 else SkipCounter()),
            self._batches(counter, bucket, {"data.test" if self.test_source else "data.val": src}),
        )
        return wds.WebLoader(stream, batch_size=None, num_workers=self.num_workers)

    def worker_pool_mb(self) -> float | None:
        """MB a loader worker may hold in waiting samples (shuffle buffer and bucketing pool).
        `auto`: a quarter of this machine's memory shared by every worker of its ranks (the
        ranks on this node: the trainer's devices)."""
        if self.pool_mb != "auto":
            return None if self.pool_mb is None else float(self.pool_mb)
        import os

        node_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
        local = 1
        if self.trainer is not None:
            local = max(1, self.trainer.world_size // max(1, self.trainer.num_nodes))
        return node_mb / 4 / local / max(1, self.num_workers)

    def batches_per_worker(self) -> int:
        """Epoch length for resampled streams: the audio once, spread over ranks and workers. A
        source's audio seconds come from its index, else from its `seconds` key (brace patterns
        and pipe: URLs have no index to read)."""
        seconds = 0.0
        for name, src in self.train_sources.items():
            found = total_seconds(src["urls"]) or src.get("seconds")
            if not found:
                raise ValueError(
                    f"data.train.{name}: the epoch length of a stream on several ranks (or "
                    "data.resampled=true) needs its audio seconds: give an index .json as urls "
                    "(python -m data_prep.make_shards --remote-url writes one for uploaded "
                    f"shards) or data.train.{name}.seconds"
                )
            seconds += float(found)
        _, size = self._rank_world()
        per_batch = self.bucket["max_seconds"] * 0.9  # bucketing fills batches to ~90-99%
        return max(1, math.ceil(seconds / per_batch / size / max(1, self.num_workers)))

    def _loader(self, split: str) -> wds.WebLoader:
        """Workers persist across epochs and validations (no restart, no re-import); the epoch
        reaches them through shared memory."""
        return wds.WebLoader(
            self.pipeline(split),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> PositionLog:
        """Batches with the worker each came from noted, for the checkpoint's data position."""
        self._positions = PositionLog(self._loader("train"), self.num_workers)
        if self._resume is not None:
            self._positions.start = self._resume
        return self._positions

    def state_dict(self) -> dict[str, Any]:
        """Every rank's stream position (gathered: rank 0 writes the checkpoint)."""
        from sparqle.distributed import gather_objects

        if self.trainer is None or self._positions is None:
            return {}
        processed = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        _, size = self._rank_world()
        mine = self._positions.position(self.trainer.current_epoch, size, processed)
        return {"stream_positions": [asdict(p) for p in gather_objects(mine)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        positions = [StreamPosition(**p) for p in state.get("stream_positions", [])]
        if not positions:
            return
        rank, size = self._rank_world()
        if len(positions) != size:
            log.warning(
                "data position saved on %d rank(s), resuming on %d: the interrupted epoch's "
                "streams start afresh on the new layout",
                len(positions),
                size,
            )
            return
        self._resume = positions[rank]

    def val_dataloader(self) -> wds.WebLoader:
        return self._loader("val")

    def test_dataloader(self) -> wds.WebLoader:
        return self._loader("test")
