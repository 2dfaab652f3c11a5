"""A trained model out of its run and back: the trainable-only export, and loading either kind.

    python -m sparqle.export --ckpt logs/.../checkpoints/last.ckpt --out exports/my-run [--dtype bfloat16]

An export holds `adapter.safetensors` (the trained tensors), `config.yaml` (the hparams that
rebuild the model, with the clip lengths it trained on) and `README.md`, its model card
(sparqle/model_card.py; `--report eval/report.json` adds the checkpoint's scores). The frozen encoder and LLM are not
copied: the config names them (hub name or path). `load_model` reads an export or a full training
checkpoint, for eval.py, transcribe, the app and the benches. What a training checkpoint holds:
sparqle/checkpoints.py.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from sparqle.checkpoints import (
    CLIP_SECONDS,
    CONFIG,
    WEIGHTS,
    check_fits,
    clip_seconds,
    fingerprint,
    trainable_names,
)
from sparqle.cli import reports_user_errors
from sparqle.lit_module import SparQLeModule
from sparqle.model_card import CARD, model_card, report_scores, run_config


def export(
    ckpt_path: str | Path,
    out: str | Path,
    dtype: str | None = None,
    report: str | Path | None = None,
) -> dict[str, Any]:
    """The trained tensors of a training checkpoint, the config that rebuilds the model, and its
    model card (README.md; with the scores of an eval.py `report` of this checkpoint)."""
    scores = report_scores(report, fingerprint(ckpt_path)) if report else None
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    trainable = ckpt.get("sparqle_trainable")
    if trainable is None:
        raise ValueError(
            f"{ckpt_path}: not a SparQLe training checkpoint (no 'sparqle_trainable' list)"
        )
    state = {k: v for k, v in ckpt["state_dict"].items() if k in set(trainable)}
    if dtype:
        state = {
            k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()
        }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, out / WEIGHTS, metadata={"format": "pt"}
    )
    config = dict(ckpt["hyper_parameters"])
    if clip_seconds(ckpt):  # the clip lengths it trained on, for inference
        config[CLIP_SECONDS] = list(clip_seconds(ckpt))
    (out / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    card = model_card(
        config,
        out.resolve().name,
        len(state),
        ckpt.get("global_step"),
        run_config(ckpt_path),
        scores,
    )
    (out / CARD).write_text(card, encoding="utf-8")
    return {
        "tensors": len(state),
        "bytes": sum(v.numel() * v.element_size() for v in state.values()),
    }


def load_exported(path: str | Path, **overrides: Any):
    """A SparQLeModule rebuilt from an export: frozen parts from their names, the rest from the file."""
    path = Path(path)
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS} (not a SparQLe export)")
    config = yaml.safe_load((path / CONFIG).read_text())
    config.update(overrides)
    trained = config.pop(CLIP_SECONDS, None)
    config.pop("val_decode_batches", None)  # exports written before 2026-12-01
    config["stage"] = {**config["stage"], "init_from": None}  # the weights are in the export
    module = SparQLeModule(**config)
    state = load_file(path / WEIGHTS)
    own = module.state_dict()
    check_fits(own, state, trainable_names(module), f"{path}: the export", "not its own config?")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    module.trained_clip_seconds = tuple(trained) if trained else None
    return module


def load_model(path: str | Path, device: str | torch.device = "cpu", generates: bool = True):
    """A SparQLeModule from an export folder or a full training checkpoint, in eval mode;
    `generates=False` also accepts a stage-1 one (no LLM: for looking at its Q-Former)."""
    path = Path(path)
    if path.is_dir() and (path / WEIGHTS).is_file():
        module = load_exported(path)
    elif path.is_file():
        hparams = torch.load(path, map_location="cpu", weights_only=True).get(
            "hyper_parameters", {}
        )
        stage = {**hparams.get("stage", {}), "init_from": None}  # the weights are in the checkpoint
        with warnings.catch_warnings():  # the frozen encoder/LLM are absent from it by design
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict")
            module = SparQLeModule.load_from_checkpoint(
                path, map_location="cpu", weights_only=True, stage=stage
            )
    else:
        raise FileNotFoundError(f"ckpt={path}: neither a checkpoint file nor an export folder")
    if generates and module.stage != "instruct":
        raise ValueError(
            f"ckpt={path}: a stage-{module.stage} model cannot generate text; evaluate a stage-instruct one"
        )
    return module.to(device).eval()


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, help="cast floating tensors, e.g. bfloat16")
    p.add_argument("--report", default=None, help="eval.py's report.json: its scores in the card")
    args = p.parse_args(argv)
    info = export(args.ckpt, args.out, args.dtype, args.report)
    print(
        f"{info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB -> {args.out}", file=sys.stderr
    )


if __name__ == "__main__":
    main()
