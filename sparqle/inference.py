"""From waveforms to text with a trained model, one way for eval.py, sparqle.transcribe, the web
app and training-time validation:

    clips -> (VAD) pieces cut at pauses, none where there is no speech -> padded batches
    -> generate (the model's decoding settings, a length cap, bf16 autocast on GPUs)
    -> each clip's pieces' text joined

Pieces are at most `max_piece_seconds` long: by default the longest clip the model trained on
(`trained_clip_seconds`, kept in checkpoints and exports), else 30 s. Hypotheses do not depend on
how clips are batched (tests/e2e/test_golden_decoding.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from sparqle.models.llm import check_generation

DEFAULT_PIECE_SECONDS = 30.0


@dataclass
class Decoded:
    text: str
    no_speech: bool = False  # the VAD found none: the text is empty


def piece_seconds(module, given: float | None = None) -> float:
    """The longest piece given to the model: `given`, else the longest clip it trained on."""
    if given:
        return float(given)
    trained = getattr(module, "trained_clip_seconds", None)
    return float(trained[1]) if trained else DEFAULT_PIECE_SECONDS


def inference_bf16(device: torch.device | str, precision: str = "auto") -> bool:
    """Whether generation runs under bf16 autocast: on a GPU by default (the adapter's fp32
    weights then run at the frozen LLM's speed), on a CPU only when asked."""
    if precision not in ("auto", "bf16", "32"):
        raise ValueError(f"precision={precision}: expected auto, bf16 or 32")
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def inference_autocast(device: torch.device | str, precision: str = "auto") -> torch.autocast:
    device = torch.device(device)
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=inference_bf16(device, precision)
    )


def length_cap(seconds: float, base: int = 16, per_second: float = 8) -> int:
    """A max_new_tokens bound from the audio duration (speech is ~3 words/s), where the
    decoding settings give none."""
    return int(math.ceil(base + per_second * seconds))


def plan_pieces(
    clips: Sequence[torch.Tensor], sample_rate: int, max_seconds: float | None
) -> list[list[tuple[int, int]]]:
    """Per clip, the spans given to the model: the whole clip (`max_seconds` None: no VAD), or
    nothing for a clip without speech and pieces cut at pauses for one longer than that."""
    if max_seconds is None:
        return [[(0, len(c))] for c in clips]
    from sparqle.data.vad import speech_pieces

    return [speech_pieces(c.float().cpu().numpy(), sample_rate, max_seconds) for c in clips]


def decode(
    model,
    clips: Sequence[torch.Tensor],
    instructions: Sequence[str],
    generation: dict[str, Any],
    *,
    max_piece_seconds: float | None = None,
    cap: dict[str, float] | None = None,
    batch_size: int | None = None,
    precision: str = "auto",
) -> list[Decoded]:
    """Text for each clip of `clips`, asked `instructions`: waveforms (1-D, at the encoder's
    rate), or (frames, dim) features where the model reads feature shards (no VAD then).

    `model`: the SparQLe model (`module.model`); `generation`: decoding settings (checked);
    without max_new_tokens each batch is capped by `length_cap` of its longest piece.
    `max_piece_seconds`: VAD on, long clips cut at pauses (None: every clip whole, no VAD).
    `batch_size`: pieces a generate call (None: all at once), shortest first."""
    gen = check_generation(generation)
    fixed = gen.pop("max_new_tokens", None)
    # what a row of `clips` counts per second: samples, or frames for stored features
    rate = model.encoder.sample_rate if getattr(model.encoder, "encodes", True) else None
    rate = rate or model.encoder.frame_rate
    device = _device_of(model)
    plans = plan_pieces(
        clips, rate, max_piece_seconds if rate == model.encoder.sample_rate else None
    )
    pieces = [
        (i, k, clips[i][a:b]) for i, plan in enumerate(plans) for k, (a, b) in enumerate(plan)
    ]
    order = sorted(range(len(pieces)), key=lambda j: len(pieces[j][2])) if batch_size else None
    order = order if order is not None else list(range(len(pieces)))
    texts: dict[tuple[int, int], str] = {}
    step = batch_size or max(1, len(order))
    for start in range(0, len(order), step):
        chunk = [pieces[j] for j in order[start : start + step]]
        lens = torch.tensor([len(p) for _, _, p in chunk])
        audio = pad_sequence([p for _, _, p in chunk], batch_first=True)
        with inference_autocast(device, precision):
            hyps = model.generate(
                audio.to(device),
                lens.to(device),
                [instructions[i] for i, _, _ in chunk],
                max_new_tokens=fixed or length_cap(float(lens.max()) / rate, **(cap or {})),
                **gen,
            )
        texts.update({(i, k): h.strip() for (i, k, _), h in zip(chunk, hyps, strict=True)})
    return [
        Decoded(" ".join(t for k in range(len(plan)) if (t := texts[(i, k)])), no_speech=not plan)
        for i, plan in enumerate(plans)
    ]


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):  # a stand-in model without parameters
        return torch.device("cpu")
