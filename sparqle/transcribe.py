"""Transcribe or translate audio files with a trained model, one line per file.

    python -m sparqle.transcribe --ckpt PATH [--task translate --lang German] FILE...

Any sample rate, mono or stereo, WAV/FLAC/OGG/MP3. Audio longer than the clips the model trained
on is cut at its pauses (Silero VAD) into pieces of that length and the pieces' text joined; a
file with no speech gets an empty line. A file that cannot be used gets one error line and the
rest go on; the exit status is 0 only if every file succeeded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from sparqle.cli import reports_user_errors, say_progress
from sparqle.data.audio import AudioError, load_audio
from sparqle.data.vad import speech_pieces
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
        "--max-seconds",
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
    p.add_argument("--num-beams", type=int, default=1)
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

    from sparqle.evaluation import inference_autocast, length_cap, load_model

    say_progress()

    try:
        module = load_model(args.ckpt, args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sr = module.model.encoder.sample_rate
    max_seconds = args.max_seconds or module.longest_clip_seconds()

    pieces: list[tuple[int, int, torch.Tensor]] = []  # (file index, piece index, audio)
    ok = [False] * len(args.files)
    for i, name in enumerate(args.files):
        if not Path(name).is_file():
            print(f"error: {name}: no such file", file=sys.stderr)
            continue
        try:
            audio = load_audio(name, sr, name=name)
        except AudioError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        ok[i] = True
        spans = [(0, len(audio))] if args.no_vad else speech_pieces(audio, sr, max_seconds)
        if not spans:
            print(f"note: {name}: no speech found", file=sys.stderr)
        pieces += [(i, k, torch.from_numpy(audio[a:b])) for k, (a, b) in enumerate(spans)]

    pieces.sort(key=lambda x: len(x[2]))  # similar lengths batch together
    results: list[tuple[int, int, str]] = []
    for start in range(0, len(pieces), args.batch_size):
        chunk = pieces[start : start + args.batch_size]
        lens = torch.tensor([len(a) for _, _, a in chunk])
        audio = pad_sequence([a for _, _, a in chunk], batch_first=True)
        cap = args.max_new_tokens or length_cap(float(lens.max()) / sr)
        with inference_autocast(module.device, args.precision):
            hyps = module.model.generate(
                audio.to(module.device),
                lens.to(module.device),
                [prompt] * len(chunk),
                max_new_tokens=cap,
                num_beams=args.num_beams,
            )
        results += [(i, k, h) for (i, k, _), h in zip(chunk, hyps, strict=True)]
    texts: dict[int, list[str]] = {}
    for i, _, h in sorted(results):  # back into file and time order
        texts.setdefault(i, []).append(h)
    for i, name in enumerate(args.files):
        if ok[i]:
            print(f"{name}\t{' '.join(t for t in texts.get(i, []) if t)}")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
