"""What the corpus readers share: a clip's file-safe id, writing a 16 kHz FLAC clip whole or not
at all (a killed run leaves no half file; a rerun reuses what is written), `LANG=NAME` flags, and
the split's manifest with its one-line summary."""

from __future__ import annotations

import sys
from pathlib import Path

import soundfile as sf

from sparqle.data.manifest import Utterance, write_manifest

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
