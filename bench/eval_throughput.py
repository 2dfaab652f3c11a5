"""Generation throughput: one utterance at a time (the reference's way) vs whole batches.

    python bench/eval_throughput.py [overrides...] [--n 64] [--batch 32] [--new-tokens 16]

Same model (random weights, built from the configs like train.py; tiny by default), same
clips (espeak-ng speech made on the fly), same number of generated tokens per utterance.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from data_prep.synth_speech import synthesise  # noqa: E402
from sparqle.data.manifest import write_manifest  # noqa: E402
from sparqle.data.manifest_datamodule import ManifestDataModule  # noqa: E402
from sparqle.random_model import build_module  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    module, cfg = build_module([*args.overrides, "stage=instruct"])
    module.eval()
    device = module.device
    if device.type == "cuda" and cfg.llm.dtype == "bfloat16":
        module.model.adapter.to(torch.bfloat16)

    with tempfile.TemporaryDirectory() as tmp:
        write_manifest(Path(tmp) / "manifest.jsonl", synthesise(Path(tmp), args.n, seed=1))
        dm = ManifestDataModule(test_manifest=str(Path(tmp) / "manifest.jsonl"), num_workers=0)
        batches = [
            {"audio": b.audio, "audio_lens": b.audio_lens, "instruction": b.instruction}
            for b in dm.eval_dataloader("transcribe", batch_size=args.batch)
        ]
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}

    def run(batch_list):
        start = time.perf_counter()
        for b in batch_list:
            module.model.generate(
                b["audio"].to(device), b["audio_lens"].to(device), b["instruction"], **gen
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    singles = [
        {
            "audio": b["audio"][i : i + 1, : b["audio_lens"][i]],
            "audio_lens": b["audio_lens"][i : i + 1],
            "instruction": b["instruction"][i : i + 1],
        }
        for b in batches
        for i in range(len(b["audio_lens"]))
    ]
    run(singles[:2])  # warm-up
    run(batches[:1])
    t_single = run(singles)
    t_batch = run(batches)
    n = len(singles)
    device_name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"device: {device_name}; model: {cfg.encoder.name_or_path.rsplit('/', 1)[-1]} + {cfg.llm.name_or_path.rsplit('/', 1)[-1]}"
    )
    print(f"utterances: {n}, {args.new_tokens} new tokens each")
    print(f"one at a time   : {n / t_single:8.2f} utterances/s")
    print(f"batches of {args.batch:<4} : {n / t_batch:8.2f} utterances/s")
    print(f"ratio           : {t_single / t_batch:8.2f}x")


if __name__ == "__main__":
    main()
