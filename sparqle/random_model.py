"""The SparQLeModule of a config with random weights, for plans and benchmarks: published model
names are built from their architectures (sparqle/models/architectures.py), so nothing is
downloaded; on the meta device nothing is allocated either."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from sparqle.config import register_resolvers
from sparqle.lit_module import SparQLeModule
from sparqle.models.architectures import ARCHITECTURES, architecture_dir, random_weights

ROOT = Path(__file__).resolve().parents[1]


def build_module(overrides: list[str], meta: bool = False):
    """(SparQLeModule with random weights, composed config) from train.py's overrides, for plans
    and benchmarks: published model names are built from their architectures
    (sparqle/models/architectures.py); with `meta`, on the meta device: shapes and dtypes only,
    nothing allocated; else on the best device."""
    os.environ.setdefault("SPARQLE_ROOT", str(ROOT))
    register_resolvers()
    if not any(o.startswith("experiment=") for o in overrides):
        overrides = ["experiment=tiny", *overrides]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "paths.output_dir=/tmp"])
    for group, key in (("encoder", "name_or_path"), ("llm", "name_or_path"), ("adapter", "bert")):
        if cfg[group].get(key) in ARCHITECTURES:
            cfg[group][key] = architecture_dir(cfg[group][key], Path(cfg.paths.cache_dir))
    if meta:
        with random_weights(), torch.device("meta"):
            return SparQLeModule.from_config(cfg), cfg
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with random_weights():
        module = SparQLeModule.from_config(cfg).to(device)
    return module, cfg
