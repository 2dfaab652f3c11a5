"""Synthesise an English speech corpus with exact German/French translations.

    python -m data_prep.synth_speech --out DIR --n N --seed S [--voices espeak-ng:en-us+m1,flite:slt,...]
        [--val-fraction F] [--heldout-voices flite:awb,...]
    python -m data_prep.synth_speech --out DIR --sentences FILE --split NAME [--n N] [--voices ...]

Voices are ENGINE:VOICE with engines espeak-ng (any espeak voice), flite (slt, awb, rms, kal16,
kal) and festival (cmu_us_slt_arctic_hts); a bare name means espeak-ng. Speaking rate varies per
utterance. Writes DIR/audio/*.flac (16 kHz mono) and DIR/manifest.jsonl; with --val-fraction
also train.jsonl / val.jsonl, held out by sentence, and with --heldout-voices by voice as well
(validation clips are spoken only by voices never heard in training). With --sentences, the
file's sentences (one a line, the first --n of them if given; no translations) are spoken
instead of the grammar's and written as DIR/NAME.jsonl.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from data_prep.grammar import Sentence, unique_sentences
from sparqle.cli import reports_user_errors
from sparqle.data.audio import load_audio
from sparqle.data.manifest import Utterance, write_manifest

SAMPLE_RATE = 16000
DEFAULT_VOICES = tuple(
    f"espeak-ng:{v}"
    for v in (
        "en-us+m1",
        "en-us+m3",
        "en-us+f2",
        "en-us+f4",
        "en+m2",
        "en+f3",
        "en-us+m7",
        "en+klatt2",
    )
)
INSTALL = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival festvox-us-slt-hts"}


def _exe(engine: str, command: str) -> str:
    exe = shutil.which(command)
    if exe is None:
        raise SystemExit(
            f"{engine} is not installed: run `make setup` or `apt-get install {INSTALL[engine]}`"
        )
    return exe


def speak(text: str, voice: str, rate: float) -> np.ndarray:
    """One utterance as float32 mono at 16 kHz; rate > 1 speaks faster."""
    engine, _, name = voice.rpartition(":")
    engine = engine or "espeak-ng"
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        if engine == "espeak-ng":
            cmd = [
                _exe(engine, "espeak-ng"),
                "-v",
                name,
                "-s",
                str(int(165 * rate)),
                "-w",
                tmp.name,
                text,
            ]
            subprocess.run(cmd, capture_output=True, check=True)
        elif engine == "flite":
            cmd = [
                _exe(engine, "flite"),
                "-voice",
                name,
                "--setf",
                f"duration_stretch={1 / rate:.3f}",
                "-t",
                text,
                "-o",
                tmp.name,
            ]
            subprocess.run(cmd, capture_output=True, check=True)
        elif engine == "festival":
            scheme = f"(voice_{name})" + f"(Parameter.set 'Duration_Stretch {1 / rate:.3f})"
            subprocess.run(
                [_exe(engine, "text2wave"), "-eval", scheme, "-o", tmp.name],
                input=text.encode(),
                capture_output=True,
                check=True,
            )
        else:
            raise SystemExit(
                f"unknown TTS engine {engine!r} in voice {voice!r}: use espeak-ng, flite or festival"
            )
        return load_audio(tmp.name, SAMPLE_RATE, name=f"{voice} {text!r}")


def _clips(sentences: list[Sentence], per_clip: int) -> list[Sentence]:
    return [
        Sentence(
            *(
                " ".join(getattr(x, f) for x in sentences[i : i + per_clip])
                for f in ("en", "de", "fr")
            )
        )
        for i in range(0, len(sentences), per_clip)
    ]


def synthesise(
    out: Path,
    n: int,
    seed: int,
    voices: tuple[str, ...] = DEFAULT_VOICES,
    sentences_per_clip: int = 1,
    id_prefix: str = "",
) -> list[Utterance]:
    """n clips of `sentences_per_clip` grammar sentences each (5 gives LibriSpeech-like ~12 s),
    voices taken in turn."""
    return _speak_all(
        out,
        _clips(unique_sentences(n * sentences_per_clip, seed), sentences_per_clip),
        voices,
        seed,
        id_prefix,
    )


def _speak_all(
    out: Path, clips: list[Sentence], voices: tuple[str, ...], seed: int, id_prefix: str
) -> list[Utterance]:
    rng = random.Random(seed)
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    utterances = []
    for i, sent in enumerate(clips):
        voice = voices[i % len(voices)]
        samples = speak(sent.en, voice, rate=rng.uniform(0.85, 1.15))
        uid = f"synth-{seed}-{id_prefix}{i:06d}"
        sf.write(audio_dir / f"{uid}.flac", samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        utterances.append(
            Utterance(
                id=uid,
                audio=f"audio/{uid}.flac",
                text=sent.en,
                translation={"de": sent.de, "fr": sent.fr},
                speaker=voice if ":" in voice else f"espeak-ng:{voice}",
                duration=round(len(samples) / SAMPLE_RATE, 3),
            )
        )
    return utterances


def synthesise_lines(
    out: Path, lines: list[str], voices: tuple[str, ...], seed: int, split: str
) -> list[Utterance]:
    """Each line spoken once, voices taken in turn (transcripts only: no translations)."""
    utts = _speak_all(out, [Sentence(line, "", "") for line in lines], voices, seed, f"{split}-")
    for u in utts:
        u.translation = {}
    return utts


def synthesise_split(
    out: Path,
    n: int,
    seed: int,
    voices: tuple[str, ...],
    heldout_voices: tuple[str, ...],
    val_fraction: float,
) -> tuple[list[Utterance], list[Utterance]]:
    """Train and validation sets sharing no sentence; validation voices never speak in training."""
    sentences = unique_sentences(n, seed)
    n_val = max(1, round(n * val_fraction))
    train_voices = tuple(v for v in voices if v not in heldout_voices) or voices
    val_voices = heldout_voices or voices
    val = _speak_all(out, sentences[:n_val], val_voices, seed, "val-")
    train = _speak_all(out, sentences[n_val:], train_voices, seed + 1, "train-")
    return train, val


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=None, help="clips (default: 100 / every line)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--voices", default=",".join(DEFAULT_VOICES), help="comma-separated ENGINE:VOICE"
    )
    p.add_argument("--sentences-per-clip", type=int, default=1, help="5 gives ~12-s clips")
    p.add_argument(
        "--val-fraction", type=float, default=0.0, help="also write train.jsonl / val.jsonl"
    )
    p.add_argument("--heldout-voices", default="", help="voices heard only in val.jsonl")
    p.add_argument("--sentences", type=Path, help="speak this file's lines, not the grammar")
    p.add_argument("--split", default="manifest", help="with --sentences: DIR/SPLIT.jsonl")
    args = p.parse_args(argv)
    voices = tuple(v for v in args.voices.split(",") if v)
    if args.sentences is not None:
        if not args.sentences.is_file():
            raise FileNotFoundError(f"--sentences {args.sentences}: no such file")
        lines = [x.strip() for x in args.sentences.read_text().splitlines() if x.strip()]
        lines = lines[: args.n] if args.n is not None else lines
        utts = synthesise_lines(args.out, lines, voices, args.seed, args.split)
        write_manifest(args.out / f"{args.split}.jsonl", utts)
        minutes = sum(u.duration or 0 for u in utts) / 60
        print(f"wrote {len(utts)} utterances ({minutes:.1f} min) to {args.out}", file=sys.stderr)
        return
    args.n = 100 if args.n is None else args.n
    heldout = tuple(v for v in args.heldout_voices.split(",") if v)
    if heldout:
        if args.val_fraction <= 0:
            p.error("--heldout-voices needs --val-fraction")
        train, val = synthesise_split(
            args.out, args.n, args.seed, voices + heldout, heldout, args.val_fraction
        )
        utts = val + train
    else:
        utts = synthesise(args.out, args.n, args.seed, voices, args.sentences_per_clip)
        n_val = max(1, round(len(utts) * args.val_fraction)) if args.val_fraction > 0 else 0
        val, train = utts[:n_val], utts[n_val:]
    write_manifest(args.out / "manifest.jsonl", utts)
    if args.val_fraction > 0:
        write_manifest(args.out / "train.jsonl", train)
        write_manifest(args.out / "val.jsonl", val)
    minutes = sum(u.duration or 0 for u in utts) / 60
    print(f"wrote {len(utts)} utterances ({minutes:.1f} min) to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
