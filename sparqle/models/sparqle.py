"""The composed model: speech encoder -> adapter -> LLM."""

from __future__ import annotations

import torch
from torch import nn

from sparqle.models.encoder import EncoderOutput, SpeechEncoder
from sparqle.models.llm import LLM, SPEECH_SLOT, LLMInputs


class SparQLe(nn.Module):
    """`llm` is None in stage 1, where only the encoder and the adapter's Q-Former are used."""

    def __init__(self, encoder: SpeechEncoder, adapter: nn.Module, llm: LLM | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter
        self.llm = llm

    @staticmethod
    def count_positions(inputs: LLMInputs) -> tuple[int, int]:
        """(speech embeddings, all attended positions) in a batch of LLM inputs."""
        return int((inputs.token_ids == SPEECH_SLOT).sum()), int(inputs.attention_mask.sum())

    def encode(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> EncoderOutput:
        """Encoder features in the adapter's dtype: a bf16 frozen encoder may feed an fp32 adapter."""
        enc = self.encoder(audio, audio_lens)
        dtype = next(self.adapter.parameters()).dtype
        return EncoderOutput(features=enc.features.to(dtype), mask=enc.mask)

    def embed_speech(
        self, audio: torch.Tensor, audio_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.encode(audio, audio_lens)
        return self.adapter(enc.features, enc.mask)

    def forward(
        self,
        audio: torch.Tensor,
        audio_lens: torch.Tensor,
        instructions: list[str],
        targets: list[str],
    ) -> tuple[torch.Tensor, LLMInputs]:
        """(mean next-token loss over the targets, the LLM inputs it was computed on)."""
        speech, mask = self.embed_speech(audio, audio_lens)
        inputs = self.llm.build_inputs(speech, mask, instructions, targets)
        return self.llm(inputs), inputs

    @torch.no_grad()
    def generate(
        self,
        audio: torch.Tensor,
        audio_lens: torch.Tensor,
        instructions: list[str],
        **generate_kwargs,
    ) -> list[str]:
        speech, mask = self.embed_speech(audio, audio_lens)
        inputs = self.llm.build_inputs(speech, mask, instructions, pad_left=True)
        return self.llm.generate(inputs, **generate_kwargs)
