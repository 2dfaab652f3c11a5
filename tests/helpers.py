"""What several test files share: the tiny experiment's overrides, launching train.py as a cluster
would (SLURM tasks, a submitit job), a fake `scontrol`, and reading checkpoints back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_cfg(tiny_dir: Path, synth_data: Path, *overrides: str):
    """The composed `experiment=tiny` config (as train.py composes it) on the session's data."""
    from hydra import compose, initialize_config_dir

    from sparqle.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "experiment=tiny",
                f"paths.cache_dir={tiny_dir}",
                f"data.train_manifest={synth_data / 'train.jsonl'}",
                f"data.val_manifest={synth_data / 'val.jsonl'}",
                "paths.output_dir=/tmp/unused",
                *overrides,
            ],
        )


def make_module(tiny_dir: Path, synth_data: Path, *overrides: str):
    from sparqle.lit_module import SparQLeModule

    return SparQLeModule.from_config(make_cfg(tiny_dir, synth_data, *overrides))


def save_checkpoint(module, path) -> None:
    """A Lightning checkpoint of a module that has not been fitted."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)


def one_step(module, batch) -> None:
    """One AdamW step of the stage's loss on `batch` (host-side layout prepared first)."""
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = module.model_step(module.on_before_batch_transfer(batch))["loss"]
    loss.backward()
    opt.step()


def run_cli(
    script: str, *args: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """An entry point of the repository (train.py, eval.py, `-m module`) as a user runs it."""
    command = [
        sys.executable,
        *(["-m", script[3:]] if script.startswith("-m ") else [str(ROOT / script)]),
    ]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **env},
    )


def run_side_by_side(
    commands: list[list[str]], timeout: float = 300
) -> list[subprocess.CompletedProcess]:
    """Independent commands (argv lists after `python`), one per core at a time: most of such a
    command's time is its imports, on one core."""

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
        )

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(run, commands))


def tiny_overrides(tiny_dir: Path, synth_data: Path, *extra: str) -> list[str]:
    """`experiment=tiny` on the session's tiny models and synthesised manifests, quiet."""
    return [
        "experiment=tiny",
        f"paths.cache_dir={tiny_dir}",
        f"data.train_manifest={synth_data / 'train.jsonl'}",
        f"data.val_manifest={synth_data / 'val.jsonl'}",
        "callbacks.progress_bar=null",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    """`torchrun --nproc-per-node N` on a port of its own, so runs side by side (pytest -n) never
    meet on torchrun's default 29500."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] + [
        "--master-port",
        str(free_port()),
    ]


def fake_slurm_bin(folder: Path) -> Path:
    """A folder with an `scontrol` that records its arguments in folder/scontrol.log."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder / "scontrol.log"}"\n')
    script.chmod(0o755)
    return folder


def slurm_task_env(job: str, rank: int, ntasks: int, port: int, bin_dir: Path) -> dict[str, str]:
    """The environment srun gives task `rank` of a one-node job (what Lightning and submitit
    read), with the fake scontrol first on PATH and one thread a rank."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "SLURM_JOB_ID": job,
        "SLURM_JOB_NAME": "sparqle",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NTASKS_PER_NODE": str(ntasks),
        "SLURM_NNODES": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_JOB_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }


def start_slurm_tasks(
    command: list[str],
    job: str,
    ntasks: int,
    bin_dir: Path,
    logs: Path,
    extra_env: dict[str, str] | None = None,
) -> list[subprocess.Popen]:
    """Start `command` as the `ntasks` tasks of SLURM job `job` (as `srun` would)."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env={**slurm_task_env(job, rank, ntasks, port, bin_dir), **(extra_env or {})},
            stdout=open(logs / f"{job}.rank{rank}.log", "a"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        for rank in range(ntasks)
    ]


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    start = time.time()
    while not path.exists():
        dead = [p.returncode for p in procs if p.poll() is not None]
        assert not dead, f"a process exited ({dead}) before {path} appeared"
        assert time.time() - start < timeout, f"{path} never appeared"
        time.sleep(0.05)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes (None: still alive after `timeout` s from now, then killed)."""
    deadline, codes = time.time() + timeout, []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(None)
    return codes


def trained_weights(ckpt: Path) -> tuple[int, dict[str, torch.Tensor]]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return state["global_step"], state["state_dict"]


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


class SubmititTrainJob:
    """A checkpointable job as Hydra's submitit launcher submits one: run train.py's Hydra main
    with `overrides` in this process (submitit's signal handlers are this process's)."""

    def __init__(self, overrides: list[str]) -> None:
        self.overrides = overrides

    def __call__(self) -> None:
        import runpy

        sys.argv = [str(ROOT / "train.py"), *self.overrides]
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def submit_local_slurm_job(folder: Path, job: str, overrides: list[str]) -> None:
    """Write the pickle a submitit SLURM job runs (`python -m submitit.core._submit FOLDER`)."""
    import submitit

    folder.mkdir(parents=True, exist_ok=True)
    delayed = submitit.helpers.DelayedSubmission(SubmititTrainJob(overrides))
    delayed.set_timeout(60, 3)
    delayed.dump(folder / f"{job}_submitted.pkl")


def submitit_command(folder: Path) -> list[str]:
    return [sys.executable, "-u", "-m", "submitit.core._submit", str(folder)]


class HostReads:
    """Counts what makes a GPU step wait on the host: scalar reads, data-dependent shapes
    (nonzero, boolean indexing) and `tolist`, each with the innermost frame of our code."""

    OPS = {
        "aten._local_scalar_dense.default",
        "aten.nonzero.default",
        "aten.is_nonzero.default",
        "aten.masked_select.default",
        "aten.equal.default",
    }

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        reads = self.reads = []

        def where() -> str:
            import traceback

            stack = traceback.extract_stack()[:-2]
            skip = ("site-packages/torch/", "/tests/")
            libs = [
                f
                for f in stack
                if "site-packages" in f.filename and not any(s in f.filename for s in skip)
            ]
            ours = [f for f in stack if "/sparqle/" in f.filename]
            lib = f"{libs[-1].filename.split('/')[-1]}:{libs[-1].name}" if libs else "?"
            # innermost of ours -> the library that read; then every frame of ours, outermost first
            chain = "<".join(f.name for f in ours)
            return f"{ours[-1].name if ours else '?'} -> {lib} [{chain}]"

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func)
                boolean_index = name == "aten.index.Tensor" and any(
                    i is not None and i.dtype == torch.bool for i in args[1]
                )
                if name in HostReads.OPS or boolean_index:
                    reads.append(f"{name} in {where()}")
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.where = where

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        reads, where, tolist = self.reads, self.where, self._tolist

        def counted(t):
            reads.append(f"tolist in {where()}")
            return tolist(t)

        torch.Tensor.tolist = counted
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        torch.Tensor.tolist = self._tolist
