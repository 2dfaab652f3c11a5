"""Hydra/OmegaConf glue: resolvers the configs use, and turning a config into objects."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf


def _tiny(kind: str, root: str) -> str:
    from sparqle.models.tiny import ensure_tiny

    return ensure_tiny(kind, root)


def _packaged(name: str, root: str) -> str:
    from sparqle.models.packaged import ensure_packaged

    return ensure_packaged(name, root)


def _cpu_bf16(native: str, otherwise: str) -> str:
    from sparqle.strategies import cpu_has_native_bf16

    return native if cpu_has_native_bf16() else otherwise


def register_resolvers() -> None:
    """`${tiny:KIND,ROOT}`: a tiny random model, built on first use; `${packaged:NAME,ROOT}`: a
    real pretrained part shipped in a PyPI package, converted on first use;
    `${cpu_bf16:A,B}`: A where the CPU has bf16 maths in hardware, else B."""
    if not OmegaConf.has_resolver("tiny"):
        OmegaConf.register_new_resolver("tiny", _tiny, use_cache=True)
    if not OmegaConf.has_resolver("packaged"):
        OmegaConf.register_new_resolver("packaged", _packaged, use_cache=True)
    if not OmegaConf.has_resolver("cpu_bf16"):
        OmegaConf.register_new_resolver("cpu_bf16", _cpu_bf16, use_cache=True)


def training_tasks(data: DictConfig) -> list[str]:
    """Task specs the configured data trains on (to tell zero-shot directions apart at eval)."""
    default = data.get("tasks") or OmegaConf.create({})
    sources = (data.get("train") or {}).values()  # shards: named sources, each may set its own
    weights = [OmegaConf.to_container(src.get("tasks") or default) for src in sources]
    if not weights:
        weights.append(OmegaConf.to_container(default))
    return sorted({k for w in weights for k, v in w.items() if float(v) > 0} or {"transcribe"})


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
        "train_tasks": training_tasks(cfg.data),
    }


def check_devices(trainer: DictConfig) -> None:
    """Stop with one line when the trainer asks for devices this machine does not have."""
    import torch

    accelerator = str(trainer.get("accelerator", "auto"))
    devices = trainer.get("devices", "auto")
    if OmegaConf.is_list(devices):
        devices = len(devices)
    if isinstance(devices, int) and devices < 1:
        raise ValueError(f"trainer.devices={devices}: must be at least 1 (or auto)")
    if accelerator in ("gpu", "cuda"):
        have = torch.cuda.device_count()
        if have == 0:
            raise ValueError(
                f"trainer.accelerator={accelerator}: this machine has no GPU "
                "(trainer=cpu, or trainer.accelerator=cpu, runs on processes instead)"
            )
        if isinstance(devices, int) and devices > have:
            raise ValueError(f"trainer.devices={devices}: this machine has {have} GPU(s)")


def check_init_from(cfg: DictConfig) -> None:
    """Stage 2 of a Q-Former with no stage-1 checkpoint starts the Q-Former from BERT: warn, or
    stop where `stage.require_init_from` is set (the paper preset); `stage.init_from=none`
    says it is meant."""
    stage = cfg.stage
    if stage.name != "instruct" or cfg.get("ckpt_path") or stage.get("init_from") is not None:
        return
    if "qformer" not in str(cfg.adapter.get("_target_", "")).lower():
        return
    msg = (
        "stage=instruct without stage.init_from: the Q-Former starts from BERT, not from a "
        "stage-1 checkpoint (stage.init_from=PATH, or stage.init_from=none if that is meant)"
    )
    if stage.get("require_init_from"):
        raise ValueError(msg)
    logging.getLogger("sparqle.train").warning(msg)


def report_user_errors(
    fn: Callable[[DictConfig], Any], cfg: DictConfig, errors: tuple[type, ...]
) -> Any:
    """Run an entry point; a user error (bad path, field, option) ends it with one line.
    HYDRA_FULL_ERROR=1 shows the traceback instead."""
    try:
        return fn(cfg)
    except errors as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


register_resolvers()
