"""Distributed strategies whose settings depend on the model: FSDP wraps each repeated block."""

from __future__ import annotations

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
