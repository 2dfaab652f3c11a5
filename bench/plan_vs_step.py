"""`python -m sparqle.plan`'s figures held to measured training steps on this machine.

    python bench/plan_vs_step.py [--shapes 8x4 4x8 16x2] [--steps 5] [OVERRIDES...]

For each batch shape (utterances x seconds) of the config's model (random weights, fp32, the
machine's device), one real training step is measured against what the plan computes for the
same shape without running anything:
- FLOPs: the plan's count from the shape (`sparqle.plan.step_flops`) vs the count from the step's
  own host-side lengths (`sparqle.flops.step_work`, held to torch's FlopCounterMode in
  tests/test_flops.py);
- memory kept for backward: the plan's activations (`sparqle.memory_plan.plan`, fp32) vs the
  bytes autograd really saved during the step's forward (weights excluded);
- time: the plan's model, time = FLOPs / (peak x MFU), with the MFU taken from the first shape
  only, predicting the others' step time, vs their measured time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_step import synthetic_batch, time_steps  # noqa: E402
from sparqle import flops  # noqa: E402
from sparqle.memory_plan import StepShape, plan  # noqa: E402
from sparqle.plan import step_flops  # noqa: E402
from sparqle.random_model import build_module  # noqa: E402


def saved_bytes(module, batch) -> int:
    """Bytes autograd keeps for backward over one training step's forward (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in module.buffers()}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and t.device.type != "meta":
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    module.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = module.model_step(batch)
    out["loss"].backward()
    module.zero_grad(set_to_none=True)
    return sum(saved.values())


def shape_of(module, batch, seconds: float) -> StepShape:
    """The plan's description of a batch: its size, clip length and token counts."""
    llm = module.model.llm
    prompt = target = 0
    if llm is not None:
        before, after = llm.prompt_ids(batch.instruction[0])
        prompt = len(before) + len(after)
        target = max(len(t) for t in llm.target_ids(batch.target)) + 1
    text = max(len(t.split()) for t in batch.text) + 2
    return StepShape(len(batch.id), seconds, prompt, target, text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", default=["experiment=tiny", "stage=instruct"])
    p.add_argument("--shapes", nargs="+", default=["8x4", "4x8", "16x2"], help="BATCHxSECONDS")
    p.add_argument("--target-words", type=int, default=20)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()

    module, cfg = build_module(args.overrides)
    rows, flop_rate = [], None  # FLOP/s of the first shape: the MFU the plan then assumes
    for spec in args.shapes:
        n, seconds = spec.split("x")
        batch = synthetic_batch(module, int(n), float(seconds), args.target_words)
        shape = shape_of(module, batch, float(seconds))
        dt, out = time_steps(module, batch, args.steps, args.warmup)
        counted = flops.step_work(module.model, batch.host_lengths, out)
        planned = step_flops(module, shape, float(seconds))
        flop_rate = flop_rate or planned / dt
        planned_acts = plan(module, shape, "single", compute_bytes=4)["activations"]
        measured_acts = saved_bytes(module, batch)
        rows.append(
            {
                "shape": spec,
                "planned_gflop": round(planned / 1e9, 2),
                "counted_gflop": round(counted / 1e9, 2),
                "planned_activation_mib": round(planned_acts / 2**20, 1),
                "saved_activation_mib": round(measured_acts / 2**20, 1),
                "predicted_step_s": round(planned / flop_rate, 4),
                "measured_step_s": round(dt, 4),
            }
        )
    print(
        json.dumps(
            {
                "device": str(module.device),
                "threads": torch.get_num_threads(),
                "encoder": cfg.encoder.name_or_path.rsplit("/", 1)[-1],
                "llm": cfg.llm.name_or_path.rsplit("/", 1)[-1],
                "mfu_from": args.shapes[0],
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
