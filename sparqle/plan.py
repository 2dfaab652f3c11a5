"""How long, how much, how many GPUs: a plan of a training run before it is launched.

    python -m sparqle.plan experiment=sparqle_paper data=shards trainer.devices=8 \\
        trainer.num_nodes=4 gpu=h100 [mfu=0.4] [--json]

From the model built on the meta device (published names from their architectures: nothing is
downloaded or allocated) and the training data's shard index or manifest, for each strategy:
memory per GPU (sparqle/memory_plan.py) and the largest per-GPU batch that fits the GPU, and
for the configured batch: FLOPs per optimizer step (sparqle/flops.py), time per step and per epoch
at a stated MFU, GPU-hours for `trainer.max_steps`, and what each GPU receives per step.

The MFU is an assumption (0.35 unless `mfu=` says otherwise; no measured GPU figure is in
docs/benchmarks.md yet) and is labelled so. A batch "fits" when its planned peak stays within 90 %
of the GPU's memory (the CUDA context and the allocator's fragmentation take the rest).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

# name -> (Lightning's peak-FLOPs table key, memory in GB as sold)
GPUS = {
    "h200": ("h200 sxm1", 141),
    "h100": ("h100 sxm", 80),
    "h100-pcie": ("h100 pcie", 80),
    "a100": ("a100", 80),
    "a100-40": ("a100", 40),
    "l40": ("l40", 48),
    "a6000": ("a6000", 48),
    "l4": ("l4", 24),
    "a10g": ("a10g", 24),
    "rtx4090": ("rtx 4090", 24),
    "v100": ("v100 sxm", 32),
}
ASSUMED_MFU = 0.35
HEADROOM = 0.9


def gpu_peak(gpu: str, dtype: str) -> tuple[float, float]:
    """(peak FLOP/s in the compute dtype, memory bytes) of a GPU by name."""
    import torch
    from lightning.fabric.utilities.throughput import _CUDA_FLOPS

    if gpu not in GPUS:
        raise ValueError(f"gpu={gpu}: expected one of {', '.join(GPUS)}")
    key, gb = GPUS[gpu]
    return _CUDA_FLOPS[key][getattr(torch, dtype)], gb * 1e9


def data_size(data: Any) -> dict[str, Any] | None:
    """Hours and clips of the training sources (shard indexes or a manifest); None if unknown."""
    from sparqle.data.manifest import read_manifest
    from sparqle.data.shards import read_index

    sources, seconds, clips = [], 0.0, 0
    manifest = data.get("train_manifest")
    parts = data.get("train") or {}
    urls = [] if manifest else [p.get("urls") for p in parts.values() if hasattr(p, "get")]
    for url in [manifest] if manifest else urls:
        if not url or not str(url).endswith((".json", ".jsonl")) or not Path(url).is_file():
            return None  # a brace pattern or remote stream: its size is not known here
        sources.append(str(url))
        if str(url).endswith(".jsonl"):
            utts = read_manifest(url)
            seconds += sum(u.duration or 0.0 for u in utts)
            clips += len(utts)
        else:
            index = read_index(url)
            seconds += sum(s["seconds"] for s in index["shards"])
            clips += sum(s["samples"] for s in index["shards"])
    if not clips:
        return None
    return {
        "sources": sources,
        "hours": seconds / 3600,
        "clips": clips,
        "mean_seconds": seconds / clips,
    }


def step_flops(module, shape, seconds: float) -> float:
    """FLOPs of one micro-batch of `shape.batch` clips of `seconds` on one GPU."""
    import torch

    from sparqle import flops
    from sparqle.memory_plan import speech_slots

    model, encoder = module.model, module.model.encoder
    samples = int(seconds * encoder.sample_rate)
    frames = int(encoder.output_lengths(torch.tensor([samples])).item())
    losses: dict[str, Any] = {"text_lengths": [shape.text_tokens] * shape.batch}
    if model.llm is not None:
        row = shape.prompt_tokens + speech_slots(model, frames) + shape.target_tokens
        losses = {"llm_rows": [row] * shape.batch, "llm_scored_from": row - shape.target_tokens}
    return flops.step_work(model, [samples] * shape.batch, losses)


def largest_batch(module, shape, strategy: str, capacity: float, **kw: Any) -> int:
    """The most clips per GPU whose planned peak fits `capacity` bytes (0: not even one). The
    peak grows by the same bytes per clip: solved from two plans, then checked either side."""
    from dataclasses import replace

    from sparqle.memory_plan import plan

    def peak(b: int) -> float:
        return plan(module, replace(shape, batch=b), strategy, **kw)["peak"]

    one, two = peak(1), peak(2)
    if one > capacity:
        return 0
    per_clip = max(two - one, 1.0)
    b = max(1, min(65536, int((capacity - one) // per_clip) + 1))
    while b > 1 and peak(b) > capacity:
        b -= 1
    while b < 65536 and peak(b + 1) <= capacity:
        b += 1
    return b


def _name(path: Any) -> str:
    """A model's published name (the architecture stand-ins' folders are named after it)."""
    text = str(path)
    return Path(text).name.replace("--", "/") if "bench-architectures" in text else text


def make_plan(overrides: list[str], gpu: str = "h100", mfu: float | None = None) -> dict[str, Any]:
    """The plan as a dict (what `--json` prints)."""
    from sparqle.memory_plan import (
        communication,
        configured_strategy,
        dtype_bytes,
        plan,
        step_shape,
    )
    from sparqle.random_model import build_module

    module, cfg = build_module(overrides, meta=True)
    trainer = cfg.trainer
    devices = trainer.get("devices")
    if not isinstance(devices, int):
        raise ValueError(f"trainer.devices={devices}: give the number of GPUs a node has")
    nodes = int(trainer.get("num_nodes", 1))
    world = devices * nodes
    strategy = trainer.get("strategy")
    configured = configured_strategy(strategy, world)
    dtype = "bfloat16"
    if configured in ("fsdp", "hybrid"):
        dtype = strategy.get("compute_dtype", "bfloat16")
    peak_flops, capacity = gpu_peak(gpu, dtype)
    compute = dtype_bytes(dtype)
    checkpointed = bool(cfg.llm.get("activation_checkpointing")) or (
        configured in ("fsdp", "hybrid") and bool(strategy.get("activation_checkpointing"))
    )
    negatives = cfg.stage.get("pretrain", {}).get("itm_negatives", "node")
    accumulate = int(trainer.get("accumulate_grad_batches", 1))
    shape = step_shape(module, cfg)
    strategies = {"ddp": "ddp", "fsdp": "fsdp"}
    if nodes > 1:
        strategies["hybrid"] = "hybrid"
    if world == 1:
        strategies = {"single": "single"}
    per_strategy = {}
    for name, s in strategies.items():
        kw = {
            "world": world,
            "shard_group": devices if s == "hybrid" else None,
            "gathered_ranks": 1 if s == "single" else (devices if negatives == "node" else world),
            "compute_bytes": compute,
            "checkpointed": checkpointed,
        }
        planned = "fsdp" if s == "hybrid" else s
        peak = plan(module, shape, planned, **kw)["peak"]
        comm = communication(module, s, world, devices, compute, accumulate)
        per_strategy[name] = {
            "peak_gib": peak / 2**30,
            "fits": peak <= HEADROOM * capacity,
            "largest_batch": largest_batch(module, shape, planned, HEADROOM * capacity, **kw),
            "received_gb_per_step": comm["total"] / 1e9,
            "across_nodes_gb_per_step": comm["across nodes"] / 1e9,
        }
    data = data_size(cfg.data)
    seconds = data["mean_seconds"] if data else shape.seconds
    flops_per_step = accumulate * step_flops(module, shape, seconds)
    used_mfu = mfu if mfu is not None else ASSUMED_MFU
    step_s = flops_per_step / (peak_flops * used_mfu)
    max_steps = int(trainer.get("max_steps") or -1)
    out: dict[str, Any] = {
        "experiment": {
            "stage": cfg.stage.name,
            "encoder": _name(cfg.encoder.name_or_path),
            "llm": _name(cfg.llm.name_or_path),
            "strategy": configured,
            "gpus": world,
            "nodes": nodes,
        },
        "gpu": {"name": gpu, "memory_gb": capacity / 1e9, "peak_tflops": peak_flops / 1e12},
        "mfu": {"value": used_mfu, "source": "given" if mfu is not None else "assumed"},
        "data": data,
        "step": {
            "batch_per_gpu": shape.batch,
            "accumulate": accumulate,
            "global_batch": shape.batch * accumulate * world,
            "clip_seconds": seconds,
            "tflops_per_gpu": flops_per_step / 1e12,
            "seconds": step_s,
        },
        "strategies": per_strategy,
    }
    if data:
        steps = math.ceil(data["clips"] / (shape.batch * accumulate * world))
        out["epoch"] = {"steps": steps, "hours": steps * step_s / 3600}
    if max_steps > 0:
        out["run"] = {
            "max_steps": max_steps,
            "hours": max_steps * step_s / 3600,
            "gpu_hours": max_steps * step_s * world / 3600,
        }
    return out


def render(p: dict[str, Any]) -> str:
    e, g, s = p["experiment"], p["gpu"], p["step"]
    lines = [
        f"stage={e['stage']}  encoder={e['encoder']}  llm={e['llm']}",
        f"{e['gpus']} x {g['name']} ({e['nodes']} node(s); {g['memory_gb']:.0f} GB, "
        f"{g['peak_tflops']:.0f} TFLOP/s peak), configured strategy: {e['strategy']}",
    ]
    d = p["data"]
    lines.append(
        f"data: {d['hours']:.2f} h in {d['clips']} clips (mean {d['mean_seconds']:.1f} s) from "
        + ", ".join(d["sources"])
        if d
        else "data: size unknown (no local shard index or manifest): no epoch figures"
    )
    lines += [
        "",
        f"{'per GPU':28s}" + "".join(f"{k:>12s}" for k in p["strategies"]),
        f"{'peak memory, GiB':28s}"
        + "".join(f"{v['peak_gib']:12.1f}" for v in p["strategies"].values()),
        f"{'fits (90 % of memory)':28s}"
        + "".join(f"{'yes' if v['fits'] else 'NO':>12s}" for v in p["strategies"].values()),
        f"{'largest batch that fits':28s}"
        + "".join(f"{v['largest_batch']:12d}" for v in p["strategies"].values()),
        f"{'received per step, GB':28s}"
        + "".join(f"{v['received_gb_per_step']:12.1f}" for v in p["strategies"].values()),
        f"{'  of it across nodes, GB':28s}"
        + "".join(f"{v['across_nodes_gb_per_step']:12.1f}" for v in p["strategies"].values()),
        "",
        f"step: {s['batch_per_gpu']} clips x {s['accumulate']} micro-batches per GPU "
        f"(global {s['global_batch']}), {s['clip_seconds']:.1f} s clips: "
        f"{s['tflops_per_gpu']:.1f} TFLOP per GPU, {s['seconds']:.2f} s at "
        f"{p['mfu']['source']} MFU {p['mfu']['value']:.2f}",
    ]
    if "epoch" in p:
        lines.append(f"epoch: {p['epoch']['steps']} steps, {p['epoch']['hours']:.1f} h")
    if "run" in p:
        r = p["run"]
        lines.append(
            f"trainer.max_steps={r['max_steps']}: {r['hours']:.1f} h, {r['gpu_hours']:.0f} GPU-hours"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from sparqle.cli import report_user_errors

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides as for train.py, gpu=, mfu=")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    own = {k: v for k, _, v in (o.partition("=") for o in args.overrides) if k in ("gpu", "mfu")}
    overrides = [o for o in args.overrides if o.partition("=")[0] not in ("gpu", "mfu")]

    def run() -> None:
        mfu = float(own["mfu"]) if "mfu" in own else None
        if mfu is not None and not 0 < mfu <= 1:
            raise ValueError(f"mfu={mfu}: expected a fraction in (0, 1]")
        planned = make_plan(overrides, own.get("gpu", "h100"), mfu)
        print(json.dumps(planned, indent=1) if args.json else render(planned))

    report_user_errors(run)


if __name__ == "__main__":
    main(sys.argv[1:])
