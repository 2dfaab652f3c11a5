"""Lhotse manifests (NeMo, k2/icefall, ESPnet recipes) -> JSONL manifest + 16 kHz FLAC clips.

    python -m data_prep.lhotse --cuts cuts_train.jsonl.gz --split train --out DIR
    python -m data_prep.lhotse --recordings recordings.jsonl.gz --supervisions sups.jsonl.gz \\
        --split train --out DIR [--channel 0] [--translation de=translation_de]

One clip per cut (its offset and duration honoured), or with recordings + supervisions one clip per
supervision. The text is the cut's supervisions' texts in time order; translations come from the
supervisions' custom fields: a `translation` dict ({"de": ...}) by default, or `--translation
LANG=FIELD`. A multi-channel cut is mixed to mono unless `--channel` picks one of its channels. Cuts whose audio
cannot be read or that hold no text are skipped and counted; a rerun writes the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.clips import (
    SAMPLE_RATE,
    clip_id,
    finish_split,
    language_map,
    write_clip,
    written_seconds,
)
from sparqle.cli import reports_user_errors
from sparqle.data.audio import encode_flac, resample
from sparqle.data.manifest import Utterance


def open_cuts(cuts: Path | None, recordings: Path | None, supervisions: Path | None):
    """A CutSet: a cuts manifest as it is, or one cut per supervision of the recordings."""
    from lhotse import CutSet, RecordingSet, SupervisionSet

    for flag, path in (
        ("--cuts", cuts),
        ("--recordings", recordings),
        ("--supervisions", supervisions),
    ):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    if cuts is not None:
        return CutSet.from_file(cuts)
    if recordings is None or supervisions is None:
        raise ValueError("give --cuts, or --recordings and --supervisions")
    pairs = CutSet.from_manifests(
        recordings=RecordingSet.from_file(recordings),
        supervisions=SupervisionSet.from_file(supervisions),
    )
    return pairs.trim_to_supervisions(keep_overlapping=False)


def _translations(sups: list[Any], fields: dict[str, str]) -> dict[str, str] | None:
    """The cut's translations (None: a mapped field is missing or empty on a supervision)."""
    out: dict[str, list[str]] = {}
    for sup in sups:
        custom = sup.custom or {}
        found = (
            {lang: custom.get(name) for lang, name in fields.items()}
            if fields
            else dict(custom.get("translation") or {})
        )
        for lang, text in found.items():
            if not text or not str(text).strip():
                return None
            out.setdefault(lang, []).append(" ".join(str(text).split()))
    return {lang: " ".join(parts) for lang, parts in out.items()}


def _mono(samples: np.ndarray, channel: int | None, cut_id: str) -> np.ndarray:
    samples = np.atleast_2d(samples)  # (channels, frames); a one-channel cut is itself
    if channel is None or samples.shape[0] == 1:
        return samples.mean(axis=0).astype(np.float32)
    if not 0 <= channel < samples.shape[0]:
        raise ValueError(f"--channel {channel}: cut {cut_id} has {samples.shape[0]} channel(s)")
    return samples[channel].astype(np.float32)


def convert(
    cuts, split: str, out: Path, channel: int | None = None, fields: dict[str, str] | None = None
) -> tuple[list[Utterance], dict[str, int]]:
    """Cuts -> clips under OUT/audio and their manifest entries; skipped cuts counted by reason."""
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    utts: list[Utterance] = []
    skipped = {"unreadable audio": 0, "empty text": 0, "missing translation": 0}
    seen: set[str] = set()
    for i, cut in enumerate(cuts):
        sups = sorted(cut.supervisions, key=lambda s: s.start)
        text = " ".join(" ".join((s.text or "").split()) for s in sups).strip()
        if not text:
            skipped["empty text"] += 1
            continue
        translation = _translations(sups, fields or {})
        if translation is None:
            skipped["missing translation"] += 1
            continue
        uid = clip_id(cut.id, split, i, seen)
        target = audio_dir / f"{uid}.flac"
        seconds = written_seconds(target)
        if seconds is None:
            try:
                samples = cut.load_audio()
            except (
                Exception
            ):  # a missing or corrupt file, a truncated recording: lhotse raises many
                skipped["unreadable audio"] += 1
                continue
            clip = resample(_mono(samples, channel, cut.id), cut.sampling_rate, SAMPLE_RATE)
            if clip.size == 0 or not np.isfinite(clip.sum()):
                skipped["unreadable audio"] += 1
                continue
            write_clip(target, encode_flac(clip, SAMPLE_RATE))
            seconds = clip.size / SAMPLE_RATE
        speaker = next((s.speaker for s in sups if s.speaker), None)
        lang = next((s.language for s in sups if s.language), None)
        utts.append(
            Utterance(
                id=uid,
                audio=f"audio/{uid}.flac",
                text=text,
                translation=translation,
                speaker=speaker,
                duration=round(seconds, 4),
                lang=_iso(lang) if lang else "en",
            )
        )
    return utts, skipped


def _iso(language: str) -> str:
    """Lhotse recipes write `English` or `en`: the manifest's `lang` is the short code."""
    names = {"english": "en", "german": "de", "french": "fr", "spanish": "es", "italian": "it"}
    return names.get(language.lower(), language)


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cuts", type=Path, help="a CutSet manifest (jsonl or jsonl.gz)")
    p.add_argument("--recordings", type=Path, help="a RecordingSet manifest")
    p.add_argument("--supervisions", type=Path, help="a SupervisionSet manifest")
    p.add_argument("--split", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--channel", type=int, default=None, help="keep this channel (default: mix)")
    p.add_argument(
        "--translation", action="append", default=[], help="LANG=FIELD of supervision.custom"
    )
    args = p.parse_args(argv)
    fields = language_map(args.translation, "--translation", "de=translation_de")
    cuts = open_cuts(args.cuts, args.recordings, args.supervisions)
    utts, skipped = convert(cuts, args.split, args.out, args.channel, fields)
    finish_split(args.out, args.split, utts, skipped)


if __name__ == "__main__":
    main()
