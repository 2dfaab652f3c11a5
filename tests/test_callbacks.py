import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

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
        "train/data_wait",
        "train/grad_norm",
        "val/wer",
    ):
        assert key in history, key


class _Batches(torch.utils.data.Dataset):
    """The same batch again and again, each `delay` s late: a data pipeline that cannot keep up."""

    def __init__(self, batch, n: int, delay: float) -> None:
        self.batch, self.n, self.delay = batch, n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.batch


@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_a_starved_loop_shows_its_data_wait_and_says_what_to_turn(
    delay, tiny_dir, synth_data, batch, caplog
):
    import lightning as L

    from sparqle.callbacks import SpeechThroughput
    from tests.helpers import make_module

    module = make_module(tiny_dir, synth_data, "stage=instruct")
    loader = torch.utils.data.DataLoader(
        _Batches(batch, 12, delay), batch_size=None, collate_fn=lambda b: b
    )
    throughput = SpeechThroughput(window=2, starved=0.3, patience=2)
    waits = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if "train/data_wait" in trainer.callback_metrics:
                waits.append(float(trainer.callback_metrics["train/data_wait"]))

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[throughput, Record()],
    )
    with caplog.at_level(logging.WARNING, logger="sparqle.callbacks"):
        trainer.fit(module, train_dataloaders=loader)
    starved = [r.message for r in caplog.records if "data starvation" in r.message]
    if delay:  # the first windows hold the slower first steps: the fraction rises after them
        assert waits[-1] > 0.4, waits
        assert starved and "data.num_workers" in starved[0], starved
    else:
        assert max(waits) < 0.15, waits
        assert not starved
