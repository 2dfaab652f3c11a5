"""Silero VAD on real (synthesised) speech, silence and noise; long audio cut at its pauses."""

import numpy as np

from sparqle.data.audio import load_audio
from sparqle.data.vad import speech_pieces, speech_spans

SR = 16000


def clips(synth_data, n):
    return [load_audio(p, SR) for p in sorted((synth_data / "audio").glob("*.flac"))[:n]]


def test_silence_and_noise_have_no_speech():
    rng = np.random.default_rng(0)
    assert speech_spans(np.zeros(3 * SR, np.float32), SR) == []
    for level in (0.003, 0.03):  # a quiet room, a loud fan (white noise)
        noise = rng.normal(0, level, 3 * SR).astype(np.float32)
        assert speech_spans(noise, SR) == [] and speech_pieces(noise, SR, 30.0) == []


def test_speech_is_found_at_any_sample_rate(synth_data):
    for clip in clips(synth_data, 4):
        spans = speech_spans(clip, SR)
        assert spans and sum(b - a for a, b in spans) > 0.5 * len(clip)
        assert speech_pieces(clip, SR, 30.0) == [(0, len(clip))]  # short: the whole clip
    at8k = load_audio(sorted((synth_data / "audio").glob("*.flac"))[0], 8000)
    assert speech_spans(at8k, 8000)


def test_a_long_recording_is_cut_at_its_pauses_and_nothing_is_dropped(synth_data):
    parts = clips(synth_data, 8)
    pause = np.zeros(int(0.6 * SR), np.float32)
    audio = np.concatenate([x for c in parts for x in (c, pause)])
    starts = np.cumsum([0] + [len(c) + len(pause) for c in parts[:-1]])
    longest = max(len(c) for c in parts) / SR
    pieces = speech_pieces(audio, SR, max_seconds=longest + 0.5)
    assert all(b - a <= (longest + 0.5) * SR for a, b in pieces)
    # every clip's speech lies inside one piece, to the VAD's 30 ms padding (no sentence lost)
    slack = int(0.05 * SR)
    for s, c in zip(starts, parts, strict=True):
        speech = speech_spans(c, SR)
        first, last = s + speech[0][0], s + speech[-1][1]
        assert any(a - slack <= first and last <= b + slack for a, b in pieces), (s, pieces)
    # a span longer than the limit is still cut, at its quietest points
    assert len(speech_pieces(audio, SR, max_seconds=1.0)) >= len(parts)
