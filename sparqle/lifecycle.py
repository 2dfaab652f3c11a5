"""A run's life on a cluster: one directory on every rank and across requeues, checkpoints that are
whole or absent, and stop signals that every rank acts on together.

- the run directory's name (`sparqle/run_dir.py`): from the launcher or `run_name`, never from
  each process's clock, so every rank and a requeued job find the run.
- `resolve_resume`: `ckpt_path=last` -> the newest readable checkpoint of the run (an unreadable
  one is skipped with one line), checked to be the same on every rank once they can talk.
- `AtomicCheckpointIO`: temp file, fsync, rename: a kill mid-write leaves the previous file.
- `StopOnSignal`: SIGTERM / SIGUSR1 / SIGUSR2 on any rank, at any moment, stop every rank at the
  same optimizer step; one `last.ckpt` is written, the launcher's requeue is asked for, and every
  rank exits with the same code. The flag rides on the all-reduce each step already makes
  (`SparQLeModule.skips`) and is read on the host only every `check_every_n_steps`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from sparqle.run_dir import launcher_rank

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- checkpoints
def unreadable(path: str | Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None: it can). Reads the archive's directory and
    the trainer state, not the tensors (mmap)."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:  # a truncated zip, a half-written file, a foreign pickle
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "loops" not in ckpt:
        return "not a full training checkpoint (no state_dict or loop state)"
    return None


def resolve_resume(ckpt_path: str | None, checkpoint_dir: str | Path) -> str | None:
    """`ckpt_path=last`: the newest readable `*.ckpt` of the run (last.ckpt first), each
    unreadable one skipped with one line; None (start afresh) where there is none. Any other
    value is returned as given (a named checkpoint must load, or the run stops)."""
    if ckpt_path != "last":
        return ckpt_path
    folder = Path(checkpoint_dir)
    found = sorted(
        folder.glob("*.ckpt") if folder.is_dir() else [],
        key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime),
        reverse=True,
    )
    for path in found:
        why = unreadable(path)
        if why is None:
            log.info("ckpt_path=last: resuming from %s", path)
            return str(path)
        log.warning("ckpt_path=last: skipping unreadable checkpoint %s (%s)", path, why)
    log.info("ckpt_path=last: no readable checkpoint in %s, starting from step 0", folder)
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """A checkpoint file is whole or absent: written beside its name, flushed to disk, renamed
    over it (and the folder synced). A kill mid-write leaves the previous checkpoint and a
    `.NAME.tmp-PID` file that no resume picks up. Remote paths keep Lightning's own writer."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        fs = get_filesystem(path)
        if storage_options is not None or "file" not in fs.protocol:
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- stop signals
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class StopRun(SystemExit):
    """Every rank stopped on a signal at the same step, after `last.ckpt` was written."""


class _QuietSignalConnector:
    """Stands in for Lightning's `_SignalConnector`, whose SIGTERM handler broadcasts from inside
    the handler (a rank signalled alone waits in a collective the others are not in) and whose
    loop checks the flag per rank; StopOnSignal does both jobs."""

    received_sigterm = False

    def register_signal_handlers(self) -> None:
        pass

    def teardown(self) -> None:
        pass


class StopOnSignal(L.Callback):
    """Any of `signals` on any rank stops every rank at the same optimizer step with one
    `last.ckpt`, then exits as the launcher expects:

    - under submitit (its handler was installed for the signal): rank 0 hands over to submitit,
      which requeues the job (its timeout/preemption USR2) and exits with its code (255);
    - under SLURM without submitit, a signal in `requeue_signals` (SLURM's `--signal=USR1@90`, as
      Lightning's auto-requeue uses) makes rank 0 run `scontrol requeue JOB`;
    - every rank exits with the same code: 128 + the signal (143 for SIGTERM) unless submitit
      gave another, so torchrun's `--max-restarts` and SLURM's requeue see a stopped job.

    Each rank's handler only notes the signal. The note reaches the device once, rides on the
    step's all-reduce (a max over ranks), and is read on the host every `check_every_n_steps`
    optimizer steps (default: the logging interval, where the host reads anyway): every rank reads
    the same value at the same step. A rank that has not stopped `timeout_s` after its signal
    (its peers gone, a collective that never completes) says so in one line and exits.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        signals: tuple[str, ...] | list[str] = STOP_SIGNALS,
        requeue_signals: tuple[str, ...] | list[str] = ("SIGUSR1",),
        check_every_n_steps: int | None = None,
        timeout_s: float = 150.0,
        resume_from: str | None = None,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.signals = [getattr(signal, s) for s in signals]
        self.requeue_signals = {getattr(signal, s) for s in requeue_signals}
        self.check_every_n_steps = check_every_n_steps
        self.timeout_s = timeout_s
        self.resume_from = resume_from
        self.received: dict[int, float] = {}  # signal -> when (host, set by the handler)
        self.previous: dict[int, Any] = {}
        self._sent: set[int] = set()
        self._flags: torch.Tensor | None = None
        self._last_checked = -1
        self._watchdog: threading.Timer | None = None
        self._lock = threading.Lock()
        self._wakeup: tuple[int, int, int] | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        trainer._signal_connector = _QuietSignalConnector()
        # Lightning 2.6 broadcasts its SIGTERM flag and reads it back before every micro-batch
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._note)
            # Python runs a handler only when the main thread runs Python again; one stuck in a
            # collective never would. The interpreter's C handler also writes the signal's number
            # to the wakeup fd at once: a thread of ours reads it there and starts the watchdog.
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._wakeup = (read, write, signal.set_wakeup_fd(write, warn_on_full_buffer=False))
            threading.Thread(target=self._listen, args=(read,), daemon=True).start()
        self._agree_on_resume(trainer)

    def _agree_on_resume(self, trainer: L.Trainer) -> None:
        """Every rank resolved `ckpt_path` from the same files; a disagreement (a shared file
        system that has not caught up) stops the run in one line instead of ranks diverging."""
        from sparqle.distributed import gather_objects

        seen = gather_objects(self.resume_from)
        if len(set(seen)) > 1:
            raise ValueError(
                f"ckpt_path=last: the ranks found different checkpoints ({', '.join(map(str, seen))}); "
                "is the run directory on a file system every node sees alike?"
            )

    def _note(self, signum: int, frame: Any) -> None:
        """The signal handler: note it, start the watchdog. No collective, no I/O but a log line."""
        with self._lock:
            if signum not in self.received:
                self.received[signum] = time.monotonic()
                log.warning("rank %s: %s received", _rank(), signal.Signals(signum).name)
            if self._watchdog is None:
                self._watchdog = threading.Timer(self.timeout_s, self._give_up, args=(signum,))
                self._watchdog.daemon = True
                self._watchdog.start()

    def _listen(self, read: int) -> None:
        """The wakeup fd's reader: a stop signal noted even while the main thread is stuck."""
        while True:
            try:
                data = os.read(read, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in self.signals:
                    self._note(signum, None)

    def _give_up(self, signum: int) -> None:
        log.error(
            "rank %s: %s received %.0f s ago and the ranks did not stop together "
            "(a peer gone or stuck): exiting without a new checkpoint",
            _rank(),
            signal.Signals(signum).name,
            self.timeout_s,
        )
        logging.shutdown()
        os._exit(128 + signum)

    # ------------------------------------------------------------------ the loop
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flags = torch.zeros(len(self.signals), device=pl_module.device)
        pl_module.skips.riders = self._flags
        if self.check_every_n_steps is None:
            self.check_every_n_steps = max(1, trainer.log_every_n_steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Where a new signal reaches the device: once, not every step."""
        for i, sig in enumerate(self.signals):
            if sig in self.received and sig not in self._sent:
                self._flags[i].fill_(1.0)
                self._sent.add(sig)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_checked or step % self.check_every_n_steps:
            return
        self._last_checked = step
        reduced = pl_module.skips.reduced_riders
        if reduced is None:
            return
        agreed = [sig for sig, on in zip(self.signals, reduced.tolist(), strict=True) if on]
        if agreed:
            self._stop(trainer, agreed)

    def _stop(self, trainer: L.Trainer, agreed: list[int]) -> None:
        path = self.checkpoint_dir / "last.ckpt"
        trainer.save_checkpoint(path)
        names = "+".join(signal.Signals(s).name for s in agreed)
        if trainer.is_global_zero:
            log.warning(
                "%s: every rank stopped at step %d; saved %s", names, trainer.global_step, path
            )
        code = 128 + agreed[0]
        requeue = next((s for s in agreed if self._requeues(s)), None)
        if requeue is not None:
            code = self._requeue(trainer, requeue, code)
        trainer.strategy.barrier("sparqle-stop")
        if threading.current_thread() is threading.main_thread():
            # SLURM signals every task, not at one moment: a rank's own SIGTERM may land while it
            # exits. Lightning calls no teardown after StopRun, and Python puts the default
            # handler back while the interpreter finalises (the process died by the signal
            # there, and torchrun and SLURM saw a crash); ignored, it exits with the agreed code.
            for sig in self.signals:
                signal.signal(sig, signal.SIG_IGN)
        raise StopRun(code)

    def _requeues(self, signum: int) -> bool:
        return _is_submitit_handler(self.previous.get(signum)) or (
            signum in self.requeue_signals and bool(os.environ.get("SLURM_JOB_ID"))
        )

    def _requeue(self, trainer: L.Trainer, signum: int, code: int) -> int:
        """Rank 0 asks the launcher to requeue; the others wait for it (a rank exiting first could
        make srun kill rank 0 before it asks). Returns the exit code every rank uses."""
        from sparqle.distributed import gather_objects

        if trainer.is_global_zero:
            previous = self.previous.get(signum)
            if _is_submitit_handler(previous):
                try:
                    previous(signum, None)  # submitit: checkpoint the job, scontrol requeue, exit
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                    code %= 256
                except Exception as exc:  # submitit will not requeue (timed out too often, ...)
                    log.error("submitit did not requeue: %s", exc)
                    code = 1
            else:
                job = os.environ["SLURM_JOB_ID"]
                if os.environ.get("SLURM_ARRAY_JOB_ID"):
                    job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
                scontrol = shutil.which("scontrol") or "scontrol"
                done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
                if done.returncode == 0:
                    log.warning("requeued SLURM job %s", job)
                else:
                    log.error("scontrol requeue %s failed: %s", job, done.stderr.strip())
        return gather_objects(code)[0]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._watchdog is not None and not self.received:
            self._watchdog.cancel()
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            if self._wakeup is not None:
                read, write, previous = self._wakeup
                signal.set_wakeup_fd(previous)
                os.close(write)  # the reader sees the end and returns
                self._wakeup = None
        self.previous = {}


def _is_submitit_handler(handler: Any) -> bool:
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit")


def _rank() -> int:
    from sparqle.distributed import world

    rank, size = world()
    return rank if size > 1 else launcher_rank()
