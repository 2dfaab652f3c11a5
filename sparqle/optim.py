"""How the trained parameters are stepped: AdamW over groups (decay or not, the fresh
cross-attention's rate), the learning-rate schedule, gradient clipping, and which steps are
skipped, decided on the device.

`stage.optim` (conf/optim/adamw.yaml, shared by both stages): lr, betas, eps, weight_decay,
no_decay (name fragments exempt from decay), new_cross_attention_lr_scale, schedule
(constant|cosine|linear), warmup_steps, warmup_init_lr (the rate warm-up starts from, as
fairseq's `--warmup-init-lr`), min_lr_ratio (where cosine/linear end, times lr); lr_scaling and
lr_reference_batch are applied to lr before the run is built (sparqle.config.apply_global_batch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from sparqle.config_check import SCHEDULES
from sparqle.distributed import all_reduce_max

# parameters left out of weight decay by default (name fragments; stage.optim.no_decay)
NO_DECAY = ("bias", "norm", "LayerNorm", "layernorm", "query_tokens", "temp", "layer_weights")


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


def build_optimizer(
    named: Iterable[tuple[str, nn.Parameter]], optim: Mapping[str, Any], fresh: bool
) -> torch.optim.AdamW:
    """Fused AdamW over the trained parameters: groups by decay (`no_decay` names exempt) and,
    where the Q-Former's cross-attention is fresh (no stage-1 checkpoint brought it: BERT has
    none), its own rate (`new_cross_attention_lr_scale`; 1 = one rate, as LAVIS). Fused: one
    kernel, and it skips a step the device flagged (`found_inf`) without a host read."""
    lr = optim.get("lr", 1e-4)
    no_decay = tuple(optim.get("no_decay", NO_DECAY))
    new_scale = float(optim.get("new_cross_attention_lr_scale", 1.0)) if fresh else 1.0
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in named:
        if p.requires_grad:
            key = (
                not any(k in name for k in no_decay),
                new_scale != 1.0 and "crossattention" in name,
            )
            groups.setdefault(key, []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": optim.get("weight_decay", 0.05) if decays else 0.0,
                "lr": lr * (new_scale if new else 1.0),
            }
            for (decays, new), params in sorted(groups.items(), reverse=True)
        ],
        lr=lr,
        betas=tuple(optim.get("betas", (0.9, 0.999))),
        eps=optim.get("eps", 1e-8),
        fused=True,
    )


def lr_factor(
    step: int,
    *,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    start_ratio: float = 0.0,
    min_ratio: float = 0.1,
) -> float:
    """The multiple of the peak rate at `step`: a linear warm-up from `start_ratio`, then
    constant, cosine or linear down to `min_ratio`."""
    if step < warmup_steps:
        return start_ratio + (1.0 - start_ratio) * step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)


def build_scheduler(optimizer: Optimizer, optim: Mapping[str, Any], total_steps: int) -> LambdaLR:
    """transformers' schedules start at 0; fairseq's (the reference's) warm up from a non-zero
    rate, so the factor is written here once."""
    schedule = str(optim.get("schedule", "cosine"))
    if schedule not in SCHEDULES:
        raise ValueError(f"stage.optim.schedule={schedule}: expected one of {', '.join(SCHEDULES)}")
    lr = float(optim.get("lr", 1e-4))
    start = float(optim.get("warmup_init_lr") or 0.0)
    if not 0.0 <= start <= lr:
        raise ValueError(f"stage.optim.warmup_init_lr={start}: must be between 0 and lr={lr}")
    kwargs = {
        "schedule": schedule,
        "warmup_steps": min(int(optim.get("warmup_steps", 0)), total_steps),
        "total_steps": total_steps,
        "start_ratio": start / lr if lr > 0 else 0.0,
        "min_ratio": float(optim.get("min_lr_ratio", 0.1)),
    }
    return LambdaLR(optimizer, lambda step: lr_factor(step, **kwargs))


def clip_gradients(optimizer: Optimizer, max_norm: float | None) -> torch.Tensor | None:
    """Clip by norm where `max_norm` is set; the norm clip_grad_norm_ computes anyway, as a plain
    tensor (FSDP2's gradients are DTensors), for logging. None where nothing has a gradient."""
    from torch.distributed.tensor import DTensor

    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return None
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class StepSkips:
    """Which optimizer steps are skipped, kept on the device: flags accumulate over a step's
    micro-batches, are reduced over ranks, and are read on the host once per logging interval.

    `riders`: flags other parts of the run send along on the same all-reduce (a max over ranks),
    so they cost no collective of their own (the stop signals of sparqle/lifecycle.py);
    `reduced_riders` holds them after each step's reduction."""

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None
        self.run = self.longest = self.total = None
        self.riders: torch.Tensor | None = None
        self.reduced_riders: torch.Tensor | None = None

    def note(self, bad: torch.Tensor) -> None:
        bad = bad.float()
        self.pending = bad if self.pending is None else torch.maximum(self.pending, bad)

    def decide(self, device: torch.device) -> torch.Tensor:
        """1.0 if any rank flagged this step, else 0.0 (a device collective, no host read)."""
        zero = torch.zeros((), device=device)
        pending = self.pending if self.pending is not None else zero
        if self.riders is None:
            skip = all_reduce_max(pending)
        else:
            reduced = all_reduce_max(torch.cat([pending.reshape(1), self.riders]))
            skip, self.reduced_riders = reduced[0], reduced[1:]
        self.pending = None
        if self.total is None:
            self.run, self.longest, self.total = zero, zero, zero
        self.run = (self.run + 1) * skip
        self.longest = torch.maximum(self.longest, self.run)
        self.total = self.total + skip
        return skip

    def longest_run(self) -> int:
        """The longest run of skipped steps since the last call (one host read)."""
        if self.longest is None:
            return 0
        longest, self.longest = int(self.longest), torch.zeros_like(self.longest)
        return longest
