"""Lightning callbacks: throughput/MFU and run provenance (stop signals: sparqle/lifecycle.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)
PACKAGES = (
    "torch",
    "lightning",
    "transformers",
    "peft",
    "webdataset",
    "hydra-core",
    "sacrebleu",
    "jiwer",
    "sparqle",
)


class SpeechThroughput(L.Callback):
    """Logs audio seconds/s, samples/s, LLM tokens/s, estimated MFU and peak GPU memory, and
    `train/data_wait`: the fraction of each window a rank's loop spent between one batch's end and
    the next one's start, waiting for its data (gaps around validation and checkpoint saves left
    out), the largest over the ranks: one rank's starved loader holds every rank back (the others
    wait for it inside the gradient all-reduce, where no data wait shows), so the slowest rank's
    figure is the one that matters. One small all-reduce per window, where the window's figures
    are read anyway. A window above `starved` for `patience` windows in a row says so in one line,
    with the knobs.

    Reads the `work` the training step returns with its loss (audio_seconds, samples,
    llm_tokens, flops: host-side counts) and averages over `window` steps.
    """

    def __init__(self, window: int = 10, starved: float = 0.2, patience: int = 3) -> None:
        self.window = window
        self.starved, self.patience = starved, patience
        self._start: float | None = None
        self._acc: dict[str, float] = {}
        self._steps = 0
        self._peak_flops: float | None = None
        self._ended: float | None = None  # when the last batch ended (None: not a data gap)
        self._waited = 0.0
        self._starved_windows = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._ended is not None:
            self._waited += now - self._ended
        if self._start is None:
            self._sync(pl_module)
            self._start = time.perf_counter()
            if self._peak_flops is None:
                dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
                self._peak_flops = (
                    get_available_flops(pl_module.device, dtype)
                    if pl_module.device.type == "cuda"
                    else None
                )

    def on_validation_start(self, trainer, pl_module) -> None:
        self._ended = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._ended = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._ended = time.perf_counter()
        stats = outputs.get("work", {}) if isinstance(outputs, dict) else {}
        for k, v in stats.items():
            self._acc[k] = self._acc.get(k, 0.0) + float(v)
        self._steps += 1
        if self._steps < self.window or self._start is None:
            return
        self._sync(pl_module)
        dt = time.perf_counter() - self._start
        world = trainer.world_size
        metrics = {
            "throughput/audio_seconds_per_s": self._acc.get("audio_seconds", 0.0) * world / dt,
            "throughput/samples_per_s": self._acc.get("samples", 0.0) * world / dt,
            "throughput/llm_tokens_per_s": self._acc.get("llm_tokens", 0.0) * world / dt,
            "throughput/step_time_s": dt / self._steps,
            "train/data_wait": self._slowest_rank(trainer, pl_module, min(1.0, self._waited / dt)),
        }
        if self._peak_flops:
            metrics["throughput/mfu"] = self._acc.get("flops", 0.0) / dt / self._peak_flops
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            metrics["memory/peak_allocated_gib"] = (
                torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            )
        pl_module.log_dict(metrics, rank_zero_only=True)
        self._warn_if_starved(trainer, metrics["train/data_wait"])
        # the next window starts here: the wait for its first batch is inside it
        self._acc, self._steps, self._waited = {}, 0, 0.0
        self._start = self._ended = time.perf_counter()

    def _warn_if_starved(self, trainer, wait: float) -> None:
        """One line once the data has held the loop back `patience` windows in a row (again only
        after it recovered)."""
        self._starved_windows = self._starved_windows + 1 if wait > self.starved else 0
        if self._starved_windows != self.patience or not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        workers = getattr(dm, "num_workers", None)
        log.warning(
            "data starvation: the training loop waited for its batches %.0f%% of the last %d "
            "windows of %d steps (step %d). Raise data.num_workers (now %s), keep "
            "data.persistent_workers=true, stream shards from local disk, or train from feature "
            "shards (data=feature_shards: no encoder, no audio decoding)",
            100 * wait,
            self.patience,
            self.window,
            trainer.global_step,
            workers,
        )

    @staticmethod
    def _slowest_rank(trainer, pl_module, wait: float) -> float:
        """The largest of the ranks' values (every rank ends its windows at the same step)."""
        if trainer.world_size == 1:
            return wait
        value = torch.tensor(wait, dtype=torch.float32, device=pl_module.device)
        return float(trainer.strategy.reduce(value, reduce_op="max"))

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


def git_commit(root: Path) -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
        ).stdout
        return sha.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class RunInfo(L.Callback):
    """Records the git commit and package versions with the run (beside Hydra's config)."""

    def __init__(self, output_dir: str, repo_dir: str) -> None:
        self.output_dir, self.repo_dir = Path(output_dir), Path(repo_dir)

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        info: dict[str, Any] = {
            "git_commit": git_commit(self.repo_dir),
            "versions": package_versions(),
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "run_info.json").write_text(json.dumps(info, indent=1))
        for logger in trainer.loggers:
            logger.log_hyperparams({"run": info})
