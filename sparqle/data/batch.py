"""The batch every DataModule yields and the LightningModule consumes: the one contract between
data and model (built by `collate` and by the stand-in of a rank that has nothing).

Per clip, in the batch's order (lists are plain host values, the same length):
    id           the utterance id
    text         its transcript (stage 1 pairs it with the speech), cased as `data.text_case`
    task         "transcribe" or "translate"
    lang         the language of `target`
    instruction  the words the LLM is asked (sparqle.prompts)
    target       the text the LLM learns to answer (transcript or translation)
Speech, one of:
    audio        (B, samples) float32 waveforms at the encoder's rate, zero-padded
    features     (B, frames, dim) a frozen encoder's output from feature shards, zero-padded,
                 with feature_lens (B,) frames per clip
    audio_lens   (B,) samples per clip (from feature shards: the audio's, for throughput figures)
Bookkeeping:
    num_skipped, skipped  clips dropped on the way here, in total and by reason
    standin      True for a rank's stand-in batch: it runs the step's collectives, counts nothing
    speech_lengths  LLM positions each clip's speech takes (set on the host before the copy, so
                 the LLM's input layout needs no read back from the device)
    host_lengths, audio_seconds  each clip's speech length and the batch's audio seconds, taken
                 on the host before the copy (for FLOP counts and throughput)
    stream       (worker, index) of a shard stream's batch (for the checkpoint's data position)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Batch:
    id: list[str]
    text: list[str]
    task: list[str]
    lang: list[str]
    instruction: list[str]
    target: list[str]
    audio_lens: torch.Tensor
    audio: torch.Tensor | None = None
    features: torch.Tensor | None = None
    feature_lens: torch.Tensor | None = None
    num_skipped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    standin: bool = False
    speech_lengths: list[int] | None = None
    host_lengths: list[int] | None = None
    audio_seconds: float = 0.0
    stream: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.id)

    @property
    def speech(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the encoder takes: (audio, samples), or from feature shards (features, frames)."""
        if self.features is not None:
            return self.features, self.feature_lens
        return self.audio, self.audio_lens

    def clips(self) -> list[torch.Tensor]:
        """Each clip's speech, cut to its length (views of the padded tensor)."""
        speech, lens = self.speech
        return [speech[i, :n] for i, n in enumerate(lens.tolist())]

    def pin_memory(self) -> Batch:
        """Page-locked tensors (DataLoader's pin_memory calls this), for non-blocking copies."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, value.pin_memory())
        return self
