"""`data=manifest`: a map-style DataModule over JSONL manifests (the format kept before sharding)."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

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
    ) -> None:
        self.utterances = utterances
        self.sample_rate = sample_rate
        self.tasks = tasks
        self.train = train
        self.max_seconds = max_seconds

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        utt = self.utterances[index]
        # Drawn from torch's generator, which Lightning seeds per worker and per epoch.
        rng = random.Random(int(torch.randint(2**62, ()))) if self.train else None
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
        return {
            "id": utt.id,
            "audio": audio,
            "text": utt.text,
            "task": choice.task,
            "lang": choice.lang,
            "instruction": choice.instruction,
            "target": choice.target,
        }


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
        self.datasets: dict[str, ManifestDataset] = {}

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
                )

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"data.{split}_manifest is not set")
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.val_batch_size)
