"""`data=shards`: stream webdataset shards (local paths or pipe: URLs) onto every rank and worker.

shards -> split over workers (training on several ranks: resampled per rank) -> tar samples
-> shuffle -> metadata + task choice (no decoding yet) -> mix sources by weight
-> duration-bucketed batches (on the metadata's `duration`) -> decode -> collate.
Bad samples are skipped and counted per reason; the counts ride along in each batch.

Evaluation on several ranks: every rank forms the same batches and decodes only its share of
each (item i of a batch goes to rank i % world), so all ranks step the same number of times and
together see exactly what one process would.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from multiprocessing.context import get_spawning_popen
from typing import Any

import lightning as L
import torch
import webdataset as wds

from sparqle.data.audio import AudioError, load_audio
from sparqle.data.bucketing import bucket_batches
from sparqle.data.collate import collate
from sparqle.data.shards import (
    FEATURE_IDENTITY,
    FEATURES,
    decode_features,
    index_urls,
    metadata_to_utterance,
    read_index,
)
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


def feature_record(sources: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The `features` record of feature shards' indexes (None for audio shards), from
    {config key: source}; every source must be of one kind and, for features, from one
    encoder and layer."""
    found: dict[str, dict[str, Any] | None] = {}
    for name, src in sources.items():
        urls = src["urls"] if isinstance(src["urls"], list | tuple) else [src["urls"]]
        for u in urls:
            if str(u).endswith(".json"):
                found[f"{name}.urls={u}"] = read_index(u).get("features")
    kinds = {k: v for k, v in found.items() if v is not None}
    if not kinds:
        return None
    if len(kinds) < len(found):
        audio = next(k for k, v in found.items() if v is None)
        raise ValueError(f"{audio}: audio shards, while {next(iter(kinds))} holds features")
    (first, ref), *rest = kinds.items()
    for name, rec in rest:
        if any(rec.get(k) != ref.get(k) for k in (*FEATURE_IDENTITY, "hidden_size")):
            raise ValueError(
                f"{name}: features of {describe_features(rec)}, but {first} holds "
                f"{describe_features(ref)}"
            )
    return ref


def data_features(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """feature_record of a `data=` config (None for data modules other than shards)."""
    if not str(data.get("_target_", "")).endswith("ShardDataModule"):
        return None
    named = {f"data.train.{k}": v for k, v in (data.get("train") or {}).items() if v}
    named |= {f"data.{k}": data[k] for k in ("val", "test") if data.get(k)}
    return feature_record(named)


def describe_features(record: dict[str, Any]) -> str:
    window = record.get("whisper_window_seconds")
    return f"encoder {record.get('encoder')} layer {record.get('layer')}" + (
        f" (window {window} s)" if window else ""
    )


def _worker_index() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


def parse_samples(
    raw: Iterable[dict[str, Any]],
    sample_rate: int,
    tasks: TaskSampler,
    counter: SkipCounter,
    train: bool,
    min_seconds: float = 0.0,
    max_seconds: float | None = None,
    epoch: int = 0,
) -> Iterator[dict[str, Any]]:
    """Tar members -> candidates with metadata, task and duration; the audio stays encoded
    (decoded here only for the rare sample whose metadata has no duration)."""
    rng = random.Random(f"{torch.initial_seed()}:{epoch}") if train else None
    for s in raw:
        where = f"{s.get('__url__', '?')}:{s.get('__key__', '?')}"
        ext = next((e for e in (*AUDIO_EXTENSIONS, FEATURES) if e in s), None)
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
        cand = {"where": where, "utt": utt, "choice": choice, "target": choice.target}
        if ext == FEATURES:
            if not isinstance(meta.get("duration"), (int, float)):
                counter.add("bad metadata", f"{where} (no duration)")
                continue
            cand.update(features=s[ext], seconds=float(meta["duration"]))
        elif isinstance(meta.get("duration"), (int, float)):
            cand.update(encoded=s[ext], seconds=float(meta["duration"]))
        else:
            audio = _decode(s[ext], sample_rate, where, counter)
            if audio is None:
                continue
            cand.update(audio=audio, seconds=len(audio) / sample_rate)
        if cand["seconds"] < min_seconds or (
            max_seconds is not None and cand["seconds"] > max_seconds
        ):
            counter.add("duration out of range", f"{where} ({cand['seconds']:.2f} s)")
            continue
        yield cand


def _decode(encoded: bytes, sample_rate: int, where: str, counter: SkipCounter):
    try:
        return load_audio(encoded, sample_rate, name=where)
    except AudioError as exc:
        msg = str(exc)
        counter.add(
            "empty audio"
            if "empty" in msg
            else "NaN audio"
            if "NaN" in msg
            else "undecodable audio",
            where,
        )
        return None


def decode_batch(
    cands: list[dict[str, Any]],
    sample_rate: int,
    counter: SkipCounter,
    feature_dim: int | None = None,
) -> list[dict[str, Any]]:
    out = []
    for c in cands:
        if "features" in c:
            try:
                if feature_dim is None:
                    raise ValueError("features where the sources' indexes record none")
                feats = decode_features(c["features"], feature_dim)
            except ValueError as exc:
                counter.add(
                    "NaN features" if "NaN" in str(exc) else "bad features", f"{c['where']}: {exc}"
                )
                continue
            samples = round(c["seconds"] * sample_rate)
            out.append(c["choice"].feature_sample(c["utt"], feats, samples))
            continue
        audio = c.get("audio")
        if audio is None:
            audio = _decode(c["encoded"], sample_rate, c["where"], counter)
        if audio is not None:
            out.append(c["choice"].sample(c["utt"], audio))
    return out


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


class _Epoch:
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


def _shard_order(shards: Iterable[dict], seed: int, epoch: _Epoch) -> Iterator[dict]:
    """Every shard once, in an order fixed by (seed, epoch): another order each epoch."""
    shards = list(shards)
    random.Random(f"{seed}:{epoch.value}").shuffle(shards)
    yield from shards


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
    ) -> None:
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
        self._epoch = _Epoch()
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
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        from sparqle.distributed import world

        return world()

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

    def _source(
        self, src: Mapping[str, Any], train: bool, counter: SkipCounter, resampled: bool = False
    ) -> wds.DataPipeline:
        urls = expand_urls(src["urls"])
        tasks = TaskSampler(dict(src.get("tasks") or self.tasks))
        epoch = self._epoch  # read when the loader starts its workers, i.e. once an epoch
        if resampled:
            rank, _ = self._rank_world()
            # a fresh draw each epoch: ResampledShards' own counter would also advance in a
            # persistent worker, and a rerun's epoch N must draw what the first run's did
            stages: list[Any] = [
                lambda: iter(
                    wds.ResampledShards(
                        urls,
                        seed=self.seed,
                        worker_seed=lambda: (epoch.value * 1000 + rank) * 1000 + _worker_index(),
                        deterministic=True,
                    )
                )
            ]
        else:
            stages = [wds.SimpleShardList(urls)]
            if train:
                stages.append(partial(_shard_order, seed=self.seed, epoch=epoch))
            stages.append(wds.split_by_worker)
        stages.append(wds.tarfile_to_samples(handler=counter.shard_error))
        if train:
            stages.append(wds.shuffle(self.shuffle_buffer))
        stages.append(
            lambda raw: parse_samples(
                raw,
                self.sample_rate,
                tasks,
                counter,
                train,
                self.min_seconds if train else 0.0,
                self.max_seconds if train else None,
                epoch.value,
            )
        )
        return wds.DataPipeline(*stages)

    def _batches(
        self,
        counter: SkipCounter,
        seed: int | None,
        bucket: dict[str, Any],
        share: bool,
        sources: Mapping[str, Mapping[str, Any]],
    ) -> Callable[[Iterable], Iterator[dict[str, Any]]]:
        """candidates -> bucketed batches -> (this rank's share) -> decoded, collated batches.
        `sources` ({config key: source}) tell the feature size where they are feature shards."""
        rank, size = self._rank_world() if share else (0, 1)
        record = feature_record(sources)
        dim = record["hidden_size"] if record else None

        def stage(cands):
            rng = random.Random(
                seed if seed is not None else f"{torch.initial_seed()}:{self._epoch.value}"
            )
            batches = bucket_batches(cands, pool_size=self.pool_size, rng=rng, **bucket)
            decoded = (decode_batch(b[rank::size], self.sample_rate, counter, dim) for b in batches)
            return batches_with_counts(decoded, counter)

        return stage

    def pipeline(self, split: str) -> wds.DataPipeline:
        counter = SkipCounter()
        if split == "train":
            if not self.train_sources:
                raise ValueError("data.train has no sources")
            resampled = self._streams_resampled()
            sources = [
                self._source(s, True, counter, resampled) for s in self.train_sources.values()
            ]
            weights = [float(s.get("weight", 1.0)) for s in self.train_sources.values()]
            mixed = (
                sources[0]
                if len(sources) == 1
                else wds.RandomMix(sources, weights, longest=not resampled)
            )
            named = {f"data.train.{k}": v for k, v in self.train_sources.items()}
            pipe = wds.DataPipeline(mixed, self._batches(counter, None, self.bucket, False, named))
            return pipe.with_epoch(self.batches_per_worker()) if resampled else pipe
        src = self.val_source if split == "val" else self.test_source
        if not src:
            raise ValueError(f"data.{split} is not set")
        return wds.DataPipeline(
            self._source(src, False, counter),
            self._batches(counter, self.seed, self.bucket, True, {f"data.{split}": src}),
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
            self._source(
                {**src, "tasks": {task: 1.0}}, False, counter if rank == 0 else SkipCounter()
            ),
            self._batches(
                counter, 0, bucket, True, {"data.test" if self.test_source else "data.val": src}
            ),
        )
        return wds.WebLoader(stream, batch_size=None, num_workers=self.num_workers)

    def batches_per_worker(self) -> int:
        """Epoch length for resampled streams: the indexed audio once, spread over ranks and workers."""
        seconds = sum(total_seconds(s["urls"]) or 0 for s in self.train_sources.values())
        if seconds == 0:
            raise ValueError("resampled mode needs index .json urls to know the epoch length")
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

    def train_dataloader(self) -> wds.WebLoader:
        return self._loader("train")

    def val_dataloader(self) -> wds.WebLoader:
        return self._loader("val")

    def test_dataloader(self) -> wds.WebLoader:
        return self._loader("test")
