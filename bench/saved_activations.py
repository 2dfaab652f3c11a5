"""What autograd keeps for backward inside the frozen LLM of a stage-2 step, with and without
`llm.activation_checkpointing` (its layers recomputed in backward).

    python bench/saved_activations.py [--batch 4] [--seconds 3] [OVERRIDES...]

Default: the tiny random models of `experiment=tiny` (built under .cache on first use), a batch
of random audio with short targets. The count is of tensor elements saved by autograd during the
LLM's forward, frozen weights excluded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from sparqle.config import register_resolvers  # noqa: E402
from sparqle.lit_module import SparQLeModule  # noqa: E402
from sparqle.prompts import TRANSCRIBE, instruction  # noqa: E402


def saved_elements(overrides: list[str], batch: int, seconds: float) -> tuple[int, float]:
    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=tiny",
                "stage=instruct",
                f"paths.cache_dir={ROOT / '.cache'}",
                "paths.output_dir=/tmp",
                *overrides,
            ],
        )
    torch.manual_seed(0)
    module = SparQLeModule.from_config(cfg).train()
    sr = module.model.encoder.sample_rate
    lens = torch.tensor([int(sr * seconds * (i + 1) / batch) for i in range(batch)])
    audio = torch.randn(batch, int(lens.max())) * 0.1
    speech, mask = module.model.embed_speech(audio, lens)
    inputs = module.model.llm.build_inputs(
        speech,
        mask,
        [instruction(TRANSCRIBE)] * batch,
        ["the quick brown fox jumps over the lazy dog"] * batch,
        speech_lengths=module.model.speech_lengths(lens),
    )
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = module.model.llm(inputs)
    return sum(saved.values()), float(loss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    kept, loss = saved_elements(
        [*args.overrides, "llm.activation_checkpointing=false"], args.batch, args.seconds
    )
    recomputed, loss_ac = saved_elements(
        [*args.overrides, "llm.activation_checkpointing=true"], args.batch, args.seconds
    )
    print(f"saved for backward inside the LLM, {args.batch} utterances of <= {args.seconds} s:")
    print(f"  layers' activations kept    : {kept:12,d} elements  (loss {loss:.6f})")
    print(f"  layers recomputed (checkpt.): {recomputed:12,d} elements  (loss {loss_ac:.6f})")
    print(f"  ratio                       : {kept / recomputed:12.2f}x")


if __name__ == "__main__":
    main()
