"""Long recordings vs the same speech clip by clip: does cutting at pauses lose anything?

    python bench/longform.py --ckpt logs/demo/instruct/checkpoints/last.ckpt \
        --manifest data/demo/val.jsonl [--per-recording 8] [--pause 0.5] [--recordings 8]

Held-out clips are joined, `--per-recording` at a time with `--pause` seconds of silence between,
into long recordings (a 3-s-clip demo model meets ~30-s audio). Each recording is decoded the way
eval.py and sparqle.transcribe decode long audio (Silero VAD, pieces as long as the checkpoint's
longest training clip, text joined) and scored against the joined references; the same clips
decoded one by one give the per-clip WER. Also decoded: 3 s of silence and of noise, which must
give nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sparqle import metrics  # noqa: E402
from sparqle.data.audio import load_audio  # noqa: E402
from sparqle.data.batch import Batch  # noqa: E402
from sparqle.data.collate import collate  # noqa: E402
from sparqle.data.manifest import read_manifest  # noqa: E402
from sparqle.evaluation import generate_rows  # noqa: E402
from sparqle.export import load_model  # noqa: E402
from sparqle.inference import piece_seconds  # noqa: E402
from sparqle.prompts import TRANSCRIBE, instruction  # noqa: E402


def batch_of(ids: list[str], clips: list[np.ndarray], texts: list[str]) -> Batch:
    return collate(
        [
            {"id": i, "audio": c, "text": t, "task": TRANSCRIBE, "lang": "en", "target": t}
            | {"instruction": instruction(TRANSCRIBE)}
            for i, c, t in zip(ids, clips, texts, strict=True)
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--per-recording", type=int, default=8)
    p.add_argument("--recordings", type=int, default=8)
    p.add_argument("--pause", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    module = load_model(args.ckpt, "cpu")
    sr = module.model.encoder.sample_rate
    limit = piece_seconds(module)
    utts = read_manifest(args.manifest)[: args.per_recording * args.recordings]
    clips = [
        load_audio(u.audio, sr)
        for u in utts  # read_manifest resolves paths
    ]
    gen = dict(module.generation)
    start = time.time()

    one_by_one = []
    for i in range(0, len(utts), args.batch):
        part = slice(i, i + args.batch)
        rows, _ = generate_rows(
            module,
            [batch_of([u.id for u in utts[part]], clips[part], [u.text for u in utts[part]])],
            TRANSCRIBE,
            gen,
        )
        one_by_one += rows
    pause = np.zeros(int(args.pause * sr), np.float32)
    recordings, refs = [], []
    for r in range(args.recordings):
        group = range(r * args.per_recording, (r + 1) * args.per_recording)
        recordings.append(np.concatenate([x for i in group for x in (clips[i], pause)]))
        refs.append(" ".join(utts[i].text for i in group))
    long_rows = []
    for r in range(len(recordings)):  # one recording a call: its pieces are the batch
        rows, _ = generate_rows(
            module,
            [batch_of([f"recording-{r}"], [recordings[r]], [refs[r]])],
            TRANSCRIBE,
            gen,
            max_piece_seconds=limit,
        )
        long_rows += rows
    rng = np.random.default_rng(0)
    quiet = [np.zeros(3 * sr, np.float32), rng.normal(0, 0.01, 3 * sr).astype(np.float32)]
    quiet_rows, _ = generate_rows(
        module,
        [batch_of(["silence", "noise"], quiet, ["", ""])],
        TRANSCRIBE,
        gen,
        max_piece_seconds=limit,
    )

    per_clip = metrics.word_error_rate(
        [r.reference for r in one_by_one], [r.hypothesis for r in one_by_one]
    )
    long_form = metrics.word_error_rate(
        [r.reference for r in long_rows], [r.hypothesis for r in long_rows]
    )
    seconds = [len(x) / sr for x in recordings]
    print(
        f"{len(utts)} clips of --manifest; {len(recordings)} recordings of {args.per_recording} "
        f"({min(seconds):.0f}-{max(seconds):.0f} s), pieces <= {limit:.1f} s "
        f"(the checkpoint's longest training clip); {time.time() - start:.0f} s"
    )
    print(f"per-clip WER   {100 * per_clip['wer']:.1f} %  (deletions {per_clip['deletions']})")
    print(f"long-form WER  {100 * long_form['wer']:.1f} %  (deletions {long_form['deletions']})")
    print(
        f"silence -> {quiet_rows[0].hypothesis!r} (no_speech={quiet_rows[0].no_speech}), "
        f"noise -> {quiet_rows[1].hypothesis!r} (no_speech={quiet_rows[1].no_speech})"
    )


if __name__ == "__main__":
    main()
