"""Learning-rate schedules: a linear warm-up from a start rate, then constant, cosine or linear.

fairseq's `--lr-scheduler cosine --warmup-init-lr 1e-6` (the reference's) warms up from a
non-zero rate; transformers' schedules start at 0, so the factor is written here once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(
    step: int,
    *,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    start_ratio: float = 0.0,
    min_ratio: float = 0.1,
) -> float:
    """The multiple of the peak rate at `step`."""
    if step < warmup_steps:
        return start_ratio + (1.0 - start_ratio) * step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)


def build_scheduler(optimizer: Optimizer, optim: Mapping[str, Any], total_steps: int) -> LambdaLR:
    """From `stage.optim`: schedule (constant|cosine|linear), warmup_steps, warmup_init_lr (the
    rate warm-up starts from), min_lr_ratio (where cosine/linear end, times lr)."""
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
