"""Evaluate checkpoints: `python eval.py ckpt=PATH data=... tasks=[asr,translate_de] out=DIR`.

Writes per-utterance TSVs, report.json (metrics, sacrebleu signatures, config, checkpoint
hashes, degenerate-output counts) and report.md (the table for a paper).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("SPARQLE_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from sparqle.config import report_user_errors  # noqa: E402  (registers resolvers)
from sparqle.data.manifest import ManifestError  # noqa: E402
from sparqle.evaluation import (
    fingerprint,
    generate_rows,
    load_model,
    score,
    task_key,
    write_report,
    write_rows,
)  # noqa: E402
from sparqle.models.llm import check_generation  # noqa: E402
from sparqle.module import CheckpointMismatch  # noqa: E402

log = logging.getLogger("sparqle.eval")
USER_ERRORS = (ManifestError, CheckpointMismatch, FileNotFoundError, ValueError)


def evaluate(cfg: DictConfig) -> dict:
    ckpts = list(cfg.ckpt) if OmegaConf.is_list(cfg.ckpt) else [cfg.ckpt]
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    overrides = {
        k: v
        for k, v in OmegaConf.to_container(cfg.generation, resolve=True).items()
        if v is not None
    }
    cap = OmegaConf.to_container(cfg.length_cap, resolve=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": OmegaConf.to_container(cfg, resolve=True), "models": {}}
    loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
    for ckpt in ckpts:
        module = load_model(ckpt, device)
        name = Path(ckpt).stem if Path(ckpt).is_file() else Path(ckpt).name
        if name in report["models"]:
            name = f"{name}-{len(report['models'])}"
        datamodule = instantiate(cfg.data, sample_rate=module.model.encoder.sample_rate)
        # the checkpoint's own decoding settings (from its training config), then the overrides
        generation = {**module.generation, **overrides}
        if generation.get("max_new_tokens") == "auto":
            generation.pop("max_new_tokens")
        generation = check_generation(generation)
        log.info("%s: decoding with %s", name, generation)
        entry = {
            "checkpoint": str(ckpt),
            "checkpoint_sha256": fingerprint(ckpt),
            "generation": generation,
            "tasks": {},
        }
        all_rows = []
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        ) as progress:
            for spec in cfg.tasks:
                loader = datamodule.eval_dataloader(spec, batch_size=cfg.batch_size)
                rows, skipped = generate_rows(module, loader, spec, generation, progress, cap)
                key = task_key(spec)
                entry["tasks"][key] = score(rows, key, skipped, module.hparams.get("train_tasks"))
                all_rows += rows
                log.info(
                    "%s %s: %s",
                    name,
                    key,
                    {k: v for k, v in entry["tasks"][key].items() if "signature" not in k},
                )
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
    write_report(out, report)
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.md'}  per-utterance: {out}/*.tsv")
    return report


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    report_user_errors(evaluate, cfg, USER_ERRORS)


if __name__ == "__main__":
    main()
