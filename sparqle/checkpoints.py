"""What a SparQLe checkpoint holds, and every way one is written and read.

A training checkpoint (Lightning's file) holds:
- `state_dict`: the trained parameters and the persistent buffers outside the pretrained encoder
  and LLM (`checkpoint_names`), never the frozen weights, which reload from `name_or_path`;
- `sparqle_trainable`: the names of the parameters that trained (what an export keeps);
- `rng`: every rank's random streams (torch, CUDA per device, numpy, Python), so a resumed run
  draws what the uninterrupted one drew;
- `trained_clip_seconds`: the shortest and longest clip it trained on (inference cuts longer
  audio into pieces of at most the longest); older files name it `sparqle_clip_seconds`;
- Lightning's own: optimizer, schedulers, loops, the DataModule's data position, hparams.

An export (sparqle/export.py) holds the trained parameters in `adapter.safetensors` and the hparams
(with `trained_clip_seconds`) in `config.yaml`. One check (`check_fits`) says whether a state fits
a model, for resuming, for `stage.init_from` and for exports alike.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparqle.distributed import gather_objects, world

log = logging.getLogger(__name__)

WEIGHTS = "adapter.safetensors"
CONFIG = "config.yaml"
CLIP_SECONDS = "trained_clip_seconds"
_OLD_CLIP_SECONDS = "sparqle_clip_seconds"  # checkpoints written before 2026-12-01
PRETRAINED = ("model.encoder.model.", "model.llm.model.")


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the configured model; the message names the parameters."""


# --------------------------------------------------------------------------- what is saved
def trainable_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def checkpoint_names(module: nn.Module) -> list[str]:
    """The trained parameters and the persistent buffers outside the pretrained encoder and LLM.
    Frozen parameters are left out: the pretrained ones reload from name_or_path, and the
    adapter's (stage 1's projection, the Q-Former's text parts in stage 2: ~80M for the paper)
    are idle in the stage that froze them."""
    trainable = set(trainable_names(module))
    params = {n for n, _ in module.named_parameters()}
    return [
        k
        for k in module.state_dict()
        if k in trainable or (k not in params and not k.startswith(PRETRAINED))
    ]


def check_fits(
    own: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    expected: list[str],
    where: str,
    hint: str = "it was trained with another stage, encoder, adapter or LLM config",
) -> None:
    """Every tensor of `state` is one of `own`, of its shape, and none of `expected` is missing;
    else one line naming how many and the first."""
    for what, keys in (
        ("unknown", [k for k in state if k not in own]),
        ("wrongly shaped", [k for k in state if k in own and own[k].shape != state[k].shape]),
        ("missing", [k for k in expected if k not in state]),
    ):
        if keys:
            raise CheckpointMismatch(
                f"{where} does not fit this model: {len(keys)} {what} tensors "
                f"(first: {keys[0]}); {hint}"
            )


def clip_seconds(checkpoint: dict[str, Any]) -> tuple[float, float] | None:
    found = checkpoint.get(CLIP_SECONDS) or checkpoint.get(_OLD_CLIP_SECONDS)
    return tuple(found) if found else None


def add_to_checkpoint(checkpoint: dict[str, Any], module) -> None:
    """Lightning's `on_save_checkpoint`: keep only what trained (and what is not pretrained),
    add every rank's random streams and the clip lengths seen on every rank (collectives: every
    rank calls it)."""
    keep = set(checkpoint_names(module))
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
    checkpoint["sparqle_trainable"] = trainable_names(module)
    checkpoint["rng"] = gather_objects(rng_state())  # one entry per rank
    seen = [r for r in gather_objects(module.trained_clip_seconds) if r is not None]
    if seen:
        checkpoint[CLIP_SECONDS] = [min(r[0] for r in seen), max(r[1] for r in seen)]


def read_checkpoint(checkpoint: dict[str, Any], module) -> dict[str, Any] | None:
    """Lightning's `on_load_checkpoint`: the state must fit; the clip lengths come back; returns
    this rank's random streams to restore once training starts (another world size replays rank
    0's)."""
    check_fits(
        module.state_dict(), checkpoint["state_dict"], checkpoint_names(module), "checkpoint"
    )
    module.trained_clip_seconds = clip_seconds(checkpoint) or module.trained_clip_seconds
    rng = checkpoint.get("rng")
    if isinstance(rng, list):  # one state per rank
        rank, size = world()
        rng = rng[rank] if len(rng) == size else rng[0]
    return rng


def init_adapter_from(module, path: str | Path) -> bool:
    """`stage.init_from`: the adapter's weights from what another run (stage 1) trained; the rest
    is ignored, and so are tensors that run kept but never trained (stage 1's projection into its
    LLM), so a stage-1 checkpoint serves any LLM. False where the adapter takes nothing from it
    (an adapter without a Q-Former, given a stage-1 Q-Former)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    learned = ckpt.get("sparqle_trainable")
    wanted = {
        k: v
        for k, v in state.items()
        if k.startswith("model.adapter.") and (learned is None or k in learned)
    }
    if not wanted:
        raise CheckpointMismatch(f"stage.init_from={path}: no adapter weights in this checkpoint")
    if not hasattr(module.model.adapter, "qformer") and all(
        k.startswith("model.adapter.qformer.") for k in wanted
    ):  # a sweep over adapters from one stage-1 run: only the Q-Former ones take it
        log.warning(
            "stage.init_from=%s holds a stage-1 Q-Former; adapter %s has none and starts fresh",
            path,
            type(module.model.adapter).__name__,
        )
        return False
    check_fits(
        module.state_dict(),
        wanted,
        [],
        f"stage.init_from={path}: its adapter",
        "was it trained with another encoder or adapter config?",
    )
    module.load_state_dict(wanted, strict=False)
    log.info("initialised %d adapter tensors from %s", len(wanted), path)
    return True


# --------------------------------------------------------------------------- random streams
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        # one state per device the saving rank saw; an allocation with another device count
        # restores the devices both have (a rank uses its own, the first ones)
        saved, visible = list(rng["cuda"]), torch.cuda.device_count()
        if len(saved) != visible:
            log.warning(
                "checkpoint holds CUDA random states for %d device(s), this process sees %d: "
                "restoring the first %d",
                len(saved),
                visible,
                min(len(saved), visible),
            )
        for device, state in enumerate(saved[:visible]):
            torch.cuda.set_rng_state(state, device)
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in rng["python"]))


def fingerprint(path: str | Path) -> str:
    """The first 16 hex digits of the sha256 of a checkpoint file or an export's weights."""
    path = Path(path)
    target = path / WEIGHTS if path.is_dir() else path
    digest = hashlib.sha256()
    with target.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
