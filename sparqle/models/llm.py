"""The frozen causal LLM, its tokenizer, and the one prompt builder used everywhere.

Prompt (inside the tokenizer's chat template when it has one):
    user: "<Speech>{speech embeddings}</Speech> {instruction}"   assistant: "{target}{eos}"
Labels are -100 everywhere except the target tokens and the end token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from sparqle.distributed import all_reduce_sum, world
from sparqle.models.blocks import checkpoint_blocks
from sparqle.models.loading import load_frozen

SPEECH_PLACEHOLDER = "<|speech|>"
SPEECH_SLOT = -1  # token_ids value at positions filled with speech embeddings
PAD_SLOT = -2  # token_ids value at padding positions


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without making the host wait (pinned, non-blocking)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def check_generation(settings: Mapping[str, Any], where: str = "generation") -> dict[str, Any]:
    """Decoding settings passed whole to `generate`: any transformers GenerationConfig field
    (num_beams, no_repeat_ngram_size, early_stopping, length_penalty, do_sample, top_p, ...).
    An unknown key is an error, not a setting silently dropped."""
    known = GenerationConfig().to_dict()
    for key in settings:
        if key in OWN_SETTINGS:
            if key == "stop" and settings[key] not in STOPS:
                raise ValueError(f"{where}.stop={settings[key]!r}: expected eos or newline")
            continue
        if key not in known or key in _NOT_SETTINGS:
            raise ValueError(
                f"{where}.{key}: not a decoding setting (transformers' GenerationConfig fields: "
                "num_beams, max_new_tokens, do_sample, temperature, top_p, top_k, "
                "no_repeat_ngram_size, early_stopping, length_penalty, repetition_penalty, ...)"
            )
    return dict(settings)


# GenerationConfig fields the LLM wrapper sets itself
_NOT_SETTINGS = {"eos_token_id", "pad_token_id", "bos_token_id", "transformers_version"}
# decoding settings of SparQLe's own: where an answer stops (the end-of-turn token, or the first
# newline as the reference's decoding), and a seed for sampled decoding
OWN_SETTINGS = {"stop", "seed"}
STOPS = ("eos", "newline", None)


@dataclass
class LLMInputs:
    inputs_embeds: torch.Tensor  # (B, L, H)
    attention_mask: torch.Tensor  # (B, L) long
    token_ids: torch.Tensor  # (B, L) with SPEECH_SLOT / PAD_SLOT markers
    labels: torch.Tensor | None  # (B, L), -100 outside target + eos
    prompt_lengths: list[int]
    speech_positions: int = 0  # how many positions hold speech embeddings (host-side count)
    positions: int = 0  # how many positions are attended, speech included
    pad_left: bool = False
    scored_from: int = 0  # the first position whose next-token prediction some row scores
    row_lengths: list[int] | None = None  # real positions per row (host-side)
    scored_tokens: int = 0  # target tokens whose prediction the loss counts (host-side)


class LLM(nn.Module):
    def __init__(
        self,
        name_or_path: str,
        dtype: str = "float32",
        frozen: bool = True,
        lora: dict | None = None,
        use_chat_template: bool = True,
        system_prompt: str | None = None,
        speech_begin: str = "<Speech>",
        speech_end: str = "</Speech>",
        activation_checkpointing: bool = False,
        max_target_tokens: int | None = None,
        device: str | None = None,
    ) -> None:
        """`device`: where a frozen LLM's weights are loaded straight to (a rank's GPU), instead
        of whole into host memory first."""
        super().__init__()
        self.name_or_path = name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if frozen:
            self.model = load_frozen(
                AutoModelForCausalLM, name_or_path, getattr(torch, dtype), device
            )
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=getattr(torch, dtype)
            )
        self.frozen = frozen
        if frozen:
            self.model.requires_grad_(False)
        self.lora = bool(lora)
        if lora:
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(self.model, LoraConfig(task_type="CAUSAL_LM", **lora))
        # backward runs through every decoder layer to reach the adapter: recompute them there
        # instead of keeping their activations (frozen and in eval mode, as they are)
        self.activation_checkpointing = activation_checkpointing
        if activation_checkpointing:
            checkpoint_blocks(self.model)
        self.use_chat_template = use_chat_template and self.tokenizer.chat_template is not None
        self.system_prompt = system_prompt
        self.speech_begin, self.speech_end = speech_begin, speech_end
        self.hidden_size = self.model.config.hidden_size
        self.eos_token_id = self.tokenizer.eos_token_id
        self.max_target_tokens = max_target_tokens
        self._prompt_cache: dict[str, tuple[list[int], list[int]]] = {}

    def train(self, mode: bool = True) -> LLM:
        super().train(mode)
        if self.frozen and not self.lora:
            self.model.eval()
        return self

    def render_prompt(self, instruction: str) -> str:
        """The prompt text up to where the answer starts, with SPEECH_PLACEHOLDER for the speech."""
        user = f"{self.speech_begin}{SPEECH_PLACEHOLDER}{self.speech_end} {instruction}"
        if self.use_chat_template:
            messages = [{"role": "user", "content": user}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        bos = self.tokenizer.bos_token or ""
        return f"{bos}{user}\n"

    def prompt_ids(self, instruction: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the speech slot; cached, since instructions repeat."""
        if instruction not in self._prompt_cache:
            before, after = self.render_prompt(instruction).split(SPEECH_PLACEHOLDER)
            enc = self.tokenizer([before, after], add_special_tokens=False).input_ids
            self._prompt_cache[instruction] = (enc[0], enc[1])
        return self._prompt_cache[instruction]

    def target_ids(self, targets: list[str]) -> list[list[int]]:
        """Target tokens, cut at max_target_tokens (the reference cuts at 128), then the end token."""
        cut = self.max_target_tokens
        return [
            ids[:cut] + [self.eos_token_id]
            for ids in self.tokenizer(targets, add_special_tokens=False).input_ids
        ]

    def build_inputs(
        self,
        speech: torch.Tensor,
        speech_mask: torch.Tensor,
        instructions: list[str],
        targets: list[str] | None = None,
        pad_left: bool = False,
        speech_lengths: list[int] | None = None,
        scored: bool = True,
    ) -> LLMInputs:
        """Splice speech embeddings (B, N, H) into the prompts; with targets, add labels
        (`scored=False`: none, for a stand-in batch that must run but count nothing).

        Training pads right; generation pads left so every prompt ends at the last position.
        The layout (token ids, labels, where each speech embedding goes) is built on the host
        and moved in one non-blocking copy per tensor; with `speech_lengths` given (the valid
        prefix of each row of `speech`, known from audio_lens before the batch moved) nothing
        is read back from the device.
        """
        if speech_lengths is None:
            speech_lengths = speech_mask.sum(1).tolist()
        tgt = self.target_ids(targets) if targets is not None else [[] for _ in instructions]
        rows, prompt_lengths, speech_starts = [], [], []
        for instr, n, t in zip(instructions, speech_lengths, tgt, strict=True):
            before, after = self.prompt_ids(instr)
            prompt = before + [SPEECH_SLOT] * int(n) + after
            prompt_lengths.append(len(prompt))
            speech_starts.append(len(before))
            rows.append(prompt + t)
        b, width, n_max = len(rows), max(map(len, rows)), speech.shape[1]
        token_ids = torch.full((b, width), PAD_SLOT, dtype=torch.long)
        labels = torch.full_like(token_ids, -100) if targets is not None else None
        # gather index into [token embeddings (B*width rows); speech (B*n_max rows)]
        source = torch.arange(b * width).view(b, width)
        for i, (row, p) in enumerate(zip(rows, prompt_lengths, strict=True)):
            start = width - len(row) if pad_left else 0
            token_ids[i, start : start + len(row)] = torch.tensor(row)
            if labels is not None and scored:
                labels[i, start + p : start + len(row)] = torch.tensor(row[p:])
            s0, n = start + speech_starts[i], int(speech_lengths[i])
            source[i, s0 : s0 + n] = b * width + i * n_max + torch.arange(n)
        device = speech.device
        embed = self.model.get_input_embeddings()
        ids = torch.where(token_ids >= 0, token_ids, self.tokenizer.pad_token_id)
        tokens = embed(_to_device(ids, device))
        table = torch.cat([tokens.flatten(0, 1), speech.flatten(0, 1).to(tokens.dtype)])
        embeds = table.index_select(0, _to_device(source.flatten(), device)).view(b, width, -1)
        return LLMInputs(
            inputs_embeds=embeds,
            attention_mask=_to_device((token_ids != PAD_SLOT).long(), device),
            token_ids=_to_device(token_ids, device),
            labels=None if labels is None else _to_device(labels, device),
            prompt_lengths=prompt_lengths,
            speech_positions=int(sum(speech_lengths)),
            positions=sum(map(len, rows)),
            pad_left=pad_left,
            scored_from=min(prompt_lengths) - 1 if not pad_left else 0,
            row_lengths=[len(r) for r in rows],
            scored_tokens=sum(len(t) for t in tgt) if targets is not None and scored else 0,
        )

    def forward(self, inputs: LLMInputs) -> torch.Tensor:
        """Mean next-token loss over the target tokens of every rank's batch.

        Each rank divides its summed loss by the token count of all ranks (times the world size,
        which DDP/FSDP's gradient averaging divides out again), so a token weighs the same
        whichever rank holds it: training on N ranks equals one process on their joint batch, as
        in fairseq, which the reference trained with.
        """
        loss = self.summed_loss(inputs)
        tokens = all_reduce_sum((inputs.labels != -100).sum()).clamp(min=1)
        return loss * world()[1] / tokens

    def summed_loss(self, inputs: LLMInputs) -> torch.Tensor:
        """The next-token loss summed over this rank's target tokens (`inputs.scored_tokens` of
        them): no collective, so validation can add sums and counts over any batching.

        Rows are padded on the right, so causal attention alone keeps padding out of every real
        position: no attention mask is passed (transformers would read it back to the host to
        decide whether it can be skipped) and attention runs as plain causal. Logits are made
        only from the first position that predicts a target on (`logits_to_keep`): the prompt
        and speech positions, most of a row, never reach the vocabulary projection.
        """
        if inputs.pad_left:
            raise ValueError("the training loss needs right-padded inputs (pad_left=False)")
        width = inputs.inputs_embeds.shape[1]
        keep = width - inputs.scored_from
        logits = self.model(inputs_embeds=inputs.inputs_embeds, logits_to_keep=keep).logits
        labels = inputs.labels[:, inputs.scored_from + 1 :]
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=-100,
            reduction="sum",
        )

    @torch.no_grad()
    def generate(
        self,
        inputs: LLMInputs,
        max_new_tokens: int = 128,
        stop: str | None = "eos",
        seed: int | None = None,
        **kwargs,
    ) -> list[str]:
        """Decode every row. `stop`: at the end-of-turn token(s), or at the first newline
        (`newline`, as the SparQLe authors' decoding: their only stop token). `seed`: sampled
        decoding draws from a generator seeded so, leaving the global random state as it was."""
        if stop == "newline":
            eos = {self.tokenizer("\n", add_special_tokens=False).input_ids[0]}
        else:
            eos = {self.eos_token_id}
            cfg_eos = self.model.generation_config.eos_token_id
            eos |= set(
                cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else []
            )
        kwargs.setdefault("do_sample", False)
        with torch.random.fork_rng(
            devices=[inputs.inputs_embeds.device] if inputs.inputs_embeds.is_cuda else []
        ):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(eos),
                pad_token_id=self.tokenizer.pad_token_id,
                **kwargs,
            )
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
