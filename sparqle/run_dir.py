"""The run directory's name, the same on every rank and after a requeue, and what lives by it
(the wandb run id). Light on purpose: Hydra resolves `${run_id:..}` for every command before it
runs, so nothing here imports torch or Lightning."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import datetime
from pathlib import Path

RUN_TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"


def _process_start(pid: int) -> float | None:
    """When a process started (seconds since the epoch), from /proc; None where unreadable."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def run_id(run_name: str | None = None) -> str:
    """The run directory's name, the same on every rank and after a requeue:
    `run_name` if given; else `slurm-JOB` (`slurm-ARRAYJOB_TASK` in an array), which a requeued
    job keeps; else `torchrun-ID` for a torchrun rendezvous id; else the start time of torchrun's
    agent (the ranks' common parent); else this process's start time (one process, or Lightning's
    own launcher, which hands its directory to the ranks it starts)."""
    if run_name not in (None, "", "None", "null"):
        return str(run_name)
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
    rdzv = env.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv.lower() != "none":
        return f"torchrun-{rdzv}"
    started = _process_start(os.getppid()) if rdzv else None
    return datetime.fromtimestamp(started or time.time()).strftime(RUN_TIME_FORMAT)


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (before any process group exists)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def wandb_run_id(run_dir: str | Path) -> str:
    """One wandb run per run directory: a requeued job logs on into the same run. Kept in
    RUN_DIR/wandb_run_id (written by rank 0); derived from the directory, so every rank agrees."""
    path = Path(run_dir) / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    if launcher_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run + "\n")
    return run
