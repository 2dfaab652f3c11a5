"""Trainable-only export for sharing: `adapter.safetensors` + the config that rebuilds the model.

    python -m sparqle.export --ckpt logs/.../checkpoints/last.ckpt --out exports/my-run [--dtype bfloat16]

The frozen encoder and LLM are not copied: `config.yaml` names them (hub name or path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from sparqle.cli import reports_user_errors

WEIGHTS = "adapter.safetensors"
CONFIG = "config.yaml"
CLIP_SECONDS = "trained_clip_seconds"


def export(ckpt_path: str | Path, out: str | Path, dtype: str | None = None) -> dict[str, Any]:
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
    if ckpt.get("sparqle_clip_seconds"):  # the clip lengths it trained on, for inference
        config[CLIP_SECONDS] = list(ckpt["sparqle_clip_seconds"])
    (out / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return {
        "tensors": len(state),
        "bytes": sum(v.numel() * v.element_size() for v in state.values()),
    }


def load_exported(path: str | Path, **overrides: Any):
    """A SparQLeModule rebuilt from an export: frozen parts from their names, the rest from the file."""
    from sparqle.module import CheckpointMismatch, SparQLeModule

    path = Path(path)
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS} (not a SparQLe export)")
    config = yaml.safe_load((path / CONFIG).read_text())
    config.update(overrides)
    clip_seconds = config.pop(CLIP_SECONDS, None)
    config["stage"] = {
        **config["stage"],
        "init_from": None,
    }  # the adapter weights are in the export
    config.pop("val_decode_batches", None)  # exports written before 2026-12-01
    module = SparQLeModule(**config)
    state = load_file(path / WEIGHTS)
    own = module.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in module.trainable_names() if k not in state]
    if bad or missing:
        first = (bad or missing)[0]
        raise CheckpointMismatch(
            f"{path}: export does not fit its own config ({len(bad)} unknown or wrongly shaped, "
            f"{len(missing)} missing tensors; first: {first})"
        )
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    module.clip_seconds = tuple(clip_seconds) if clip_seconds else None
    return module


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, help="cast floating tensors, e.g. bfloat16")
    args = p.parse_args(argv)
    info = export(args.ckpt, args.out, args.dtype)
    print(
        f"{info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB -> {args.out}", file=sys.stderr
    )


if __name__ == "__main__":
    main()
