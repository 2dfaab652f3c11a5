"""The repeated transformer blocks of the models inside SparQLe, and activation checkpointing on
them: what FSDP2 wraps one unit each, and what is recomputed in backward instead of kept.

Checkpointing uses torch's composable `checkpoint` (non-reentrant), which recomputes a block in
backward whatever its train/eval mode and keeps parameter names unchanged (so checkpoints and
LoRA weights are named as without it). transformers' own gradient checkpointing acts only on
modules in training mode, and the frozen LLM stays in eval mode, so it never applied there.
"""

from __future__ import annotations

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


def checkpoint_blocks(root: nn.Module, keep: callable | None = None) -> list[str]:
    """Recompute every block of `root` in backward instead of keeping its activations (only the
    block's input is kept); `keep(block)` False leaves a block alone. Applied once per block.
    Returns the names of the blocks it applies to."""
    from torch.distributed._composable import checkpoint

    names = []
    blocks = tuple(block_classes(root))
    for name, module in root.named_modules():
        if not isinstance(module, blocks) or getattr(module, "_sparqle_checkpointed", False):
            continue
        if keep is not None and not keep(module):
            continue
        checkpoint(module)
        module._sparqle_checkpointed = True
        names.append(name)
    return names
