"""The run's identity, its resume point and whole-or-absent checkpoint files (sparqle/lifecycle.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sparqle.lifecycle import AtomicCheckpointIO, resolve_resume
from sparqle.run_dir import run_id, wandb_run_id
from tests.helpers import ROOT, tiny_overrides, torchrun

LAUNCHER_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID")


@pytest.mark.parametrize(
    "env, name, expected",
    [
        ({"SLURM_JOB_ID": "4242"}, None, "slurm-4242"),
        (
            {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3"},
            None,
            "slurm-4242_3",
        ),
        ({"TORCHELASTIC_RUN_ID": "exp7"}, None, "torchrun-exp7"),
        ({"SLURM_JOB_ID": "4242"}, "mine", "mine"),
    ],
)
def test_the_run_is_named_by_the_launcher_not_the_clock(monkeypatch, env, name, expected):
    for key in LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert run_id(name) == expected


@pytest.mark.slow
def test_torchrun_ranks_started_apart_name_the_run_alike(tmp_path):
    """`torchrun --nproc-per-node 2` without --rdzv-id: both ranks name the run alike although
    they start at different moments (torchrun's own rendezvous id, or where it has none, the
    time its agent started)."""
    script = tmp_path / "name.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "time.sleep(1.2 * int(os.environ['RANK']))\n"
        "from sparqle.run_dir import run_id\n"
        "open(sys.argv[1] + os.environ['RANK'], 'w').write(run_id(None))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    subprocess.run(
        [
            *torchrun(2),
            str(script),
            str(tmp_path / "id"),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=60,
    )
    names = [(tmp_path / f"id{r}").read_text() for r in (0, 1)]
    assert names[0] == names[1] and names[0].startswith(("torchrun-", "20")), names


def _checkpoint(path, step):
    torch.save(
        {"state_dict": {"w": torch.full((3,), float(step))}, "loops": {}, "global_step": step}, path
    )


def test_last_skips_an_unreadable_checkpoint_with_one_line(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _checkpoint(folder / "step0000004.ckpt", 4)
    time.sleep(0.01)
    _checkpoint(folder / "last.ckpt", 8)
    data = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])  # cut mid-write
    with caplog.at_level(logging.INFO):
        chosen = resolve_resume("last", folder)
    assert chosen == str(folder / "step0000004.ckpt")
    skipped = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(skipped) == 1 and "last.ckpt" in skipped[0]
    assert resolve_resume("last", tmp_path / "nothing") is None  # the first start of the job
    assert resolve_resume(None, folder) is None
    assert resolve_resume(str(folder / "x.ckpt"), folder) == str(folder / "x.ckpt")


@pytest.mark.slow
def test_a_kill_mid_write_leaves_the_previous_checkpoint_whole(tmp_path):
    """SIGKILL while a ~50 MB checkpoint is being written over last.ckpt, again and again: the
    file that is there always loads, and it is one of the complete versions."""
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(4)}, "step": 0}, target)
    script = tmp_path / "writer.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from sparqle.lifecycle import AtomicCheckpointIO\n"
        "io, big = AtomicCheckpointIO(), torch.randn(12_000_000)\n"
        "print('ready', flush=True)\n"
        "for step in range(1, 1000):\n"
        "    io.save_checkpoint({'state_dict': {'w': big}, 'step': step}, sys.argv[1])\n"
    )
    for delay in (0.05, 0.25):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(target)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(target, weights_only=True)
        assert ckpt["state_dict"]["w"].numel() in (4, 12_000_000)
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]


LATE_SIGNAL = """
import os, signal, sys, time
from unittest import mock
sys.path.insert(0, sys.argv[1])
from sparqle.lifecycle import StopOnSignal

class TaskSignal:  # the task's own SIGTERM, late: while the interpreter finalises
    def __del__(self, kill=os.kill, pid=os.getpid(), sig=signal.SIGTERM, sleep=time.sleep):
        kill(pid, sig)  # (bound: the module's globals are gone by now)
        sleep(1)

late = TaskSignal()
stop = StopOnSignal(checkpoint_dir=sys.argv[2])
trainer = mock.MagicMock(global_step=8, is_global_zero=True)
stop.setup(trainer, None, "fit")
if sys.argv[3] == "stopped":
    stop._stop(trainer, [signal.SIGTERM])  # every rank agreed, saved; StopRun, and no teardown
stop.teardown(trainer, None, "fit")  # the run ended on its own
"""


@pytest.mark.parametrize("state, code", [("stopped", 143), ("finished", -signal.SIGTERM)])
def test_a_signal_while_stopping_exits_with_the_stop_code(tmp_path, state, code):
    """SLURM signals every task, not at one moment: a rank that already stopped with the others
    exits with their code when its own SIGTERM lands as the process exits (Lightning runs no
    teardown after StopRun and Python restores the default handlers while it finalises: the rank
    died by the signal, and torchrun and SLURM saw a crash). A run that ended on its own is left
    as it was."""
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    done = subprocess.run(
        [sys.executable, "-c", LATE_SIGNAL, str(ROOT), str(tmp_path), state],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == code, done.stderr[-2000:]


def test_the_wandb_run_is_the_run_directorys(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    first = wandb_run_id(tmp_path / "run")
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == first
    assert wandb_run_id(tmp_path / "run") == first  # the requeued job
    assert wandb_run_id(tmp_path / "other") != first


@pytest.mark.slow
def test_validation_and_checkpoints_count_optimizer_steps(tiny_dir, synth_data, tmp_path):
    """With gradient accumulation 2, every validation is followed by a checkpoint."""
    common = [
        sys.executable,
        str(ROOT / "train.py"),
        *tiny_overrides(tiny_dir, synth_data, "stage=instruct"),
        "trainer.accumulate_grad_batches=2",
        "val_every_n_steps=2",
        "trainer.max_steps=6",
        "trainer.limit_val_batches=1",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*common, f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = sorted(int(p.stem[4:]) for p in (tmp_path / "checkpoints").glob("step*.ckpt"))
    assert steps == [2, 4, 6]
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    validated = sorted(
        {
            int(r.split(",")[header.index("step")])
            for r in rows[1:]
            if r.split(",")[header.index("val/loss")]
        }
    )
    assert validated == [2, 4] and set(validated) <= set(steps)  # (none after the last step)
    # Lightning's own key set by hand to another cadence: one line, exit 2
    bad = subprocess.run(
        [*common, "trainer.val_check_interval=3", f"hydra.run.dir={tmp_path / 'bad'}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: trainer.val_check_interval=3: set val_every_n_steps"
    )
