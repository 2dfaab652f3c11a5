import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_dashboards_offline_wandb_table_throughput_and_run_info(tiny_dir, synth_data, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "experiment=tiny",
            "stage=instruct",
            "logger=wandb",
            "trainer.max_steps=6",
            "val_every_n_steps=3",
            "trainer.log_every_n_steps=2",
            f"paths.cache_dir={tiny_dir}",
            f"hydra.run.dir={tmp_path}",
            f"data.train_manifest={synth_data / 'train.jsonl'}",
            f"data.val_manifest={synth_data / 'val.jsonl'}",
            "callbacks.progress_bar=null",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["versions"]["torch"] and info["versions"]["transformers"] and "git_commit" in info
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    tables = list(run.glob("files/media/table/val/examples_*.table.json"))
    assert tables
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["task", "id", "reference", "hypothesis"] and table["data"]
    assert list(run.glob("files/media/audio/val/audio_*.wav"))
    history = next(run.glob("run-*.wandb")).read_text(
        errors="replace"
    )  # the offline run's log record
    for key in (
        "throughput/audio_seconds_per_s",
        "throughput/llm_tokens_per_s",
        "train/grad_norm",
        "val/wer",
    ):
        assert key in history, key
