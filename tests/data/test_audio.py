import io

import numpy as np
import pytest
import soundfile as sf

from sparqle.data.audio import AudioError, encode_flac, load_audio


def _wav_bytes(samples: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_resamples_and_downmixes():
    sr = 44100
    t = np.arange(sr) / sr
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([tone, tone], axis=1)
    out = load_audio(_wav_bytes(stereo, sr), 16000)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 16000) <= 1
    # the tone survives resampling: its peak frequency is still 440 Hz
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * 16000 / len(out) - 440) < 2


def test_flac_round_trip_within_16_bit_tolerance():
    x = (np.random.default_rng(0).uniform(-0.9, 0.9, 8000)).astype(np.float32)
    y = load_audio(encode_flac(x, 16000), 16000)
    assert np.max(np.abs(x - y)) < 1 / 2**15 * 1.01


@pytest.mark.parametrize(
    "payload, message",
    [(b"not audio at all", "cannot decode"), (b"", "cannot decode")],
)
def test_bad_bytes_raise_audio_error_naming_the_clip(payload, message):
    with pytest.raises(AudioError, match=f"clip-7: {message}"):
        load_audio(payload, 16000, name="clip-7")


def test_empty_and_nan_audio_rejected():
    with pytest.raises(AudioError, match="empty"):
        load_audio(_wav_bytes(np.zeros(0), 16000), 16000, name="e")
    nan = np.full(100, np.nan, dtype=np.float32)
    with pytest.raises(AudioError, match="NaN"):
        load_audio(_wav_bytes(nan, 16000, subtype="FLOAT"), 16000, name="n")


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="missing.flac"):
        load_audio(tmp_path / "missing.flac", 16000)
