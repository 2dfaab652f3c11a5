"""Hydra/OmegaConf glue: resolvers the configs use, and turning a config into objects."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def _tiny(kind: str, root: str) -> str:
    from sparqle.models.tiny import ensure_tiny

    return ensure_tiny(kind, root)


def register_resolvers() -> None:
    """`${tiny:KIND,ROOT}` -> path of a tiny random model, built on first use."""
    if not OmegaConf.has_resolver("tiny"):
        OmegaConf.register_new_resolver("tiny", _tiny, use_cache=True)


def module_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The parts of the composed config the LightningModule is built (and rebuilt) from."""
    return {
        "stage": OmegaConf.to_container(cfg.stage, resolve=True),
        "encoder": OmegaConf.to_container(cfg.encoder, resolve=True),
        "adapter": OmegaConf.to_container(cfg.adapter, resolve=True),
        "llm": OmegaConf.to_container(cfg.llm, resolve=True),
        "generation": OmegaConf.to_container(cfg.generation, resolve=True),
        "val_decode_batches": cfg.val_decode_batches,
        "max_nonfinite_steps": cfg.max_nonfinite_steps,
    }


register_resolvers()
