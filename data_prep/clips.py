"""What the corpus readers share: a clip's file-safe id, its 16 kHz FLAC (what already is kept byte
for byte), writing a clip whole or not at all (a killed run leaves no half file; a rerun reuses
what is written), `LANG=NAME` flags, and the split's manifest with its one-line summary."""

from __future__ import annotations

import io
import itertools
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import soundfile as sf

from sparqle.data.audio import AudioError, encode_flac, load_audio
from sparqle.data.manifest import Utterance, write_manifest

T = TypeVar("T")
R = TypeVar("R")

SAMPLE_RATE = 16000


def clip_id(value: object, split: str, index: int, seen: set[str]) -> str:
    """A file-safe, unique id: the source's own id (a path's stem), else split + row number."""
    raw = Path(str(value)).stem if value not in (None, "") else f"{split}_{index:08d}"
    uid = "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)
    while uid in seen:
        uid = f"{uid}_{index}"
    seen.add(uid)
    return uid


def flac16k(encoded: bytes | str | Path, name: str | None = None) -> tuple[bytes, float]:
    """16 kHz mono 16-bit FLAC of a clip (encoded bytes or a file) and its seconds. FLAC that
    already is one is kept byte for byte (LibriSpeech, most hub audio): no decode, no re-encode.
    Raises AudioError for unreadable, empty or non-finite audio."""
    raw = encoded if isinstance(encoded, bytes) else None
    if raw is None and str(encoded).endswith(".flac") and Path(encoded).is_file():
        raw = Path(encoded).read_bytes()
    if raw is not None and raw[:4] == b"fLaC":
        label = name or (str(encoded) if raw is not encoded else "<bytes>")
        try:
            info = sf.info(io.BytesIO(raw))
        except RuntimeError as exc:
            raise AudioError(f"{label}: cannot decode audio ({exc})") from exc
        if info.samplerate == SAMPLE_RATE and info.channels == 1 and info.subtype == "PCM_16":
            if info.frames == 0:
                raise AudioError(f"{label}: empty audio")
            return raw, info.frames / SAMPLE_RATE
    samples = load_audio(raw if raw is not None else encoded, SAMPLE_RATE, name=name)
    return encode_flac(samples, SAMPLE_RATE), samples.size / SAMPLE_RATE


def written_seconds(target: Path) -> float | None:
    """A clip a previous run wrote: its seconds (None: not written yet)."""
    return sf.info(target).frames / SAMPLE_RATE if target.is_file() else None


def write_clip(target: Path, flac: bytes) -> None:
    """Encoded FLAC bytes under their name, renamed into place once whole."""
    tmp = target.with_suffix(".flac.tmp")
    tmp.write_bytes(flac)
    tmp.replace(target)


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int = 1, window: int = 256
) -> Iterator[R]:
    """fn over items in `workers` processes, results in input order; a window of items at a time,
    so a streamed corpus is never read ahead into memory (a pool's own map would read it all)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    it = iter(items)
    with ProcessPoolExecutor(workers) as pool:
        while chunk := list(itertools.islice(it, window)):
            yield from pool.map(fn, chunk, chunksize=max(1, len(chunk) // (4 * workers)))


def kept_clips(
    pending: deque[Utterance], seconds: Iterable[float | None], skipped: dict[str, int], reason: str
) -> list[Utterance]:
    """The entries whose clips were written, their durations filled in: `seconds` yields one value
    per entry in `pending` (None: its clip could not be written, counted under `reason`); entries
    are appended to `pending` while `seconds` is consumed, so each is taken off as its value comes."""
    kept = []
    for secs in seconds:
        utt = pending.popleft()
        if secs is None:
            skipped[reason] += 1
            continue
        utt.duration = round(secs, 4)
        kept.append(utt)
    return kept


def language_map(pairs: list[str], flag: str, example: str) -> dict[str, str]:
    """`LANG=NAME` flags (translations: the column or field holding each language)."""
    out = {}
    for pair in pairs:
        lang, sep, name = pair.partition("=")
        if not (sep and lang and name):
            raise ValueError(f"{flag} {pair}: expected LANG=NAME, e.g. {example}")
        out[lang] = name
    return out


def finish_split(out: Path, split: str, utts: list[Utterance], skipped: dict[str, int]) -> None:
    """OUT/SPLIT.jsonl, and one line on stderr: clips, hours, what was skipped and why."""
    write_manifest(out / f"{split}.jsonl", utts)
    hours = sum(u.duration or 0 for u in utts) / 3600
    print(
        f"{split}: {len(utts)} clips, {hours:.2f} h -> {out / f'{split}.jsonl'}; skipped {skipped}",
        file=sys.stderr,
    )
