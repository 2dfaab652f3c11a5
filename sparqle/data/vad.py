"""Where the speech is, from Silero VAD (the `silero-vad` package ships its 2 MB model; nothing is
downloaded). It keeps a model from inventing a sentence for silence or noise, and cuts a long
recording at its pauses into pieces as long as the clips the model was trained on."""

from __future__ import annotations

import functools

import numpy as np
import torch

from sparqle.data.audio import resample, split_points

VAD_RATE = 16000  # Silero runs at 8 or 16 kHz


@functools.cache
def _model() -> torch.nn.Module:
    from silero_vad import load_silero_vad

    return load_silero_vad()


def speech_spans(
    samples: np.ndarray, sample_rate: int, min_silence_seconds: float = 0.1
) -> list[tuple[int, int]]:
    """(start, end) sample offsets of speech, each padded a little; [] for silence or noise."""
    from silero_vad import get_speech_timestamps

    audio = resample(np.asarray(samples, np.float32), sample_rate, VAD_RATE)
    with torch.no_grad():
        found = get_speech_timestamps(
            torch.from_numpy(np.ascontiguousarray(audio)),
            _model(),
            sampling_rate=VAD_RATE,
            min_silence_duration_ms=int(min_silence_seconds * 1000),
        )
    scale = sample_rate / VAD_RATE
    return [
        (int(s["start"] * scale), min(len(samples), int(round(s["end"] * scale)))) for s in found
    ]


def speech_pieces(
    samples: np.ndarray, sample_rate: int, max_seconds: float, pause_seconds: float = 0.3
) -> list[tuple[int, int]]:
    """What to give the model: [] where there is no speech; the whole clip where it is no longer
    than max_seconds (as evaluated clip by clip); else one piece per stretch of speech between
    pauses of at least `pause_seconds`, a stretch longer than max_seconds cut at its quietest
    points. Stretches are not joined: a model trained on one utterance a clip reads one
    utterance and stops (joining two sentences into one piece lost the second, measured with
    bench/longform.py)."""
    spans = speech_spans(samples, sample_rate, min_silence_seconds=pause_seconds)
    if not spans:
        return []
    if len(samples) <= int(max_seconds * sample_rate):
        return [(0, len(samples))]
    pieces = []
    for start, end in spans:
        cuts = split_points(samples[start:end], sample_rate, max_seconds)
        pieces += [(start + a, start + b) for a, b in cuts]
    return pieces
