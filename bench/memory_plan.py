"""Per-GPU memory of a training step, before anything runs: the model is built on the meta device.

    python bench/memory_plan.py experiment=sparqle_paper trainer=fsdp trainer.devices=8
    python bench/memory_plan.py experiment=sparqle_paper stage=pretrain

Prints the plan for the configured strategy and, for comparison, one GPU, DDP and FSDP on the
configured number of devices. The figures come from sparqle.memory_plan (see its docstring for
what each counts); weights are exact, activations are estimates for the configured batch at its
longest clip (data.max_seconds) and longest target (llm.max_target_tokens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparqle.memory_plan import (  # noqa: E402
    GiB,
    communication,
    configured_strategy,
    dtype_bytes,
    plan,
    step_shape,
)
from sparqle.random_model import build_module  # noqa: E402

ROWS = (
    "frozen weights",
    "trained weights (fp32)",
    "gradients (fp32)",
    "optimizer state (AdamW, fp32)",
    "FSDP gathered units",
    "activations",
    "peak",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = p.parse_args()
    module, cfg = build_module(args.overrides, meta=True)
    shape = step_shape(module, cfg)
    devices = cfg.trainer.get("devices")
    world = (devices if isinstance(devices, int) else 8) * int(cfg.trainer.get("num_nodes", 1))
    strategy = cfg.trainer.get("strategy")
    name = configured_strategy(strategy, world)
    compute = dtype_bytes(
        strategy.get("compute_dtype", "bfloat16") if name in ("fsdp", "hybrid") else "bfloat16"
    )
    print(
        f"stage={cfg.stage.name}  encoder={cfg.encoder.name_or_path}  llm={cfg.llm.name_or_path}\n"
        f"per rank: {shape.batch} utterances x {shape.seconds:.0f} s, prompt {shape.prompt_tokens} "
        f"+ target {shape.target_tokens} LLM tokens (tokenizer: {module.model.llm.name_or_path if module.model.llm else '-'})"
    )
    checkpointed = bool(cfg.llm.get("activation_checkpointing")) or (
        name in ("fsdp", "hybrid") and bool(strategy.get("activation_checkpointing"))
    )
    negatives = cfg.stage.get("pretrain", {}).get("itm_negatives", "node")
    kw = {"compute_bytes": compute, "checkpointed": checkpointed}
    nodes = int(cfg.trainer.get("num_nodes", 1))
    per_node = world // nodes
    strategies = {"1 GPU": "single", f"DDP x{world}": "ddp", f"FSDP x{world}": "fsdp"}
    if nodes > 1:
        strategies[f"HSDP {nodes}x{per_node}"] = "hybrid"
    plans = {
        label: plan(
            module,
            shape,
            "fsdp" if s == "hybrid" else s,
            world,
            shard_group=per_node if s == "hybrid" else None,
            gathered_ranks=1 if s == "single" else (per_node if negatives == "node" else world),
            **kw,
        )
        for label, s in strategies.items()
    }
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1))
    comms = {
        label: communication(module, s, world, per_node, compute, accumulate)
        for label, s in strategies.items()
    }
    recompute = ", LLM layers recomputed in backward" if checkpointed else ""
    where = f"{world} GPUs" if nodes == 1 else f"{nodes} nodes x {per_node} GPUs"
    print(f"\nper-GPU GiB (configured: {name}, {where}{recompute})")
    print(f"{'':32s}" + "".join(f"{k:>12s}" for k in plans))
    for row in ROWS:
        print(f"{row:32s}" + "".join(f"{v.get(row, 0) / GiB:12.1f}" for v in plans.values()))
    print(f"\nreceived per GPU per optimizer step ({accumulate} micro-batches), GB")
    for row in ("total", "across nodes"):
        print(f"{row:32s}" + "".join(f"{c[row] / 1e9:12.1f}" for c in comms.values()))
    acts = list(plans.values())[-1]["breakdown"]
    print(
        f"\nactivations by part ({list(plans)[-1]}, GiB): "
        + ", ".join(f"{k} {v / GiB:.1f}" for k, v in acts.items())
        + "  (the encoder's transient is freed before the adapter and LLM run)"
    )


if __name__ == "__main__":
    main()
