"""Train SparQLe: `python train.py [stage=...] [encoder=...] [experiment=...] [key=value ...]`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("SPARQLE_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from sparqle.cli import USER_ERRORS, report_user_errors  # noqa: E402
from sparqle.config import register_resolvers  # noqa: E402
from sparqle.config_check import validate_config  # noqa: E402

log = logging.getLogger("sparqle.train")
register_resolvers()  # before Hydra composes: ${tiny:..}, ${run_id:..}, ${mul:..} ...


def check(cfg: DictConfig) -> None:
    """The composed config's keys and files, before Lightning loads (~6 s): a mistake is one
    line, within a second unless it is a model part's key (checked against its class)."""
    validate_config(cfg, run_here=True)


def train(cfg: DictConfig) -> dict[str, float]:
    """Build the run from a config that passed `check`, and fit it."""
    import lightning as L
    from hydra.utils import instantiate

    from sparqle.config import apply_global_batch
    from sparqle.config_check import check_features, check_init_from
    from sparqle.lifecycle import StopOnSignal, resolve_resume
    from sparqle.lit_module import SparQLeModule
    from sparqle.strategies import load_device

    check_init_from(cfg)
    for key, value in apply_global_batch(cfg).items():  # per-rank batch for this many ranks
        log.info("%s=%s (data.global_batch_size / stage.optim.lr_scaling)", key, value)
    features = check_features(cfg)  # feature shards: their encoder is this config's
    L.seed_everything(cfg.seed, workers=True)
    checkpoints = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
    resume = resolve_resume(cfg.ckpt_path, checkpoints or f"{cfg.paths.output_dir}/checkpoints")
    loggers = [instantiate(c, **logger_run(c, cfg)) for c in (cfg.logger or {}).values() if c]
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    for callback in callbacks:
        if isinstance(callback, StopOnSignal):
            callback.resume_from = resume  # every rank's choice is compared once they connect
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    module = SparQLeModule.from_config(
        cfg,
        features=features,
        load_device=load_device(cfg.trainer.accelerator, cfg.trainer.devices),
    )
    measured = {}
    if "token_overhead" in cfg.data and cfg.data.token_overhead is None:
        measured["token_overhead"] = module.model.token_overhead()
        log.info("data.token_overhead=%d (measured from the prompt)", measured["token_overhead"])
    datamodule = instantiate(cfg.data, **measured)
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in module.parameters())
    log.info(
        "stage=%s: %.2fM of %.2fM parameters trainable", cfg.stage.name, n_train / 1e6, n_all / 1e6
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def logger_run(logger: DictConfig, cfg: DictConfig) -> dict[str, str]:
    """A wandb logger resumes the run directory's own wandb run (a requeued job logs on)."""
    from sparqle.run_dir import wandb_run_id

    if not str(logger.get("_target_", "")).endswith("WandbLogger") or logger.get("id"):
        return {}
    return {"id": wandb_run_id(cfg.paths.output_dir), "resume": "allow"}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    report_user_errors(check, cfg)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from sparqle.optim import TrainingDiverged

    report_user_errors(
        train, cfg, errors=(*USER_ERRORS, TrainingDiverged, MisconfigurationException)
    )


if __name__ == "__main__":
    main()
