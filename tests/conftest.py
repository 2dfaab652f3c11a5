import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sparqle.models.tiny import ensure_tiny  # noqa: E402

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
