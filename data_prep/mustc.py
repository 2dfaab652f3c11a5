"""MuST-C (TED talks, en -> X) -> JSONL manifest, cutting each segment from its talk's WAV.

    python -m data_prep.mustc --root MUSTC_v1.0/en-de --split train --out DIR

Layout: ROOT/data/SPLIT/txt/SPLIT.yaml (one {wav, offset, duration, speaker_id} per segment),
SPLIT.en and SPLIT.LANG (one line per segment, same order), ROOT/data/SPLIT/wav/TALK.wav.
Writes DIR/audio/*.flac (16 kHz mono) and DIR/SPLIT.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import soundfile as sf
import yaml

from sparqle.cli import reports_user_errors
from sparqle.data.audio import resample, to_mono_float
from sparqle.data.manifest import Utterance, write_manifest

SAMPLE_RATE = 16000


def build(root: Path, split: str, out: Path) -> tuple[list[Utterance], dict[str, int]]:
    txt = root / "data" / split / "txt"
    seg_file = txt / f"{split}.yaml"
    if not seg_file.is_file():
        raise FileNotFoundError(f"MuST-C segments not found: {seg_file}")
    tgt_files = [p for p in txt.glob(f"{split}.*") if p.suffix not in (".yaml", ".en")]
    if len(tgt_files) != 1:
        raise ValueError(f"{txt}: expected one {split}.LANG target file besides {split}.en")
    lang = tgt_files[0].suffix[1:]
    segments = yaml.load(
        seg_file.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    )
    en = (txt / f"{split}.en").read_text(encoding="utf-8").splitlines()
    tgt = tgt_files[0].read_text(encoding="utf-8").splitlines()
    if not len(segments) == len(en) == len(tgt):
        raise ValueError(
            f"{txt}: {len(segments)} segments but {len(en)} English and {len(tgt)} {lang} lines"
        )
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    utts, skipped = [], {"missing talk audio": 0, "empty segment": 0}
    counters: dict[str, int] = {}
    current_talk, talk_audio, talk_sr = None, None, None
    for seg, en_line, tgt_line in zip(segments, en, tgt, strict=True):
        talk = seg["wav"]
        if talk != current_talk:
            current_talk = talk
            path = root / "data" / split / "wav" / talk
            if path.is_file():
                talk_audio, talk_sr = sf.read(path, dtype="float32", always_2d=False)
                talk_audio = to_mono_float(talk_audio)
            else:
                talk_audio = None
        if talk_audio is None:
            skipped["missing talk audio"] += 1
            continue
        start = int(round(float(seg["offset"]) * talk_sr))
        end = start + int(round(float(seg["duration"]) * talk_sr))
        clip = resample(talk_audio[start:end], talk_sr, SAMPLE_RATE)
        if clip.size == 0:
            skipped["empty segment"] += 1
            continue
        stem = Path(talk).stem
        counters[stem] = counters.get(stem, 0) + 1
        uid = f"{stem}_{counters[stem] - 1:05d}"
        sf.write(audio_dir / f"{uid}.flac", clip, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        utts.append(
            Utterance(
                id=uid,
                audio=f"audio/{uid}.flac",
                text=en_line.strip(),
                translation={lang: tgt_line.strip()},
                speaker=str(seg.get("speaker_id", stem)),
                duration=round(clip.size / SAMPLE_RATE, 4),
            )
        )
    return utts, skipped


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--root", type=Path, required=True, help="the language-pair folder, e.g. MUSTC_v1.0/en-de"
    )
    p.add_argument("--split", required=True, help="train, dev, tst-COMMON, ...")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    utts, skipped = build(args.root, args.split, args.out)
    write_manifest(args.out / f"{args.split}.jsonl", utts)
    print(f"{args.split}: {len(utts)} segments -> {args.out}; skipped {skipped}", file=sys.stderr)


if __name__ == "__main__":
    main()
