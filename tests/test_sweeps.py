"""The SLURM launcher config (sweeps through it run in tests/e2e/test_readme_cluster.py)."""

import os
import subprocess
import sys

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
