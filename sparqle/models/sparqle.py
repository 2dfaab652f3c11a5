"""The composed model: speech encoder -> adapter -> LLM (stage 2), or -> stage-1 heads.

Each public method does a whole step's model work, so under FSDP one root unit gathers the
adapter once per step (`forward` and `pretrain` are the training entry points, `generate` the
inference one).
"""

from __future__ import annotations

import torch
from torch import nn

from sparqle.models.encoder import EncoderOutput, SpeechEncoder
from sparqle.models.llm import LLM, LLMInputs
from sparqle.models.pretrain import SpeechTextPretrainer
from sparqle.prompts import (
    INSTRUCTIONS,
    LANGUAGE_NAMES,
    TRANSCRIBE,
    TRANSLATE,
    language_name,
)


class SparQLe(nn.Module):
    """`llm` is None in stage 1, where `heads` (the BLIP-2 losses) train the adapter's Q-Former."""

    def __init__(
        self,
        encoder: SpeechEncoder,
        adapter: nn.Module,
        llm: LLM | None,
        heads: SpeechTextPretrainer | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter
        self.llm = llm
        self.heads = heads

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

    def token_overhead(self, languages: list[str] | None = None) -> int:
        """LLM positions an utterance takes besides its target: the longest prompt (chat
        template, system prompt, any instruction variant) plus the adapter's fixed speech
        positions (a Q-Former's queries; adapters whose output grows with the audio add none
        here). The token budget of `data.max_tokens` is estimated from it."""
        if self.llm is None:
            return 0
        texts = list(INSTRUCTIONS[TRANSCRIBE])
        for lang in languages or list(LANGUAGE_NAMES):
            texts += [t.format(language=language_name(lang)) for t in INSTRUCTIONS[TRANSLATE]]
        prompt = max(sum(map(len, self.llm.prompt_ids(t))) for t in texts)
        fixed = int(self.adapter.output_lengths(torch.zeros(1, dtype=torch.long))[0])
        return prompt + fixed

    def speech_lengths(self, audio_lens: torch.Tensor) -> list[int]:
        """How many LLM positions each utterance's speech takes, from audio_lens on the host:
        the layout of the LLM's input is then known before the batch reaches the device."""
        frames = self.encoder.output_lengths(audio_lens.cpu())
        return self.adapter.output_lengths(frames).tolist()

    def forward(
        self,
        audio: torch.Tensor,
        audio_lens: torch.Tensor,
        instructions: list[str],
        targets: list[str],
        speech_lengths: list[int] | None = None,
        scored: bool = True,
        summed: bool = False,
    ) -> tuple[torch.Tensor, LLMInputs]:
        """Stage 2: (the next-token loss over the targets, the LLM inputs it was computed on).
        The loss is the mean over every rank's target tokens, or with `summed` this rank's sum
        (`inputs.scored_tokens` tokens; validation adds them up). `scored=False` counts no token
        (a stand-in batch)."""
        speech, mask = self.embed_speech(audio, audio_lens)
        inputs = self.llm.build_inputs(
            speech, mask, instructions, targets, speech_lengths=speech_lengths, scored=scored
        )
        loss = self.llm.summed_loss(inputs) if summed else self.llm(inputs)
        return loss, inputs

    def pretrain(
        self,
        audio: torch.Tensor,
        audio_lens: torch.Tensor,
        texts: list[str],
        contributes: bool = True,
        sample_negatives: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Stage 1: the Q-Former's contrastive, matching and generation losses
        (see SpeechTextPretrainer.forward for `contributes` and `sample_negatives`)."""
        enc = self.encode(audio, audio_lens)
        return self.heads(
            self.adapter.qformer, enc.features, enc.mask, texts, contributes, sample_negatives
        )

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
