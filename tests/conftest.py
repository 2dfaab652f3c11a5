import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sparqle.config import register_resolvers  # noqa: E402
from sparqle.models.tiny import ensure_tiny  # noqa: E402

register_resolvers()  # the tests compose configs as train.py and eval.py do

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """One cache of tiny random models for the whole session."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny(tiny_dir) -> dict[str, str]:
    return {k: ensure_tiny(k, tiny_dir) for k in ("encoder", "whisper", "bert", "llm")}


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """24 espeak-ng utterances with train.jsonl (18) and val.jsonl (6)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: `make setup` installs it")
    from data_prep.synth_speech import main

    out = tmp_path_factory.mktemp("synth")
    main(["--out", str(out), "--n", "24", "--seed", "3", "--val-fraction", "0.25"])
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def batch(synth_data):
    """One training batch of 4 from the synthetic clips (a Batch, as collate makes it)."""
    from sparqle.data.manifest_datamodule import ManifestDataModule

    dm = ManifestDataModule(train_manifest=str(synth_data / "train.jsonl"), batch_size=4)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.fixture(scope="session")
def trained(tiny_dir, synth_data, tmp_path_factory) -> Path:
    """A tiny stage-2 model after one step, as a full checkpoint (model.ckpt) and an export."""

    from sparqle.data.manifest_datamodule import ManifestDataModule
    from sparqle.export import export
    from tests.helpers import make_module, one_step, save_checkpoint

    out = tmp_path_factory.mktemp("trained")
    module = make_module(tiny_dir, synth_data, "stage=instruct")
    dm = ManifestDataModule(train_manifest=str(synth_data / "train.jsonl"), batch_size=4)
    dm.setup("fit")
    one_step(module, next(iter(dm.train_dataloader())))
    save_checkpoint(module, out / "model.ckpt")
    export(out / "model.ckpt", out / "export")
    return out


# the uninterrupted run's settings: what a resumed run repeats to be compared with it
UNINTERRUPTED = (
    "stage=pretrain",
    "trainer.max_steps=16",
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "val_every_n_steps=6",
)


@pytest.fixture(scope="session")
def uninterrupted(tiny_dir, synth_data, tmp_path_factory) -> Path:
    """train.py's 16-step stage-1 run on the tiny preset, checkpointed every 4 steps (its run
    directory): what every resume must equal, and what a finished run must hold. Stage 1 has the
    most random state to restore (ITM negatives, dropout, the loader's order)."""
    from tests.helpers import run_cli, tiny_overrides

    run = tmp_path_factory.mktemp("uninterrupted")
    done = run_cli(
        "train.py", *tiny_overrides(tiny_dir, synth_data, *UNINTERRUPTED, f"hydra.run.dir={run}")
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return run


@pytest.fixture(scope="session")
def tiny_shards(synth_data, tmp_path_factory) -> Path:
    """The synthesised manifests as small audio shards (train: 18 clips in several shards)."""
    from data_prep.make_shards import make_shards

    out = tmp_path_factory.mktemp("tiny-shards")
    for split in ("train", "val"):
        make_shards(synth_data / f"{split}.jsonl", out, split, shard_size_mb=0.05, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_features(tiny_shards, tiny_dir, tmp_path_factory) -> Path:
    """Feature shards of tiny_shards from the tiny encoder's layer 1 (`encoder=tiny
    encoder.layer=1`)."""
    from data_prep.extract_features import extract_features

    out = tmp_path_factory.mktemp("tiny-features")
    overrides = ["encoder=tiny", f"paths.cache_dir={tiny_dir}", "encoder.layer=1"]
    for split in ("train", "val"):
        extract_features(tiny_shards / f"{split}.json", out, overrides)
    return out
