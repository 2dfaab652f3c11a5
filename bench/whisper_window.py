"""Whisper tiny.en's own decoder on its native 30-s window vs a shorter one: WER and encode time.

    python bench/whisper_window.py [--window 10] [--n 24]

The check behind encoder.whisper_window_seconds: a shorter window encodes faster, but do the
features stay what the model expects? Synthesises --n clips with the demo's training voices.
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
    args = p.parse_args()
    path = ensure_packaged("whisper-tiny.en", ROOT / ".cache")
    model = WhisperForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp:
        utts = synthesise(Path(tmp), args.n, seed=7, voices=VOICES)
        audio = [torch.from_numpy(load_audio(Path(tmp) / u.audio, 16000)) for u in utts]
    lens = torch.tensor([len(a) for a in audio])
    batch = torch.nn.utils.rnn.pad_sequence(audio, batch_first=True)
    for window in (None, args.window):
        enc = SpeechEncoder(path, whisper_window_seconds=window)
        start = time.perf_counter()
        with torch.no_grad():
            states = enc._whisper(batch, lens)[0][
                -1
            ]  # the full window, as Whisper's decoder expects
            seconds = time.perf_counter() - start
            out = model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=states), max_new_tokens=40
            )
        hyps = tokenizer.batch_decode(out, skip_special_tokens=True)
        wer = metrics.word_error_rate([u.text for u in utts], hyps)["wer"]
        print(
            f"window {window or 30:>4} s: WER {wer:6.1%}, encoder {seconds:5.2f} s for {len(utts)} clips"
        )


if __name__ == "__main__":
    main()
