"""LibriSpeech (or any corpus in its layout) -> JSONL manifest.

    python -m data_prep.librispeech --root LibriSpeech --subset train-clean-100 --out train.jsonl

Layout: ROOT/SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt ("UTT-ID TRANSCRIPT" per line)
beside SPEAKER-CHAPTER-NNNN.flac.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import soundfile as sf

from sparqle.cli import reports_user_errors
from sparqle.data.manifest import Utterance, write_manifest


def build(
    root: Path, subset: str, lowercase: bool = False
) -> tuple[list[Utterance], dict[str, int]]:
    base = root / subset
    if not base.is_dir():
        raise FileNotFoundError(f"LibriSpeech subset not found: {base}")
    utts, skipped = [], {"missing audio": 0}
    for trans in sorted(base.glob("*/*/*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            uid, _, text = line.partition(" ")
            audio = trans.parent / f"{uid}.flac"
            if not audio.is_file():
                skipped["missing audio"] += 1
                continue
            utts.append(
                Utterance(
                    id=uid,
                    audio=str(audio),
                    text=text.lower() if lowercase else text,
                    speaker=uid.split("-")[0],
                    duration=round(sf.info(audio).duration, 4),
                )
            )
    return utts, skipped


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--subset", required=True, help="e.g. train-clean-100, dev-clean")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lowercase", action="store_true")
    args = p.parse_args(argv)
    utts, skipped = build(args.root, args.subset, args.lowercase)
    write_manifest(args.out, utts)
    print(
        f"{args.subset}: {len(utts)} utterances -> {args.out}; skipped {skipped}", file=sys.stderr
    )


if __name__ == "__main__":
    main()
