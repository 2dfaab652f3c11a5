"""Samples -> a padded `Batch` (sparqle/data/batch.py). Dropped samples (None) are counted,
never fatal."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sparqle.data.batch import Batch

TEXTS = ("id", "text", "task", "lang", "instruction", "target")


def collate(samples: list[dict[str, Any] | None]) -> Batch:
    good = [s for s in samples if s is not None]
    texts = {key: [s[key] for s in good] for key in TEXTS}
    skipped = len(samples) - len(good)
    if good and "features" in good[0]:
        # feature shards: (B, frames, dim) as stored (bf16 stays bf16), their frame counts, and
        # the clips' lengths in samples (audio seconds for throughput figures)
        feats = [s["features"] for s in good]
        return Batch(
            **texts,
            features=torch.nn.utils.rnn.pad_sequence(feats, batch_first=True),
            feature_lens=torch.tensor([f.shape[0] for f in feats], dtype=torch.long),
            audio_lens=torch.tensor([s["audio_samples"] for s in good], dtype=torch.long),
            num_skipped=skipped,
        )
    lens = [len(s["audio"]) for s in good]
    audio = np.zeros((len(good), max(lens, default=0)), dtype=np.float32)
    for i, s in enumerate(good):
        audio[i, : lens[i]] = s["audio"]
    return Batch(
        **texts,
        audio=torch.from_numpy(audio),
        audio_lens=torch.tensor(lens, dtype=torch.long),
        num_skipped=skipped,
    )
