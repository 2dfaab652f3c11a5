"""Every command of the README's "Running on a cluster", run as written on 2 CPU processes with a
tiny run in $RUN: sbatch + srun (stand-ins that start the tasks as SLURM does), Hydra's submitit
launcher (its local executor in place of SLURM), torchrun. Each is launched a second time as a
requeue would, and resumes its own run instead of starting over."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, free_port, tiny_overrides


def _section() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def _bash(command: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
    return done


def _env(**extra: str) -> dict[str, str]:
    path = f"{ROOT / 'tests' / 'fake_slurm'}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
    return {**keep, "PATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _run_of(tiny_dir, synth_data, logs, *extra) -> str:
    return " ".join(
        tiny_overrides(
            tiny_dir,
            synth_data,
            "trainer.accelerator=cpu",
            "trainer.max_steps=4",
            "trainer.limit_val_batches=1",
            "val_every_n_steps=2",
            f"paths.log_dir={logs}",
            *extra,
        )
    )


def test_the_section_is_what_this_test_runs():
    blocks = _section()
    assert len(blocks) == 5 and blocks[0].startswith('RUN="experiment=sparqle_paper')
    assert blocks[1] == 'RUN="$RUN stage=pretrain" sbatch scripts/slurm/train.sbatch'
    assert blocks[2].startswith("python train.py --multirun hydra/launcher=slurm")
    assert blocks[3].count("python train.py --multirun hydra/launcher=slurm") == 2
    assert blocks[4].startswith("torchrun ")


def _on_local_submitit(command: str, logs: Path) -> str:
    """The SLURM launcher's lines as submitit's local executor runs them, the paper's Q-Former as
    the tiny one, the paper's log folder as the test's."""
    command = command.replace("hydra/launcher=slurm", "hydra/launcher=submitit_local")
    command = re.sub(r"hydra\.launcher\.(partition|nodes)=\S+", "", command)
    command = command.replace("adapter=qformer,", "adapter=tiny,")
    return command.replace("logs/sparqle_paper/", f"{logs}/tiny/")


@pytest.mark.slow
def test_sbatch_then_its_requeue_resume_the_run(tiny_dir, synth_data, tmp_path):
    run = _run_of(tiny_dir, synth_data, tmp_path, "trainer.devices=2")
    env = _env(
        RUN=run, FAKE_SLURM_JOB_ID="5150", FAKE_SLURM_NTASKS="2", MASTER_PORT=str(free_port())
    )
    first = _bash(_section()[1], env)
    ckpt = tmp_path / "tiny/runs/slurm-5150/checkpoints/last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    again = _bash(_section()[1], {**env, "MASTER_PORT": str(free_port())})  # the requeued job
    assert f"resuming from {ckpt}" in again.stdout + again.stderr
    assert "resuming from" not in first.stdout + first.stderr


@pytest.mark.slow
def test_the_submitit_sweep_runs_its_jobs_and_a_rerun_resumes_them(tiny_dir, synth_data, tmp_path):
    command = _on_local_submitit(_section()[2], tmp_path)
    run = _run_of(tiny_dir, synth_data, tmp_path, "trainer.devices=1", "run_name=sweep")
    _bash(command, _env(RUN=run))
    jobs = sorted((tmp_path / "tiny/multiruns/sweep").glob("[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        assert torch.load(job / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    _bash(command, _env(RUN=run))  # every job finds its own run again
    logs = [(job / "tiny.log").read_text() for job in jobs]
    assert all(
        f"resuming from {job / 'checkpoints/last.ckpt'}" in log
        for job, log in zip(jobs, logs, strict=True)
    )


@pytest.mark.slow
def test_torchrun_with_a_rendezvous_id_resumes_its_run(tiny_dir, synth_data, tmp_path):
    run = _run_of(tiny_dir, synth_data, tmp_path, "trainer.devices=2")
    env = _env(RUN=run, NODES="1", GPUS="2", HEAD="127.0.0.1", JOB="readme")
    command = _section()[4].replace("$HEAD:29500", f"$HEAD:{free_port()}")
    _bash(command, env)
    ckpt = tmp_path / "tiny/runs/torchrun-readme/checkpoints/last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    again = _bash(
        command.replace(str(command.split("$HEAD:")[1].split()[0]), str(free_port())), env
    )
    assert f"resuming from {ckpt}" in again.stdout + again.stderr


@pytest.mark.slow
def test_the_sweep_and_its_stage_2_form_run(tiny_dir, synth_data, tmp_path):
    """Stage 1 at two learning rates, then stage 2 from the first for the Q-Former and the linear
    adapter (which starts fresh): all four jobs train to the end."""
    command = _on_local_submitit(_section()[3], tmp_path)
    run = _run_of(tiny_dir, synth_data, tmp_path, "trainer.devices=1")
    done = _bash(command, _env(RUN=run))
    stage1 = sorted((tmp_path / "tiny/multiruns/s1").glob("[0-9]"))
    rates = [
        torch.load(j / "checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]["stage"]
        for j in stage1
    ]
    assert [r["optim"]["lr"] for r in rates] == [1e-4, 3e-4]
    stage2 = [
        j
        for sweep in (tmp_path / "tiny/multiruns").iterdir()
        if sweep.name != "s1"
        for j in sorted(sweep.glob("[0-9]"))
    ]
    adapters = []
    for job in stage2:
        ckpt = torch.load(job / "checkpoints/last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 4 and ckpt["hyper_parameters"]["stage"]["name"] == "instruct"
        adapters.append(ckpt["hyper_parameters"]["adapter"]["_target_"].rsplit(".", 1)[1])
    assert adapters == ["QFormerAdapter", "LinearAdapter"]
    assert "starts fresh" in (stage2[1] / "tiny.log").read_text()
    assert done.returncode == 0
