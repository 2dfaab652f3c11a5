"""Synthesise an English speech corpus with exact German/French translations.

    python -m data_prep.synth_speech --out DIR --n N --seed S [--voices en-us+m1,en+f3 ...]

Writes DIR/audio/*.flac (16 kHz mono) and DIR/manifest.jsonl. Voices and speaking rates vary
per utterance; the `speaker` field names the voice so splits can hold voices out.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from data_prep.grammar import Sentence, unique_sentences
from sparqle.data.audio import load_audio
from sparqle.data.manifest import Utterance, write_manifest

SAMPLE_RATE = 16000
DEFAULT_VOICES = (
    "en-us+m1",
    "en-us+m3",
    "en-us+f2",
    "en-us+f4",
    "en+m2",
    "en+f3",
    "en-us+m7",
    "en+klatt2",
)


def espeak(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng's WAV on stdout -> float32 mono at 16 kHz."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit(
            "espeak-ng is not installed: run `make setup` or `apt-get install espeak-ng`"
        )
    wav = subprocess.run(
        [exe, "-v", voice, "-s", str(speed), "--stdout", text], capture_output=True, check=True
    ).stdout
    return load_audio(wav, SAMPLE_RATE, name=f"espeak-ng {voice}")


def synthesise(
    out: Path,
    n: int,
    seed: int,
    voices: tuple[str, ...] = DEFAULT_VOICES,
    sentences_per_clip: int = 1,
) -> list[Utterance]:
    """n clips of `sentences_per_clip` grammar sentences each (5 gives LibriSpeech-like ~12 s)."""
    rng = random.Random(seed)
    pool = unique_sentences(n * sentences_per_clip, seed)
    sentences: list[Sentence] = [
        Sentence(
            *(
                " ".join(getattr(x, f) for x in pool[i : i + sentences_per_clip])
                for f in ("en", "de", "fr")
            )
        )
        for i in range(0, len(pool), sentences_per_clip)
    ]
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    utterances = []
    for i, sent in enumerate(sentences):
        voice = voices[i % len(voices)]
        speed = rng.randint(140, 190)
        samples = espeak(sent.en, voice, speed)
        uid = f"synth-{seed}-{i:06d}"
        path = audio_dir / f"{uid}.flac"
        sf.write(path, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        utterances.append(
            Utterance(
                id=uid,
                audio=f"audio/{uid}.flac",
                text=sent.en,
                translation={"de": sent.de, "fr": sent.fr},
                speaker=f"espeak-ng:{voice}",
                duration=round(len(samples) / SAMPLE_RATE, 3),
            )
        )
    write_manifest(out / "manifest.jsonl", utterances)
    return utterances


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--voices", default=",".join(DEFAULT_VOICES), help="comma-separated espeak-ng voices"
    )
    p.add_argument("--sentences-per-clip", type=int, default=1, help="5 gives ~12-s clips")
    p.add_argument(
        "--val-fraction", type=float, default=0.0, help="also write train.jsonl / val.jsonl"
    )
    args = p.parse_args(argv)
    utts = synthesise(
        args.out, args.n, args.seed, tuple(args.voices.split(",")), args.sentences_per_clip
    )
    if args.val_fraction > 0:
        n_val = max(1, round(len(utts) * args.val_fraction))
        write_manifest(args.out / "train.jsonl", utts[n_val:])
        write_manifest(args.out / "val.jsonl", utts[:n_val])
    hours = sum(u.duration or 0 for u in utts) / 3600
    print(f"wrote {len(utts)} utterances ({hours * 60:.1f} min) to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
