"""--multirun through the submitit launcher, the path SLURM sweeps take, run locally."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


def test_slurm_launcher_config_composes():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.nodes=4",
            "--cfg",
            "hydra",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "SlurmLauncher" in out and "partition: gpu" in out and "nodes: 4" in out
    assert "gpus_per_node: 8" in out
    assert "tasks_per_node: ${.gpus_per_node}" in out  # one task per GPU, as Lightning expects


@pytest.mark.slow
def test_multirun_sweep_through_submitit(tiny_dir, synth_data, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--multirun",
            "hydra/launcher=submitit_local",
            "experiment=tiny",
            "stage=instruct",
            "adapter=tiny,linear",
            "trainer.max_steps=3",
            "val_every_n_steps=3",
            "ckpt_path=last",
            f"paths.cache_dir={tiny_dir}",
            f"paths.log_dir={tmp_path}",
            f"data.train_manifest={synth_data / 'train.jsonl'}",
            f"data.val_manifest={synth_data / 'val.jsonl'}",
            "callbacks.progress_bar=null",
            "hydra.launcher.timeout_min=10",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "tiny" / "multiruns").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    adapters = []
    for job in jobs:
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 3
        adapters.append(ckpt["hyper_parameters"]["adapter"]["_target_"].rsplit(".", 1)[1])
    assert adapters == ["QFormerAdapter", "LinearAdapter"]
