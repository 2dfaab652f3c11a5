"""How training runs on the hardware: FSDP wraps each repeated block; bf16 on CPUs that have it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from transformers import PreTrainedModel


def block_classes(root: nn.Module) -> set[type[nn.Module]]:
    """The transformer block class of every transformers model inside root.

    For each model, the largest list of identical blocks that hold attention: LLM decoder layers,
    speech-encoder layers (not the conv front end), Q-Former layers.
    """
    classes: set[type[nn.Module]] = set()
    for model in root.modules():
        if not isinstance(model, PreTrainedModel):
            continue
        lists = [
            m
            for m in model.modules()
            if isinstance(m, nn.ModuleList)
            and len(m) > 1
            and len({type(c) for c in m}) == 1
            and any("attn" in name or "attention" in name for name, _ in m[0].named_children())
        ]
        if lists:
            biggest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
            classes.add(type(biggest[0]))
    return classes


def fsdp_strategy(
    module: nn.Module, activation_checkpointing: bool = False, **kwargs: Any
) -> FSDPStrategy:
    """FSDP with one unit per block; frozen and trainable weights share units (use_orig_params)."""
    blocks = block_classes(module)
    return FSDPStrategy(
        auto_wrap_policy=blocks,
        activation_checkpointing_policy=blocks if activation_checkpointing else None,
        **kwargs,
    )


BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 / AMX, Arm FEAT_BF16


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU does bf16 matrix maths in hardware (there bf16 is ~2x faster than fp32;
    elsewhere it is emulated and slower). Reads /proc/cpuinfo; False where it cannot tell."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    lines = re.findall(r"^(?:flags|Features)\s*:(.*)$", cpuinfo, re.MULTILINE)
    return bool(lines) and bool(BF16_CPU_FLAGS & set(lines[0].split()))
