"""`data=manifest`: a map-style DataModule over JSONL manifests (the format kept before sharding)."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from sparqle.data.audio import AudioError, load_audio
from sparqle.data.collate import collate
from sparqle.data.manifest import Utterance, read_manifest
from sparqle.data.tasks import TaskSampler
from sparqle.distributed import rank_world

log = logging.getLogger(__name__)


class ManifestDataset(Dataset):
    """Decodes one utterance per item; an unusable clip yields None (counted by collate)."""

    def __init__(
        self,
        utterances: list[Utterance],
        sample_rate: int,
        tasks: TaskSampler,
        train: bool,
        max_seconds: float | None = None,
        seed: int = 0,
        min_seconds: float = 0.0,
    ) -> None:
        self.utterances = utterances
        self.sample_rate = sample_rate
        self.tasks = tasks
        self.train = train
        self.max_seconds = max_seconds
        self.min_seconds = min_seconds
        self.seed = seed

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        """`key` is an index, or (index, epoch) from EpochSampler: the random task and
        instruction then depend on (seed, epoch, index) alone, whatever the worker or resume."""
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        utt = self.utterances[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}") if self.train else None
        choice = self.tasks.choose(utt, rng)
        if choice is None or not choice.target.strip():
            log.warning("skipping %s: no target text for the configured tasks", utt.id)
            return None
        try:
            audio = load_audio(utt.audio, self.sample_rate, name=f"{utt.id} ({utt.audio})")
        except AudioError as exc:
            log.warning("skipping %s", exc)
            return None
        if self.max_seconds is not None and len(audio) > self.max_seconds * self.sample_rate:
            log.warning("skipping %s: longer than data.max_seconds=%s", utt.id, self.max_seconds)
            return None
        if len(audio) < self.min_seconds * self.sample_rate:
            # a clip shorter than one encoder frame would give no features and a NaN loss
            log.warning("skipping %s: shorter than data.min_seconds=%s", utt.id, self.min_seconds)
            return None
        return choice.sample(utt, audio)


class EpochSampler(DistributedSampler):
    """DistributedSampler (seed + epoch permutation, this rank's slice) that yields
    (index, epoch) and can start mid-epoch, so a resumed run sees the batches it had not."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.resume_epoch, self.resume_samples = -1, 0

    def __iter__(self):
        indices = list(super().__iter__())
        if self.epoch == self.resume_epoch:
            indices = indices[self.resume_samples :]
            self.resume_epoch = -1
        return iter([(i, self.epoch) for i in indices])


class RankShareBatches(Sampler[list[int]]):
    """Evaluation batches on `world` ranks: batches of batch_size x world utterances in manifest
    order, item i of each to rank i % world. Every rank gets the same number of batches (the
    last ones may be short or empty), and together the ranks see exactly one pass."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.step, self.rank, self.world = n, batch_size * world, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self.n, self.step):
            yield list(range(start + self.rank, min(start + self.step, self.n), self.world))

    def __len__(self) -> int:
        return math.ceil(self.n / self.step)


class ManifestDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_manifest: str | None = None,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        sample_rate: int = 16000,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        tasks: Mapping[str, float] | None = None,
        val_tasks: Mapping[str, float] | None = None,
        max_seconds: float | None = 30.0,
        seed: int = 0,
        min_seconds: float = 0.2,
        text_case: str | None = None,
        global_batch_size: int | None = None,
    ) -> None:
        """`text_case`: lower lowercases every transcript and target, in training, validation and
        evaluation alike (the references scored against too). `global_batch_size`: read by
        train.py, which sets `batch_size` and the accumulation from it (config.apply_global_batch)."""
        super().__init__()
        self.paths = {"train": train_manifest, "val": val_manifest, "test": test_manifest}
        self.sample_rate = sample_rate
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.text_case = text_case
        self.tasks = TaskSampler(dict(tasks or {"transcribe": 1.0}), text_case)
        self.val_tasks = TaskSampler(dict(val_tasks or tasks or {"transcribe": 1.0}), text_case)
        self.max_seconds = max_seconds
        self.min_seconds = min_seconds
        self.seed = seed
        self.datasets: dict[str, ManifestDataset] = {}
        self._resume: dict[str, int] | None = None

    def setup(self, stage: str | None = None) -> None:
        for split, path in self.paths.items():
            if path and split not in self.datasets:
                train = split == "train"
                self.datasets[split] = ManifestDataset(
                    read_manifest(path),
                    self.sample_rate,
                    self.tasks if train else self.val_tasks,
                    train=train,
                    max_seconds=self.max_seconds if train else None,
                    seed=self.seed,
                    min_seconds=self.min_seconds if train else 0.0,
                )

    def _rank_world(self) -> tuple[int, int]:
        return rank_world(self.trainer)

    def _eval_loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=RankShareBatches(len(dataset), batch_size, *self._rank_world()),
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.datasets:
            raise ValueError("data.train_manifest is not set")
        rank, size = self._rank_world()
        sampler = EpochSampler(self.datasets["train"], num_replicas=size, rank=rank, seed=self.seed)
        if self._resume:
            sampler.resume_epoch = self._resume["epoch"]
            # the position in global samples, so a run resumes on another number of ranks
            seen = self._resume.get("samples", self._resume["batches"] * self.batch_size * size)
            sampler.resume_samples = seen // size
        return DataLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            # each new epoch's iterator draws its workers' base seed from here, not from the global
            # stream a checkpoint saves: a run resumed at an epoch boundary creates that iterator
            # before the stream is restored, and would otherwise be one draw off the uninterrupted run
            generator=torch.Generator().manual_seed(self.seed),
        )

    def eval_dataloader(self, task: str, batch_size: int | None = None) -> DataLoader:
        """The test manifest (else the validation one), every utterance with `task`'s target."""
        path = self.paths["test"] or self.paths["val"]
        if not path:
            raise ValueError("data.test_manifest (or data.val_manifest) is not set")
        dataset = ManifestDataset(
            read_manifest(path),
            self.sample_rate,
            TaskSampler({task: 1.0}, self.text_case),
            train=False,
        )
        return self._eval_loader(dataset, batch_size or self.val_batch_size)

    def state_dict(self) -> dict[str, int]:
        """Where the epoch stood when a checkpoint was written (saved in the checkpoint)."""
        if self.trainer is None:
            return {}
        done = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        samples = done * self.batch_size * self.trainer.world_size
        return {"epoch": self.trainer.current_epoch, "batches": done, "samples": samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state) if state else None

    def val_dataloader(self) -> DataLoader:
        if "val" not in self.datasets:
            raise ValueError("data.val_manifest is not set")
        return self._eval_loader(self.datasets["val"], self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.datasets:
            raise ValueError("data.test_manifest is not set")
        return self._eval_loader(self.datasets["test"], self.val_batch_size)
