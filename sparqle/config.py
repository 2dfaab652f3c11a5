"""Hydra/OmegaConf glue: the resolvers the configs use (registered by each entry point), and what
a composed config is turned into before a run is built (the global batch for this many ranks).
The checks a config passes first: sparqle/config_check.py."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from sparqle.config_check import LR_SCALINGS, ConfigError


def _tiny(kind: str, root: str) -> str:
    from sparqle.models.tiny import ensure_tiny

    return ensure_tiny(kind, root)


def _packaged(name: str, root: str) -> str:
    from sparqle.models.packaged import ensure_packaged

    return ensure_packaged(name, root)


def _cpu_bf16(native: str, otherwise: str) -> str:
    from sparqle.strategies import cpu_has_native_bf16

    return native if cpu_has_native_bf16() else otherwise


def _run_id(run_name: str | None = None) -> str:
    from sparqle.run_dir import run_id

    return run_id(run_name)


def _mul(a: Any, b: Any) -> Any:
    return a * b


def _eq(a: Any, b: Any) -> bool:
    return a == b


def register_resolvers() -> None:
    """`${tiny:KIND,ROOT}`: a tiny random model, built on first use; `${packaged:NAME,ROOT}`: a
    real pretrained part shipped in a PyPI package, converted on first use;
    `${cpu_bf16:A,B}`: A where the CPU has bf16 maths in hardware, else B;
    `${run_id:NAME}`: the run directory's name, from NAME or the launcher (sparqle/run_dir.py),
    cached so a Hydra sweep's jobs keep the name the launching host gave;
    `${mul:A,B}`: A x B (optimizer steps -> batches); `${eq:A,B}`: whether A equals B (a key on
    in one stage only: `${eq:${stage.name},pretrain}`)."""
    if not OmegaConf.has_resolver("tiny"):
        OmegaConf.register_new_resolver("tiny", _tiny, use_cache=True)
    if not OmegaConf.has_resolver("packaged"):
        OmegaConf.register_new_resolver("packaged", _packaged, use_cache=True)
    if not OmegaConf.has_resolver("cpu_bf16"):
        OmegaConf.register_new_resolver("cpu_bf16", _cpu_bf16, use_cache=True)
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", _run_id, use_cache=True)
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", _mul)
    if not OmegaConf.has_resolver("eq"):
        OmegaConf.register_new_resolver("eq", _eq)


def world_size(trainer: DictConfig) -> int:
    """The ranks a run will have: the launcher's (torchrun's WORLD_SIZE, SLURM's SLURM_NTASKS),
    else devices x nodes (`auto`: every visible GPU, or 1 on a CPU)."""
    import os

    import torch

    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    devices = trainer.get("devices", 1)
    if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        devices = len(devices)
    elif devices in ("auto", -1):
        gpu = str(trainer.get("accelerator", "auto")) in ("gpu", "cuda", "auto")
        devices = torch.cuda.device_count() if gpu and torch.cuda.is_available() else 1
    return int(devices) * int(trainer.get("num_nodes", 1) or 1)


def apply_global_batch(cfg: DictConfig) -> dict[str, Any]:
    """`data.global_batch_size` (utterances an optimizer step over every rank) -> the per-rank
    batch (`data.batch_size`, at most the configured one) and gradient accumulation, for this
    run's number of ranks; then `stage.optim.lr` scaled from `stage.optim.lr_reference_batch` to
    the global batch by `stage.optim.lr_scaling` (none, linear, sqrt). Returns what it set."""
    data, optim = cfg.get("data"), OmegaConf.select(cfg, "stage.optim", default=None)
    if data is None:
        return {}
    world = world_size(cfg.trainer)
    done: dict[str, Any] = {}
    target = data.get("global_batch_size")
    if target is not None:
        cap = int(data.batch_size)
        accumulate = -(-int(target) // (world * cap))  # the fewest steps that fit the cap
        per_rank = int(target) // (world * accumulate)
        if per_rank * world * accumulate != target:
            raise ConfigError(
                f"data.global_batch_size={target}: not a multiple of {world} rank(s) x an "
                f"accumulation over batches of at most data.batch_size={cap}"
            )
        with open_dict(cfg):
            data.batch_size = per_rank
            cfg.trainer.accumulate_grad_batches = accumulate
        done = {"data.batch_size": per_rank, "trainer.accumulate_grad_batches": accumulate}
    scaling = optim.get("lr_scaling", "none") if optim is not None else "none"
    reference = optim.get("lr_reference_batch") if optim is not None else None
    if scaling not in LR_SCALINGS:
        raise ConfigError(f"stage.optim.lr_scaling={scaling!r}: expected one of none, linear, sqrt")
    if scaling != "none":
        if not reference:
            raise ConfigError(
                f"stage.optim.lr_scaling={scaling}: give stage.optim.lr_reference_batch, the "
                "global batch stage.optim.lr was set for"
            )
        batch = int(data.batch_size) * world * int(cfg.trainer.get("accumulate_grad_batches", 1))
        factor = batch / reference if scaling == "linear" else math.sqrt(batch / reference)
        with open_dict(cfg):
            optim.lr = float(optim.lr) * factor
        done["stage.optim.lr"] = optim.lr
    return done
