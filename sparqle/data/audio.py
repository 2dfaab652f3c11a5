"""Audio I/O shared by data_prep and the data pipeline: decode, downmix, resample."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

INTEGER_CODINGS = ("PCM_", "ULAW", "ALAW")  # libsndfile subtypes whose samples are integers


class AudioError(ValueError):
    """A clip that cannot be used; the message names the file or sample."""


def to_mono_float(samples: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) of any dtype -> (frames,) float32 in [-1, 1]."""
    x = np.asarray(samples)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max)
    return x.astype(np.float32, copy=False)


def resample(samples: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    if orig_sr == target_sr:
        return samples
    return soxr.resample(samples, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def load_audio(source: str | Path | bytes, target_sr: int, name: str | None = None) -> np.ndarray:
    """Decode a file path or encoded bytes (WAV/FLAC/OGG/MP3) to mono float32 at target_sr.

    Raises AudioError (never anything else) for unreadable, empty or non-finite audio.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        with sf.SoundFile(handle) as f:
            sr, exact = f.samplerate, f.subtype.startswith(INTEGER_CODINGS)
            samples = f.read(dtype="float32", always_2d=False)
    except Exception as exc:  # soundfile raises several types for bad input
        raise AudioError(f"{label}: cannot decode audio ({exc})") from exc
    samples = to_mono_float(samples)
    if samples.size == 0:
        raise AudioError(f"{label}: empty audio")
    # Integer codings (FLAC, PCM WAV) decode to finite floats by construction: no pass needed.
    # Float WAV, Vorbis, MP3 can carry NaN/Inf: one pass, no mask array (both propagate to a sum).
    if not exact and not np.isfinite(samples.sum()):
        raise AudioError(f"{label}: audio holds NaN or Inf")
    return resample(samples, sr, target_sr)


def encode_flac(samples: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def split_points(
    samples: np.ndarray, sample_rate: int, max_seconds: float, frame_seconds: float = 0.025
) -> list[tuple[int, int]]:
    """Cut long audio into pieces of at most max_seconds, each cut at the quietest frame of the
    last third of its window (a pause, in speech), so words are rarely split."""
    n, limit = len(samples), int(max_seconds * sample_rate)
    if n <= limit:
        return [(0, n)]
    hop = max(1, int(frame_seconds * sample_rate))
    usable = n // hop * hop
    energy = np.square(samples[:usable].reshape(-1, hop)).mean(1) if usable else np.zeros(0)
    pieces, start = [], 0
    while n - start > limit:
        lo, hi = (start + 2 * limit // 3) // hop, (start + limit) // hop
        window = energy[lo:hi]
        cut = (lo + int(np.argmin(window))) * hop if len(window) else start + limit
        cut = min(max(cut, start + hop), start + limit)
        pieces.append((start, cut))
        start = cut
    pieces.append((start, n))
    return pieces
