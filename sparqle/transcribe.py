"""Transcribe or translate audio files with a trained model, one line per file.

    python -m sparqle.transcribe --ckpt PATH [--task translate --lang German] FILE...

Any sample rate, mono or stereo, WAV/FLAC/OGG/MP3. Audio longer than the clips the model trained
on is cut at its pauses (Silero VAD) into pieces of that length and the pieces' text joined; a
file with no speech gets an empty line. A file that cannot be used gets one error line and the
rest go on; the exit status is 0 only if every file succeeded. Decoding: the checkpoint's own
settings (as eval.py), with --num-beams / --max-new-tokens on top.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sparqle.cli import reports_user_errors, say_progress
from sparqle.data.audio import AudioError, load_audio
from sparqle.prompts import TRANSCRIBE, TRANSLATE, instruction


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a training checkpoint or an export folder")
    p.add_argument("--task", choices=[TRANSCRIBE, TRANSLATE], default=TRANSCRIBE)
    p.add_argument(
        "--lang", default=None, help="target language for --task translate (German, de, ...)"
    )
    p.add_argument(
        "--max-piece-seconds",
        "--max-seconds",  # its name before 2026-12-01
        dest="max_piece_seconds",
        type=float,
        default=None,
        help="longest piece given to the model (default: the longest clip it trained on, else 30)",
    )
    p.add_argument(
        "--no-vad",
        action="store_true",
        help="decode every file whole (no voice activity detection, no cutting at pauses)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--num-beams", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "32"],
        help="auto: bf16 autocast on a GPU, float32 on a CPU",
    )
    p.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    if args.task == TRANSLATE and not args.lang:
        p.error("--task translate needs --lang")
    try:
        prompt = instruction(args.task, args.lang)
    except ValueError as exc:
        p.error(str(exc))

    from sparqle.export import load_model
    from sparqle.inference import decode, piece_seconds

    say_progress()
    try:
        module = load_model(args.ckpt, args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sr = module.model.encoder.sample_rate
    clips, names = [], []
    for name in args.files:
        if not Path(name).is_file():
            print(f"error: {name}: no such file", file=sys.stderr)
            continue
        try:
            clips.append(torch.from_numpy(load_audio(name, sr, name=name)))
            names.append(name)
        except AudioError as exc:
            print(f"error: {exc}", file=sys.stderr)
    generation = dict(module.generation)
    if args.max_new_tokens:
        generation["max_new_tokens"] = args.max_new_tokens
    else:  # bounded by each batch's longest piece (inference.length_cap)
        generation.pop("max_new_tokens", None)
    if args.num_beams:
        generation["num_beams"] = args.num_beams
    decoded = decode(
        module.model,
        clips,
        [prompt] * len(clips),
        generation,
        max_piece_seconds=None if args.no_vad else piece_seconds(module, args.max_piece_seconds),
        batch_size=args.batch_size,
        precision=args.precision,
    )
    for name, d in zip(names, decoded, strict=True):
        if d.no_speech:
            print(f"note: {name}: no speech found", file=sys.stderr)
        print(f"{name}\t{d.text}")
    return 0 if len(names) == len(args.files) else 1


if __name__ == "__main__":
    sys.exit(main())
