"""Lhotse manifests (NeMo, k2/icefall, ESPnet recipes) -> JSONL manifest + 16 kHz FLAC clips,
and with `--shards DIR` on into webdataset shards + index (`data_prep.make_shards`'s own).

    python -m data_prep.lhotse --cuts cuts_train.jsonl.gz --split train --out DIR \\
        [--workers N] [--shards DIR [--shard-size-mb S] [--seed S]]
    python -m data_prep.lhotse --shar SHAR_DIR --split train --out DIR
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
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.clips import (
    SAMPLE_RATE,
    clip_id,
    finish_split,
    kept_clips,
    language_map,
    ordered_map,
    write_clip,
    written_seconds,
)
from data_prep.make_shards import add_shard_flags, shards_from_flags
from sparqle.cli import reports_user_errors
from sparqle.data.audio import encode_flac, resample
from sparqle.data.manifest import Utterance


def open_cuts(
    cuts: Path | None,
    recordings: Path | None,
    supervisions: Path | None,
    shar: Path | None = None,
):
    """A CutSet: a cuts manifest as it is, a Lhotse Shar folder (its cuts with the audio its
    tar shards hold), or one cut per supervision of the recordings."""
    from lhotse import CutSet, RecordingSet, SupervisionSet

    if shar is not None:
        if not sorted(Path(shar).glob("cuts.*.jsonl*")):
            raise FileNotFoundError(f"--shar {shar}: no Lhotse Shar folder (no cuts.*.jsonl.gz)")
        return CutSet.from_shar(in_dir=shar)

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
        raise ValueError("give --cuts, --shar, or --recordings and --supervisions")
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
    cuts,
    split: str,
    out: Path,
    channel: int | None = None,
    fields: dict[str, str] | None = None,
    workers: int = 1,
) -> tuple[list[Utterance], dict[str, int]]:
    """Cuts -> clips under OUT/audio (read in `workers` processes) and their manifest entries;
    skipped cuts counted by reason."""
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    skipped = {"unreadable audio": 0, "empty text": 0, "missing translation": 0}
    pending: deque[Utterance] = deque()  # the entries whose clips are being written, in order

    def clips() -> Iterator[tuple[Any, Path, int | None]]:
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
            lang = next((s.language for s in sups if s.language), None)
            pending.append(
                Utterance(
                    id=uid,
                    audio=f"audio/{uid}.flac",
                    text=text,
                    translation=translation,
                    speaker=next((s.speaker for s in sups if s.speaker), None),
                    lang=_iso(lang) if lang else "en",
                )
            )
            yield cut, audio_dir / f"{uid}.flac", channel

    seconds = ordered_map(_write_clip, clips(), workers)
    return kept_clips(pending, seconds, skipped, "unreadable audio"), skipped


def _write_clip(job: tuple[Any, Path, int | None]) -> float | None:
    """One cut's clip written (or found written by a previous run): its seconds; None if its
    audio cannot be read."""
    cut, target, channel = job
    seconds = written_seconds(target)
    if seconds is not None:
        return seconds
    try:
        samples = cut.load_audio()
    except Exception:  # a missing or corrupt file, a truncated recording: lhotse raises many
        return None
    clip = resample(_mono(samples, channel, cut.id), cut.sampling_rate, SAMPLE_RATE)
    if clip.size == 0 or not np.isfinite(clip.sum()):
        return None
    write_clip(target, encode_flac(clip, SAMPLE_RATE))
    return clip.size / SAMPLE_RATE


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
    p.add_argument("--shar", type=Path, help="a Lhotse Shar folder (cuts + recording shards)")
    p.add_argument("--split", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--channel", type=int, default=None, help="keep this channel (default: mix)")
    p.add_argument(
        "--translation", action="append", default=[], help="LANG=FIELD of supervision.custom"
    )
    p.add_argument("--workers", type=int, default=1, help="processes reading clips / shards")
    add_shard_flags(p)
    args = p.parse_args(argv)
    fields = language_map(args.translation, "--translation", "de=translation_de")
    cuts = open_cuts(args.cuts, args.recordings, args.supervisions, args.shar)
    utts, skipped = convert(cuts, args.split, args.out, args.channel, fields, args.workers)
    finish_split(args.out, args.split, utts, skipped)
    shards_from_flags(args, args.out / f"{args.split}.jsonl")


if __name__ == "__main__":
    main()
