"""Evaluate checkpoints: `python eval.py ckpt=PATH data=... tasks=[asr,translate_de] out=DIR`.

`trainer.devices=N` generates on N devices (GPUs, or CPU processes), each a share of every
batch; the rows are gathered and one report is written, the same as one process writes.

Writes per-utterance TSVs, report.json (metrics, sacrebleu signatures, config, checkpoint
hashes, degenerate-output counts) and report.md (the table for a paper).
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("SPARQLE_ROOT", str(Path(__file__).resolve().parent))

from typing import TYPE_CHECKING  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from sparqle.cli import report_user_errors  # noqa: E402
from sparqle.config import register_resolvers  # noqa: E402
from sparqle.config_check import ConfigError, validate_config  # noqa: E402

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger("sparqle.eval")
register_resolvers()


def eval_trainer(cfg: DictConfig) -> L.Trainer:
    """Lightning runs generation: one process, or N (`trainer.devices=N`), each a share."""
    import lightning as L

    from sparqle.strategies import TrainableOnlyDDPStrategy

    devices, nodes = cfg.trainer.devices, cfg.trainer.get("num_nodes", 1)
    many = devices == "auto" or (devices if isinstance(devices, int) else len(devices)) * nodes > 1
    return L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=devices,
        num_nodes=nodes,
        strategy=TrainableOnlyDDPStrategy() if many else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the DataModules give each rank its share
        inference_mode=True,
    )


def generation_preset() -> str | None:
    """The `generation=` choice the report was decoded with (checkpoint, reference, ...)."""
    from hydra.core.hydra_config import HydraConfig

    return (
        HydraConfig.get().runtime.choices.get("generation") if HydraConfig.initialized() else None
    )


def refuse_feature_shards(data: DictConfig) -> None:
    """Scores come from the audio through the checkpoint's own encoder, never stored features."""
    if not str(data.get("_target_", "")).endswith("ShardDataModule"):
        return
    from sparqle.data.shards import feature_record

    held = {
        f"data.{k}": OmegaConf.to_container(data[k], resolve=True)
        for k in ("test", "val")
        if data.get(k)
    }
    if feature_record(held):
        raise ConfigError(
            "data: feature shards hold no audio; eval.py scores audio shards (data=shards) "
            "through the checkpoint's own encoder"
        )


def evaluate(cfg: DictConfig) -> dict:
    validate_config(cfg)  # before any model loads, and before torch and Lightning do (~6 s)
    refuse_feature_shards(cfg.data)
    ckpts = list(cfg.ckpt) if OmegaConf.is_list(cfg.ckpt) else [cfg.ckpt]
    from hydra.utils import instantiate

    from sparqle.checkpoints import fingerprint
    from sparqle.distributed import gather_objects
    from sparqle.evaluation import (
        BatchGenerator,
        merge_rank_rows,
        score,
        task_key,
        write_report,
        write_rows,
    )
    from sparqle.export import load_model
    from sparqle.inference import piece_seconds
    from sparqle.models.llm import check_generation

    overrides = {
        k: v
        for k, v in OmegaConf.to_container(cfg.generation, resolve=True).items()
        if v is not None
    }
    cap = OmegaConf.to_container(cfg.length_cap, resolve=True)
    trainer = eval_trainer(cfg)
    lead = trainer.is_global_zero
    out = Path(cfg.out)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    report = {"config": OmegaConf.to_container(cfg, resolve=True), "models": {}}
    loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c is not None] if lead else []
    for ckpt in ckpts:
        module = load_model(ckpt, "cpu")
        name = Path(ckpt).stem if Path(ckpt).is_file() else Path(ckpt).name
        if name in report["models"]:
            name = f"{name}-{len(report['models'])}"
        # the references cased as the model learnt its targets (data.text_case of its training)
        case = module.hparams.get("text_case") if cfg.text_case == "checkpoint" else cfg.text_case
        datamodule = instantiate(
            cfg.data, sample_rate=module.model.encoder.sample_rate, text_case=case
        )
        # the checkpoint's own decoding settings (from its training config), then the overrides
        generation = {**module.generation, **overrides}
        if generation.get("max_new_tokens") == "auto":
            generation.pop("max_new_tokens")
        generation = check_generation(generation)
        log.info("%s: decoding with %s", name, generation)
        pieces = None
        if cfg.vad:
            pieces = piece_seconds(module, cfg.max_piece_seconds)
            log.info("%s: VAD on, clips cut at pauses into pieces of <= %.1f s", name, pieces)
        entry = {
            "generation_preset": generation_preset(),
            "text_case": case,
            "checkpoint": str(ckpt),
            "checkpoint_sha256": fingerprint(ckpt),
            "generation": generation,
            "tasks": {},
        }
        all_rows = []
        for spec in cfg.tasks:
            runner = BatchGenerator(
                module,
                partial(datamodule.eval_dataloader, spec, batch_size=cfg.batch_size),
                spec,
                generation,
                cap,
                cfg.precision,
                max_piece_seconds=pieces,
            )
            started = time.perf_counter()
            mine = trainer.predict(runner)
            rows, skipped = merge_rank_rows(gather_objects(mine))
            key = task_key(spec)
            took = time.perf_counter() - started
            if lead:
                log.info(
                    "%s %s: %d utterances decoded in %.2f s (%.1f a second, %d rank(s))",
                    name,
                    key,
                    len(rows),
                    took,
                    len(rows) / max(took, 1e-9),
                    trainer.world_size,
                )
            entry["tasks"][key] = score(rows, key, skipped, module.hparams.get("train_tasks"))
            all_rows += rows
            log.info(
                "%s %s: %s",
                name,
                key,
                {k: v for k, v in entry["tasks"][key].items() if "signature" not in k},
            )
        if lead:
            write_rows(out / f"{name}.tsv", all_rows)
        report["models"][name] = entry
        for lg in loggers:
            lg.log_metrics(
                {
                    f"eval/{name}/{t}/{k}": v
                    for t, m in entry["tasks"].items()
                    for k, v in m.items()
                    if isinstance(v, (int, float))
                }
            )
        del module
    if lead:
        write_report(out, report)
        print((out / "report.md").read_text())
        print(f"report: {out / 'report.md'}  per-utterance: {out}/*.tsv")
    return report


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    report_user_errors(evaluate, cfg)


if __name__ == "__main__":
    main()
