"""Samples -> a padded batch. Dropped samples (None) are counted, never fatal."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def collate(samples: list[dict[str, Any] | None]) -> dict[str, Any]:
    good = [s for s in samples if s is not None]
    lens = [len(s["audio"]) for s in good]
    audio = np.empty((len(good), max(lens, default=0)), dtype=np.float32)
    for i, s in enumerate(good):
        audio[i, : lens[i]] = s["audio"]
        audio[i, lens[i] :] = 0.0
    batch: dict[str, Any] = {
        "audio": torch.from_numpy(audio),
        "audio_lens": torch.tensor(lens, dtype=torch.long),
        "num_skipped": len(samples) - len(good),
    }
    for key in ("id", "text", "task", "lang", "instruction", "target"):
        batch[key] = [s[key] for s in good]
    return batch
