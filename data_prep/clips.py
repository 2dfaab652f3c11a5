"""What the corpus readers share: a clip's file-safe id, and writing a 16 kHz FLAC clip whole
or not at all (a killed run leaves no half file; a rerun reuses what is written)."""

from __future__ import annotations

from pathlib import Path

import soundfile as sf

SAMPLE_RATE = 16000


def clip_id(value: object, split: str, index: int, seen: set[str]) -> str:
    """A file-safe, unique id: the source's own id (a path's stem), else split + row number."""
    raw = Path(str(value)).stem if value not in (None, "") else f"{split}_{index:08d}"
    uid = "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)
    while uid in seen:
        uid = f"{uid}_{index}"
    seen.add(uid)
    return uid


def written_seconds(target: Path) -> float | None:
    """A clip a previous run wrote: its seconds (None: not written yet)."""
    return sf.info(target).frames / SAMPLE_RATE if target.is_file() else None


def write_clip(target: Path, flac: bytes) -> None:
    """Encoded FLAC bytes under their name, renamed into place once whole."""
    tmp = target.with_suffix(".flac.tmp")
    tmp.write_bytes(flac)
    tmp.replace(target)
