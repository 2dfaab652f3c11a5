"""A Hugging Face `datasets` audio corpus -> JSONL manifest + 16 kHz FLAC clips (`data=manifest`),
and with `--shards DIR` on into webdataset shards + index (`data_prep.make_shards`'s own).

    python -m data_prep.hf_dataset --preset librispeech --split train.clean.100 --out DIR
    python -m data_prep.hf_dataset --source DIR_OR_FILES --split train --out DIR \\
        --audio audio --text sentence --translation de=translation --speaker client_id --id id \\
        [--workers N] [--shards DIR [--shard-size-mb S] [--seed S]]

`--source` is a hub name (read from the local HF cache: no network), a `save_to_disk` folder, or
parquet/arrow files (a glob, or several). Hub names and files are streamed row by row. Audio is
read as stored (the `Audio` feature's bytes or path, never decoded by `datasets`); what is already
16 kHz mono FLAC is written as it is, anything else is decoded, mixed to mono and resampled.
Rows with undecodable audio, empty or missing text (or a missing translation) are skipped and
counted. Clips are decoded and written by `--workers` processes, a window of rows at a time. A
rerun writes the same files byte for byte and reuses clips (and shards) already written.
"""

from __future__ import annotations

import argparse
import glob
import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.clips import (
    clip_id,
    finish_split,
    flac16k,
    kept_clips,
    language_map,
    ordered_map,
    write_clip,
    written_seconds,
)
from data_prep.make_shards import add_shard_flags, shards_from_flags
from sparqle.cli import reports_user_errors
from sparqle.data.audio import AudioError
from sparqle.data.manifest import Utterance


@dataclass(frozen=True)
class Columns:
    """Which column holds what; `translation` maps a target language to its column."""

    audio: str = "audio"
    text: str = "text"
    translation: dict[str, str] = field(default_factory=dict)
    speaker: str | None = None
    id: str | None = None
    lang: str = "en"  # the speech's language (the manifest's `lang`)


# the common layouts on the hub: `--preset NAME` needs no column flags
PRESETS: dict[str, dict[str, Any]] = {
    # openslr/librispeech_asr, config "all": splits train.clean.100, validation.clean, test.other...
    "librispeech": {
        "source": "openslr/librispeech_asr",
        "name": "all",
        "columns": Columns(text="text", speaker="speaker_id", id="id"),
    },
    # facebook/covost2 (config en_de, ...): one target per config, in the `translation` column
    "covost2": {
        "source": "facebook/covost2",
        "name": "en_de",
        "columns": Columns(
            text="sentence", translation={"de": "translation"}, speaker="client_id", id="id"
        ),
    },
    # google/fleurs (config en_us, ...): the raw transcription keeps case and punctuation
    "fleurs": {
        "source": "google/fleurs",
        "name": "en_us",
        "columns": Columns(text="raw_transcription", id="id"),
    },
    # mozilla-foundation/common_voice_* (config en, ...)
    "common_voice": {
        "source": "mozilla-foundation/common_voice_17_0",
        "name": "en",
        "columns": Columns(text="sentence", speaker="client_id", id="path"),
    },
}


def open_rows(source: str, split: str, name: str | None = None) -> Iterable[dict[str, Any]]:
    """The rows of one split, audio as stored ({'bytes', 'path'}): a `save_to_disk` folder,
    parquet/arrow files, or a hub name from the local cache (the last two streamed)."""
    import datasets
    from datasets import Audio

    path = Path(source)
    if path.is_dir() and (
        (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
    ):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"--split {split}: {source} holds {', '.join(ds)}")
            ds = ds[split]
    else:
        files = sorted(f for s in source.split(",") for f in glob.glob(s))
        if files:
            kinds = {Path(f).suffix for f in files}
            if len(kinds) != 1 or kinds - {".parquet", ".arrow"}:
                raise ValueError(f"--source {source}: expected parquet or arrow files")
            builder = "parquet" if kinds == {".parquet"} else "arrow"
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
        elif path.exists() or "/" not in source or source.startswith((".", "/")):
            raise FileNotFoundError(f"--source {source}: no dataset folder, files or hub name")
        else:
            try:
                ds = datasets.load_dataset(source, name, split=split, streaming=True)
            except (FileNotFoundError, ConnectionError, ValueError) as exc:
                raise FileNotFoundError(
                    f"--source {source}: not in the local Hugging Face cache ({exc})"
                ) from None
    features = ds.features or {}
    for column, feature in features.items():
        if isinstance(feature, Audio):
            ds = ds.cast_column(column, Audio(decode=False))
    return ds


def _text(value: Any) -> str | None:
    """A usable text cell: None for missing, NaN or blank."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = " ".join(str(value).split())
    return text or None


def _stored(cell: Any, base: Path | None) -> bytes | str:
    """The encoded audio of an `Audio` cell (bytes, or a file path) or a raw binary cell."""
    if isinstance(cell, bytes | bytearray):
        return bytes(cell)
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        if cell.get("path"):
            p = Path(cell["path"])
            return str(p if p.is_absolute() or base is None else base / p)
    raise AudioError("no audio bytes or path in the row")


def convert(
    rows: Iterable[dict[str, Any]],
    columns: Columns,
    split: str,
    out: Path,
    base: Path | None = None,
    workers: int = 1,
) -> tuple[list[Utterance], dict[str, int]]:
    """Rows -> clips under OUT/audio (decoded in `workers` processes) and their manifest entries;
    skipped rows counted by reason."""
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    skipped = {"undecodable audio": 0, "empty text": 0, "missing translation": 0}
    pending: deque[Utterance] = deque()  # the entries whose clips are being written, in order

    def clips() -> Iterator[tuple[Path, Any, Path | None]]:
        seen: set[str] = set()
        for i, row in enumerate(_checked(rows, columns)):
            text = _text(row.get(columns.text))
            if text is None:
                skipped["empty text"] += 1
                continue
            translation = {lang: _text(row.get(col)) for lang, col in columns.translation.items()}
            if any(v is None for v in translation.values()):
                skipped["missing translation"] += 1
                continue
            uid = clip_id(row.get(columns.id) if columns.id else None, split, i, seen)
            speaker = row.get(columns.speaker) if columns.speaker else None
            pending.append(
                Utterance(
                    id=uid,
                    audio=f"audio/{uid}.flac",
                    text=text,
                    translation=translation,
                    speaker=None if speaker is None else str(speaker),
                    lang=columns.lang,
                )
            )
            yield audio_dir / f"{uid}.flac", row.get(columns.audio), base

    seconds = ordered_map(_write_clip, clips(), workers)
    return kept_clips(pending, seconds, skipped, "undecodable audio"), skipped


def _write_clip(job: tuple[Path, Any, Path | None]) -> float | None:
    """One row's clip written (or found written by a previous run): its seconds; None if its
    audio cannot be decoded."""
    target, cell, base = job
    try:
        seconds = written_seconds(target)
        if seconds is None:
            flac, seconds = flac16k(_stored(cell, base))
            write_clip(target, flac)
        return seconds
    except AudioError:
        return None


def _checked(rows: Iterable[dict[str, Any]], columns: Columns) -> Iterator[dict[str, Any]]:
    """The rows, once the first one is seen to hold every mapped column (a wrong flag stops in
    one line naming it, not after an hour of rows)."""
    it = iter(rows)
    first = next(it, None)
    if first is None:
        return
    flags = {"--audio": columns.audio, "--text": columns.text, "--speaker": columns.speaker}
    flags |= {"--id": columns.id}
    flags |= {f"--translation {lang}=": col for lang, col in columns.translation.items()}
    for flag, col in flags.items():
        if col is not None and col not in first:
            raise ValueError(
                f"{flag}{'' if flag.endswith('=') else ' '}{col}: no such column "
                f"(the rows hold {', '.join(first)})"
            )
    yield first
    yield from it


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="a common hub layout: no column flags")
    p.add_argument("--source", help="hub name, save_to_disk folder, or parquet/arrow files")
    p.add_argument("--name", help="the hub dataset's configuration (a preset sets one)")
    p.add_argument("--split", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--audio", help="the audio column (default audio)")
    p.add_argument("--text", help="the transcript column")
    p.add_argument("--translation", action="append", default=[], help="LANG=COLUMN, repeatable")
    p.add_argument("--speaker", help="the speaker column")
    p.add_argument("--id", help="the id column (else SPLIT_ROW)")
    p.add_argument("--lang", help="the speech's language (default en)")
    p.add_argument("--workers", type=int, default=1, help="processes decoding clips / shards")
    add_shard_flags(p)
    args = p.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    source = args.source or preset.get("source")
    if not source:
        p.error("give --source or --preset")
    base = preset.get("columns", Columns())
    columns = Columns(
        audio=args.audio or base.audio,
        text=args.text or base.text,
        translation=language_map(args.translation, "--translation", "de=translation")
        or base.translation,
        speaker=args.speaker or base.speaker,
        id=args.id or base.id,
        lang=args.lang or base.lang,
    )
    folder = Path(source) if Path(source).is_dir() else None
    rows = open_rows(source, args.split, args.name or preset.get("name"))
    utts, skipped = convert(rows, columns, args.split, args.out, base=folder, workers=args.workers)
    finish_split(args.out, args.split, utts, skipped)
    shards_from_flags(args, args.out / f"{args.split}.jsonl")


if __name__ == "__main__":
    main()
