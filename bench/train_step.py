"""Timed training steps of SparQLe with random weights, from the same configs as train.py.

    python bench/train_step.py                                   # tiny models, CPU
    python bench/train_step.py experiment=sparqle_paper --batch 8 --seconds 15 --steps 10   # on a GPU

Published model names (HuBERT-large, Llama-3-8B-Instruct, Qwen2.5-7B, BERT-base) are built from
their architectures with random weights, so nothing is downloaded. Prints step time, audio s/s,
LLM tokens/s and MFU, the FLOPs counted from the model's real shapes by sparqle/flops.py (the
encoder's conv front end and attention once, the adapter and its per-frame cross-attention
K/V three times for forward and backward, the frozen LLM twice: forward, and backward through
its activations only), held to torch's FlopCounterMode in tests/test_flops.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning.fabric.utilities.throughput import get_available_flops  # noqa: E402

from sparqle import flops  # noqa: E402
from sparqle.data.batch import Batch  # noqa: E402
from sparqle.random_model import build_module  # noqa: E402


def cpu_peak_flops(dtype: torch.dtype) -> float:
    """The best FLOP/s a large matmul reaches here: the denominator of MFU on a CPU."""
    a = torch.randn(2048, 2048, dtype=dtype)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t))
    return best


def synthetic_batch(module, batch: int, seconds: float, target_words: int) -> Batch:
    """`batch` utterances of `seconds` of noise with a `target_words` transcript, laid out on the
    host as training lays it out, audio on the module's device."""
    n = int(seconds * module.model.encoder.sample_rate)
    words = "the small dog sees the old red car today".split()
    text = " ".join(words[j % len(words)] for j in range(target_words))
    out = Batch(
        id=[str(i) for i in range(batch)],
        text=[text] * batch,
        task=["transcribe"] * batch,
        lang=["en"] * batch,
        instruction=["Transcribe the speech."] * batch,
        target=[text] * batch,
        audio=torch.randn(batch, n) * 0.1,
        audio_lens=torch.full((batch,), n),
    )
    out = module.on_before_batch_transfer(out)  # host-side layout and counts, as in training
    out.audio, out.audio_lens = out.audio.to(module.device), out.audio_lens.to(module.device)
    return out


def time_steps(
    module, batch: Batch, steps: int, warmup: int, precision: str = "32"
) -> tuple[float, dict]:
    """Seconds per training step (forward, backward, AdamW) after `warmup` steps, and the last
    step's outputs."""
    device = module.device
    module.train()
    params = [q for q in module.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            out = module.model_step(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        out = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "overrides", nargs="*", default=["experiment=tiny"], help="Hydra overrides, as for train.py"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=4.0, help="audio per utterance")
    p.add_argument("--target-words", type=int, default=20)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--precision", default=None, choices=["32", "bf16"], help="default: bf16 on a GPU, else 32"
    )
    args = p.parse_args()

    module, cfg = build_module(args.overrides)
    device = module.device
    if args.precision is None:  # the MFU denominator is the peak of the precision that runs
        args.precision = "bf16" if device.type == "cuda" else "32"
    batch = synthetic_batch(module, args.batch, args.seconds, args.target_words)
    dt, out = time_steps(module, batch, args.steps, args.warmup, args.precision)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    stats = {
        "audio_seconds": batch.audio_seconds,
        "llm_tokens": float(out.get("llm_tokens", 0)),
        "flops": flops.step_work(module.model, batch.host_lengths, out),
    }
    peak = get_available_flops(device, dtype) if device.type == "cuda" else cpu_peak_flops(dtype)
    result = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "stage": cfg.stage.name,
        "encoder": cfg.encoder.name_or_path.rsplit("/", 1)[-1],
        "llm": cfg.llm.name_or_path.rsplit("/", 1)[-1],
        "adapter": cfg.adapter._target_.rsplit(".", 1)[-1],
        "batch": args.batch,
        "seconds_per_utterance": args.seconds,
        "precision": args.precision,
        "step_time_s": round(dt, 4),
        "audio_seconds_per_s": round(stats["audio_seconds"] / dt, 1),
        "llm_tokens_per_s": round(stats["llm_tokens"] / dt, 1),
        "tflops_per_s": round(stats["flops"] / dt / 1e12, 3),
        "mfu": round(stats["flops"] / dt / peak, 4) if peak else None,
        "mfu_denominator_tflops": round(peak / 1e12, 2) if peak else None,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
