"""The checks a composed config passes before anything is built: every known key's type and range,
each model part's keys against its class, the cadence, the devices, the files, feature shards
against the run's encoder. A failure is one line naming the key and what it must be (exit 2)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from sparqle.data.tasks import TEXT_CASES

# what some keys may be, stated here once: the modules that act on them import these names
# (sparqle.build STAGES, sparqle.optim SCHEDULES). Nothing that loads torch at import:
# `train.py --cfg job` and a config error answer before it loads.
STAGES = ("pretrain", "instruct")
LR_SCALINGS = ("none", "linear", "sqrt")
SCHEDULES = ("constant", "cosine", "linear")


def check_devices(trainer: DictConfig) -> None:
    """Stop with one line when the trainer asks for devices this machine does not have."""
    accelerator = str(trainer.get("accelerator", "auto"))
    devices = trainer.get("devices", "auto")
    if OmegaConf.is_list(devices):
        devices = len(devices)
    if isinstance(devices, int) and devices < 1:
        raise ValueError(f"trainer.devices={devices}: must be at least 1 (or auto)")
    if accelerator in ("gpu", "cuda"):
        import torch

        have = torch.cuda.device_count()
        if have == 0:
            raise ValueError(
                f"trainer.accelerator={accelerator}: this machine has no GPU "
                "(trainer=cpu, or trainer.accelerator=cpu, runs on processes instead)"
            )
        if isinstance(devices, int) and devices > have:
            raise ValueError(f"trainer.devices={devices}: this machine has {have} GPU(s)")


def check_features(cfg: DictConfig) -> dict[str, Any] | None:
    """Feature shards' record, once their encoder, layer and window are the config's: features
    of another encoder would train an adapter that fails on that encoder's real output."""
    from sparqle.data.shards import data_features, describe_features

    record = data_features(OmegaConf.to_container(cfg.data, resolve=True))
    if record is None:
        return None
    if OmegaConf.select(cfg, "encoder.train_mode_augment", default=False):
        raise ConfigError(
            "encoder.train_mode_augment=true: the encoder's output changes every step in its "
            "training mode; feature shards hold one fixed output (train from audio shards, or "
            "set encoder.train_mode_augment=false)"
        )
    enc = cfg.encoder
    mine = {
        "encoder": str(enc.name_or_path),
        "layer": enc.get("layer", "last"),
        "whisper_window_seconds": enc.get("whisper_window_seconds"),
    }
    if (
        Path(mine["encoder"]).name != Path(str(record["encoder"])).name
        or str(mine["layer"]) != str(record.get("layer"))
        or mine["whisper_window_seconds"] != record.get("whisper_window_seconds")
    ):
        raise ConfigError(
            f"data: feature shards of {describe_features(record)}, but the run's encoder is "
            f"{describe_features(mine)} (extract them with these encoder= overrides, "
            "python -m data_prep.extract_features, or name their encoder)"
        )
    return record


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


class ConfigError(ValueError):
    """A composed config with a wrong type or an out-of-range value."""


Check = Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _int(lo: int | None = None, *, null: bool = False, words: tuple = ()) -> tuple[Check, str]:
    says = f"an integer >= {lo}" if lo is not None else "an integer"
    says += "".join(f" or {w}" for w in words) + (" or null" if null else "")
    return (
        lambda v: (v is None and null) or v in words or (_is_int(v) and (lo is None or v >= lo)),
        says,
    )


def _number(lo: float, hi: float | None = None, *, above: bool = False, null: bool = False):
    says = f"a number {'>' if above else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
    says += " or null" if null else ""

    def ok(v: Any) -> bool:
        if v is None:
            return null
        return _is_number(v) and (v > lo if above else v >= lo) and (hi is None or v <= hi)

    return ok, says


def _one_of(*options: Any) -> tuple[Check, str]:
    return (lambda v: v in options), "one of " + ", ".join(str(o) for o in options)


def _file_or(*words: Any) -> tuple[Check, str]:
    says = "an existing file" + "".join(f" or {'null' if w is None else w}" for w in words)
    return (lambda v: v in words or (isinstance(v, str) and Path(v).is_file())), says


def _checkpoints(v: Any) -> bool:
    paths = list(v) if isinstance(v, list | tuple | ListConfig) else [v]
    return bool(paths) and all(isinstance(p, str) and Path(p).exists() for p in paths)


def _betas(v: Any) -> bool:
    return (
        isinstance(v, list | tuple | ListConfig)
        and len(v) == 2
        and all(_is_number(b) and 0 <= b < 1 for b in v)
    )


def _devices(v: Any) -> bool:
    if isinstance(v, list | ListConfig):
        return len(v) > 0 and all(_is_int(d) and d >= 0 for d in v)
    return v == "auto" or v == -1 or (_is_int(v) and v >= 1)


PRECISIONS = (  # Lightning's names (and its older aliases); fp16 is not supported
    "32-true",
    "bf16-mixed",
    "bf16-true",
    "64-true",
    "32",
    32,
    "bf16",
    "64",
    64,
)
DTYPES = ("float32", "bfloat16", "float16")
# key -> (check, what it must be); a key absent from the composed config is not checked
RULES: dict[str, tuple[Check, str]] = {
    "seed": _int(0),
    "stage.name": _one_of(*STAGES),
    "stage.init_from": _file_or(None, "none"),
    "stage.optim.lr": _number(0, above=True),
    "stage.optim.weight_decay": _number(0),
    "stage.optim.eps": _number(0, above=True),
    "stage.optim.betas": (_betas, "two numbers in [0, 1)"),
    "stage.optim.schedule": _one_of(*SCHEDULES),
    "stage.optim.warmup_steps": _int(0),
    "stage.optim.warmup_init_lr": _number(0),
    "stage.optim.min_lr_ratio": _number(0, 1),
    "stage.optim.new_cross_attention_lr_scale": _number(0, above=True),
    "stage.pretrain.embed_dim": _int(1),
    "stage.pretrain.temperature": _number(0, above=True),
    "stage.pretrain.max_text_tokens": _int(1),
    "stage.pretrain.label_smoothing": _number(0, 1),
    "stage.pretrain.query_spread_weight": _number(0),
    "stage.pretrain.query_spread_target": _number(0, above=True),
    "stage.pretrain.itm_negatives": _one_of("node", "all"),
    "encoder.dtype": _one_of(*DTYPES),
    "encoder.sample_rate": _int(1),
    "encoder.cache_max_gb": _number(0, above=True),
    "encoder.train_mode_augment": _one_of(True, False),
    # every Whisper's window is 30 s (1,500 positions; the encoder checks its model's own)
    "encoder.whisper_window_seconds": _number(0, 30, above=True, null=True),
    "adapter.num_queries": _int(1),
    "adapter.cross_attention_frequency": _int(1),
    "adapter.num_layers": _int(1),
    "adapter.hidden_size": _int(1),
    "adapter.num_heads": _int(1),
    "adapter.dropout": _number(0, 1),
    "llm.dtype": _one_of(*DTYPES),
    "llm.max_target_tokens": _int(1, null=True),
    "data.batch_size": _int(1),
    "data.val_batch_size": _int(1, null=True),
    "data.num_workers": _int(0),
    "data.persistent_workers": _one_of(True, False),
    "data.pin_memory": _one_of(True, False, None),
    "data.min_seconds": _number(0),
    "data.max_seconds": _number(0, above=True, null=True),
    "data.max_seconds_per_batch": _number(0, above=True),
    "data.max_tokens": _int(1, null=True),
    "data.token_overhead": _int(0, null=True),
    "data.pool_size": _int(1),
    "data.global_batch_size": _int(1, null=True),
    "stage.optim.lr_scaling": _one_of(*LR_SCALINGS),
    "stage.optim.lr_reference_batch": _int(1, null=True),
    "data.text_case": _one_of(*TEXT_CASES),
    "trainer.max_steps": _int(-1),
    "trainer.max_epochs": _int(-1, null=True),
    "trainer.devices": (_devices, "an integer >= 1, a list of device indices, or auto"),
    "trainer.num_nodes": _int(1),
    "trainer.accumulate_grad_batches": _int(1),
    "trainer.gradient_clip_val": _number(0, null=True),
    "trainer.precision": (
        lambda v: v in PRECISIONS,
        "one of 32-true, bf16-mixed, bf16-true, 64-true (fp16 is not supported: bf16-mixed)",
    ),
    "trainer.val_check_interval": _number(0, above=True, null=True),
    "val_every_n_steps": _int(1),
    "trainer.log_every_n_steps": _int(1),
    "generation.num_beams": _int(1, null=True),
    "generation.max_new_tokens": _int(1, null=True, words=("auto",)),
    "val_decode_clips": _int(0),
    "max_nonfinite_steps": _int(1),
    "ckpt": (_checkpoints, "an existing checkpoint file or exported directory, or a list of them"),
    "ckpt_path": _file_or(None, "last"),
    "batch_size": _int(1),
    "vad": _one_of(True, False),
    "max_piece_seconds": _number(0, above=True, null=True),
}
# the manifests training reads (evaluation reads only the test one, else the validation one)
TRAIN_FILES: dict[str, tuple[Check, str]] = {
    f"data.{split}_manifest": _file_or(None) for split in ("train", "val", "test")
}


_ABSENT = object()


def _check(cfg: DictConfig, rules: dict[str, tuple[Check, str]]) -> None:
    for key, (ok, says) in rules.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        if not ok(value):
            raise ConfigError(f"{key}={value!r}: expected {says}")


def validate_group(cfg: DictConfig, group: str) -> None:
    """The rules of one config group alone (a tool that builds only that part)."""
    _check(cfg, {k: v for k, v in RULES.items() if k.startswith(f"{group}.")})


def accepted_keys(target: str) -> set[str] | None:
    """The config keys a `_target_` class takes (None: it takes any). A class that passes its
    extra keys on names where (`forwards_to`), and those count too."""
    import importlib
    import inspect

    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    keys: set[str] = set()
    while cls is not None:
        params = inspect.signature(cls).parameters.values()
        keys |= {p.name for p in params if p.kind is not p.VAR_KEYWORD}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return keys
        cls = getattr(cls, "forwards_to", None)
    return None


def _choice(group: str) -> str | None:
    """The config-group option Hydra composed (`adapter=linear` -> linear), where known."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def check_group_keys(
    cfg: DictConfig, groups: tuple[str, ...] = ("encoder", "adapter", "llm")
) -> None:
    """Every key of a model part's config is one its class takes: a key left by another choice
    (an experiment's Q-Former settings under `adapter=linear`) stops here in one line, not as a
    traceback after the LLM has loaded."""
    for group in groups:
        part = cfg.get(group)
        target = part.get("_target_") if isinstance(part, DictConfig) else None
        if not target:
            continue
        keys = accepted_keys(str(target))
        if keys is None:
            continue
        choice = _choice(group) or str(target).rsplit(".", 1)[-1]
        for key in part:
            if key != "_target_" and key not in keys:
                raise ConfigError(
                    f"{group}.{key}: not a setting of {group}={choice} (it takes "
                    f"{', '.join(sorted(keys - {'encoder_dim', 'llm_dim', 'frame_rate', 'device'}))})"
                )


def _check_cadence(cfg: DictConfig) -> None:
    """Validation and checkpoints count optimizer steps (`val_every_n_steps`); Lightning's
    `trainer.val_check_interval` counts batches and follows from it. Set by hand to another
    value, checkpoints would miss validations under gradient accumulation."""
    trainer = cfg.get("trainer")
    if trainer is None or "val_every_n_steps" not in cfg or "val_check_interval" not in trainer:
        return
    if OmegaConf.is_interpolation(trainer, "val_check_interval"):
        return
    every, accumulate = cfg.val_every_n_steps, trainer.get("accumulate_grad_batches", 1)
    if trainer.val_check_interval != every * accumulate:
        raise ConfigError(
            f"trainer.val_check_interval={trainer.val_check_interval}: set val_every_n_steps "
            f"(optimizer steps; validation every val_every_n_steps x accumulate_grad_batches "
            f"batches, a checkpoint after each) instead"
        )


def validate_config(cfg: DictConfig, run_here: bool = False) -> None:
    """Check every known key of a composed config before anything is built, so a wrong type or
    range stops at once with one line naming the key and what it must be; with `run_here` (train.py)
    also the devices it asks of this machine and the files it reads. The model parts' keys come
    last: their classes load torch."""
    _check(cfg, RULES)
    min_s, max_s = cfg.get("data", {}).get("min_seconds"), cfg.get("data", {}).get("max_seconds")
    if _is_number(min_s) and _is_number(max_s) and min_s >= max_s:
        raise ConfigError(f"data.min_seconds={min_s}: must be below data.max_seconds={max_s}")
    window = OmegaConf.select(cfg, "encoder.whisper_window_seconds", default=None)
    if _is_number(window) and not (_is_number(max_s) and max_s <= window):
        raise ConfigError(
            f"data.max_seconds={max_s}: must be at most encoder.whisper_window_seconds={window} "
            "(a longer clip would lose its end)"
        )
    spread = OmegaConf.select(cfg, "stage.pretrain.query_spread_weight", default=0)
    dropout = OmegaConf.select(cfg, "adapter.dropout", default=0)
    if cfg.get("stage", {}).get("name") == "pretrain" and _is_number(spread) and spread > 0:
        if _is_number(dropout) and dropout > 0:
            raise ConfigError(
                f"stage.pretrain.query_spread_weight={spread}: needs adapter.dropout=0 "
                f"(is {dropout}): dropout's own noise would pass for spread between the queries"
            )
    _check_cadence(cfg)
    if OmegaConf.select(cfg, "encoder.train_mode_augment", default=False) and OmegaConf.select(
        cfg, "encoder.cache_features", default=False
    ):
        raise ConfigError(
            "encoder.train_mode_augment=true with encoder.cache_features=true: the encoder's "
            "output changes every step in its training mode, so there is nothing to cache"
        )
    strategy = OmegaConf.select(cfg, "trainer.strategy._target_", default="")
    devices, nodes = (
        cfg.get("trainer", {}).get("devices"),
        cfg.get("trainer", {}).get("num_nodes", 1),
    )
    if str(strategy).endswith("FSDP2Strategy") and devices == 1 and nodes == 1:
        raise ConfigError(
            "trainer.devices=1: trainer=fsdp shards over 2 or more devices (trainer=default "
            "or trainer=gpu trains on one)"
        )
    if run_here:
        if isinstance(cfg.get("trainer"), DictConfig):
            check_devices(cfg.trainer)
        _check(cfg, TRAIN_FILES)
    check_group_keys(cfg)
