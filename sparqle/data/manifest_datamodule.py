"""`data=manifest`: a map-style DataModule over JSONL manifests (the format kept before sharding)."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from sparqle.data.audio import AudioError, load_audio
from sparqle.data.collate import collate
from sparqle.data.manifest import Utterance, read_manifest
from sparqle.data.tasks import TaskSampler

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
    ) -> None:
        self.utterances = utterances
        self.sample_rate = sample_rate
        self.tasks = tasks
        self.train = train
        self.max_seconds = max_seconds
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
    ) -> None:
        super().__init__()
        self.paths = {"train": train_manifest, "val": val_manifest, "test": test_manifest}
        self.sample_rate = sample_rate
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.tasks = TaskSampler(dict(tasks or {"transcribe": 1.0}))
        self.val_tasks = TaskSampler(dict(val_tasks or tasks or {"transcribe": 1.0}))
        self.max_seconds = max_seconds
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
                )

    def _loader(self, split: str, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"data.{split}_manifest is not set")
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.datasets:
            raise ValueError("data.train_manifest is not set")
        trainer = self.trainer
        sampler = EpochSampler(
            self.datasets["train"],
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            seed=self.seed,
        )
        if self._resume:
            sampler.resume_epoch = self._resume["epoch"]
            sampler.resume_samples = self._resume["batches"] * self.batch_size
        return self._loader("train", self.batch_size, sampler)

    def eval_dataloader(self, task: str, batch_size: int | None = None) -> DataLoader:
        """The test manifest (else the validation one), every utterance with `task`'s target."""
        path = self.paths["test"] or self.paths["val"]
        if not path:
            raise ValueError("data.test_manifest (or data.val_manifest) is not set")
        dataset = ManifestDataset(
            read_manifest(path), self.sample_rate, TaskSampler({task: 1.0}), train=False
        )
        return DataLoader(
            dataset,
            batch_size=batch_size or self.val_batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
        )

    def state_dict(self) -> dict[str, int]:
        """Where the epoch stood when a checkpoint was written (saved in the checkpoint)."""
        if self.trainer is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "batches": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state) if state else None

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size)
