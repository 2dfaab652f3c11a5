"""Samples -> a padded batch. Dropped samples (None) are counted, never fatal."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def collate(samples: list[dict[str, Any] | None]) -> dict[str, Any]:
    good = [s for s in samples if s is not None]
    if good and "features" in good[0]:
        return _collate_features(good, len(samples) - len(good))
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


def _collate_features(good: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    """Feature-shard samples: (B, frames, dim) features as stored (bf16 stays bf16), their
    frame counts, and the clips' lengths in samples (audio seconds for throughput figures)."""
    feats = [s["features"] for s in good]
    batch: dict[str, Any] = {
        "features": torch.nn.utils.rnn.pad_sequence(feats, batch_first=True),
        "feature_lens": torch.tensor([f.shape[0] for f in feats], dtype=torch.long),
        "audio_lens": torch.tensor([s["audio_samples"] for s in good], dtype=torch.long),
        "num_skipped": skipped,
    }
    for key in ("id", "text", "task", "lang", "instruction", "target"):
        batch[key] = [s[key] for s in good]
    return batch
