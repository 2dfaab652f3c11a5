"""A week on a preemptible cluster: stop signals that reach the ranks at different moments, or
only one rank, or arrive through submitit; every rank stops at one step with one last.ckpt and
exits as the launcher expects, and the requeued job resumes its own run to the same weights as a
run never interrupted. Two CPU ranks over gloo, started as SLURM starts tasks."""

from __future__ import annotations

import signal
import sys
import time

import pytest

from tests.helpers import (
    ROOT,
    differing,
    fake_slurm_bin,
    start_slurm_tasks,
    submit_local_slurm_job,
    submitit_command,
    tiny_overrides,
    trained_weights,
    wait_all,
    wait_for,
)

STEPS = 120  # several seconds of tiny steps on 2 ranks: signals land while it trains


def _overrides(tiny_dir, synth_data, logs, *extra):
    return tiny_overrides(
        tiny_dir,
        synth_data,
        "stage=instruct",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=2",
        "val_every_n_steps=100000",
        "ckpt_path=last",
        f"paths.log_dir={logs}",
        *extra,
    )


def _train(overrides):
    return [sys.executable, str(ROOT / "train.py"), *overrides]


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, synth_data, tmp_path_factory):
    """The same job never interrupted: its final weights."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    bin_dir = fake_slurm_bin(tmp / "bin")
    procs = start_slurm_tasks(
        _train(_overrides(tiny_dir, synth_data, tmp / "logs")), "700", 2, bin_dir, tmp
    )
    assert wait_all(procs, 180) == [0, 0], (tmp / "700.rank0.log").read_text()[-3000:]
    return trained_weights(tmp / "logs/tiny/runs/slurm-700/checkpoints/last.ckpt")


def _stopped(run, procs, logs, job, expect_code):
    codes = wait_all(procs, 60)
    log = (logs / f"{job}.rank0.log").read_text()
    assert codes == [expect_code, expect_code], log[-3000:]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt"], ckpts  # one checkpoint, and no half-written file beside it
    step, _ = trained_weights(run / "checkpoints/last.ckpt")
    assert 0 < step < STEPS, step
    return step


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["rank 1 only", "rank 1, then rank 0 1.5 s later"])
def test_sigterm_at_different_moments_stops_every_rank_together(
    pattern, tiny_dir, synth_data, tmp_path, uninterrupted
):
    bin_dir, logs, job = fake_slurm_bin(tmp_path / "bin"), tmp_path / "logs", "7001"
    cmd = _train(_overrides(tiny_dir, synth_data, logs))
    procs = start_slurm_tasks(cmd, job, 2, bin_dir, tmp_path)
    run = logs / "tiny/runs/slurm-7001"
    wait_for(run / "csv", procs)  # training has begun
    time.sleep(1.0)
    procs[1].send_signal(signal.SIGTERM)
    if pattern != "rank 1 only":
        time.sleep(1.5)
        if procs[0].poll() is None:
            procs[0].send_signal(signal.SIGTERM)
    killed_at = _stopped(run, procs, tmp_path, job, 128 + signal.SIGTERM)
    assert not (bin_dir / "scontrol.log").exists()  # SIGTERM (scancel, preemption) requeues nothing
    if pattern != "rank 1 only":
        return
    # the requeued job: the same launcher environment finds its run directory and resumes
    procs = start_slurm_tasks(cmd, job, 2, bin_dir, tmp_path)
    assert wait_all(procs, 120) == [0, 0], (tmp_path / f"{job}.rank0.log").read_text()[-3000:]
    assert (
        f"resuming from {run / 'checkpoints/last.ckpt'}"
        in (tmp_path / f"{job}.rank0.log").read_text()
    )
    step, weights = trained_weights(run / "checkpoints/last.ckpt")
    assert step == STEPS and not differing(weights, uninterrupted[1]), f"stopped at {killed_at}"


@pytest.mark.slow
def test_submitit_usr2_on_rank_0_only_requeues_and_the_job_resumes(
    tiny_dir, synth_data, tmp_path, uninterrupted
):
    """submitit's timeout signal (USR2, 180 s before the limit) reaches rank 0 alone: submitit's
    handler requeues the job after every rank has stopped and saved."""
    bin_dir, logs, job = fake_slurm_bin(tmp_path / "bin"), tmp_path / "logs", "7002"
    folder = tmp_path / "submitit"
    submit_local_slurm_job(folder, job, _overrides(tiny_dir, synth_data, logs))
    env = {"SUBMITIT_EXECUTOR": "slurm"}
    procs = start_slurm_tasks(submitit_command(folder), job, 2, bin_dir, tmp_path, extra_env=env)
    run = logs / "tiny/runs/slurm-7002"
    wait_for(run / "csv", procs)
    time.sleep(1.0)
    procs[0].send_signal(signal.SIGUSR2)
    _stopped(run, procs, tmp_path, job, 255)  # submitit's own exit code after a requeue
    assert (bin_dir / "scontrol.log").read_text().split() == ["requeue", job]
    procs = start_slurm_tasks(submitit_command(folder), job, 2, bin_dir, tmp_path, extra_env=env)
    assert wait_all(procs, 120) == [0, 0], (tmp_path / f"{job}.rank0.log").read_text()[-3000:]
    step, weights = trained_weights(run / "checkpoints/last.ckpt")
    assert step == STEPS and not differing(weights, uninterrupted[1])


@pytest.mark.slow
def test_a_rank_whose_peer_is_stuck_gives_up_with_one_line(tiny_dir, synth_data, tmp_path):
    """Rank 1 freezes (SIGSTOP: its sockets open, nothing answered); rank 0, already waiting in a
    collective that never completes, is told to stop: after `timeout_s` it says so in one line and
    exits instead of waiting forever (the signal reaches a thread of its own through the wakeup fd,
    since the main thread never returns to Python). (A peer that dies outright closes its sockets, and gloo's
    collective fails at once.)"""
    bin_dir, logs, job = fake_slurm_bin(tmp_path / "bin"), tmp_path / "logs", "7003"
    cmd = _train(_overrides(tiny_dir, synth_data, logs, "callbacks.stop_on_signal.timeout_s=8"))
    procs = start_slurm_tasks(cmd, job, 2, bin_dir, tmp_path)
    wait_for(logs / "tiny/runs/slurm-7003/csv", procs)
    time.sleep(1.0)
    procs[1].send_signal(signal.SIGSTOP)
    time.sleep(2.0)  # rank 0 is now inside a collective: its Python handler cannot run
    procs[0].send_signal(signal.SIGTERM)
    start = time.time()
    codes = wait_all(procs[:1], 40)
    procs[1].kill()
    log = (tmp_path / f"{job}.rank0.log").read_text()
    assert codes == [128 + signal.SIGTERM], log[-2000:]
    assert 8 <= time.time() - start < 40
    gave_up = [line for line in log.splitlines() if "did not stop together" in line]
    assert len(gave_up) == 1, log[-2000:]
