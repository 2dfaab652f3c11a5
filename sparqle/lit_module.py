"""The LightningModule: Lightning's hooks over SparQLe's named parts.

    the model for a stage      sparqle/build.py        (build_model, module_kwargs)
    what a checkpoint holds    sparqle/checkpoints.py  (names, fit check, RNG, clip lengths)
    how parameters step        sparqle/optim.py        (AdamW groups, schedule, skipped steps)
    what a step costs          sparqle/flops.py        (returned with the loss)
    validation figures         sparqle/validation.py   (the same on any number of ranks)
    decoding                   sparqle/inference.py    (as eval.py and transcribe decode)
    the batch                  sparqle/data/batch.py

On several ranks (DDP or FSDP) every rank runs the same collectives each step: a rank whose
batch is empty steps on a stand-in, and whether the optimizer applies a step (any rank's loss
non-finite, or any stand-in) is decided on the device and applied by the fused optimizer, so
no rank waits on a host read of the loss.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from sparqle import checkpoints, flops, optim
from sparqle.build import build_model, module_kwargs
from sparqle.data.batch import Batch
from sparqle.distributed import gather_objects
from sparqle.inference import decode
from sparqle.models.llm import check_generation
from sparqle.prompts import TRANSCRIBE, instruction
from sparqle.strategies import FSDP2Strategy
from sparqle.validation import ValidationTally, log_examples

log = logging.getLogger(__name__)


def upgrade_llm_config(llm: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint or export written before 2026-12-01 names llm.activation_checkpointing
    `gradient_checkpointing`; it loads as the new name."""
    if "gradient_checkpointing" not in llm:
        return llm
    llm = dict(llm)
    llm["activation_checkpointing"] = llm.pop("gradient_checkpointing")
    return llm


class SparQLeModule(L.LightningModule):
    def __init__(
        self,
        stage: dict[str, Any],
        encoder: dict[str, Any],
        adapter: dict[str, Any],
        llm: dict[str, Any],
        generation: dict[str, Any] | None = None,
        val_decode_clips: int = 1000,
        max_nonfinite_steps: int = 10,
        train_tasks: list[str] | None = None,
        text_case: str | None = None,
        features: dict[str, Any] | None = None,
        load_device: str | None = None,
    ) -> None:
        """The config groups of sparqle/build.py. `features`: the index record of the feature
        shards it trains on (the encoder is neither loaded nor run; not saved: inference on audio
        rebuilds the encoder); `load_device`: this rank's GPU, where frozen parts load (not
        saved). `train_tasks`, `text_case`: what the data taught it (saved, for evaluation)."""
        super().__init__()
        llm = upgrade_llm_config(llm)
        self.save_hyperparameters(ignore=["features", "load_device"])
        self.stage = stage["name"]
        self.optim_cfg = dict(stage.get("optim", {}))
        self.generation = check_generation(generation or {})
        self.val_decode_clips = val_decode_clips
        self.max_nonfinite_steps = max_nonfinite_steps
        self.skips = optim.StepSkips()
        self.skipped_samples: Counter[str] = Counter()  # by reason, this rank, since the start
        self.trained_clip_seconds: tuple[float, float] | None = None  # (shortest, longest)
        self.strict_loading = False  # checkpoints hold what trains only (on_load_checkpoint)
        self._rng_to_restore: dict[str, Any] | None = None
        self._last_batch: Batch | None = None
        self.model = build_model(stage, encoder, adapter, llm, features, load_device)
        init = stage.get("init_from")
        self.adapter_loaded = bool(init) and str(init).lower() != "none"
        if self.adapter_loaded:
            self.adapter_loaded = checkpoints.init_adapter_from(self, init)

    @classmethod
    def from_config(cls, cfg: DictConfig, **kwargs: Any) -> SparQLeModule:
        """The module a composed config describes (`features`, `load_device` as kwargs)."""
        return cls(**module_kwargs(cfg), **kwargs)

    # ----------------------------------------------------------------- set-up and checkpoints
    def configure_model(self) -> None:
        """Under trainer=fsdp, shard the model (once) over the strategy's device mesh."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy) and not strategy.units:
            strategy.shard(self.model)
            log.info("FSDP2 units: %s", ", ".join(strategy.units))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoints.add_to_checkpoint(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoints.read_checkpoint(checkpoint, self)

    def on_train_start(self) -> None:
        """A resumed run continues the random streams (dropout, ITM negatives) where they stood."""
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng:
            checkpoints.set_rng_state(rng)

    def on_train_epoch_start(self) -> None:
        """Before the epoch's loader starts its workers: streamed data reads another shard order
        each epoch (a DataModule with `set_epoch`; samplers get theirs from Lightning)."""
        if hasattr(datamodule := getattr(self.trainer, "datamodule", None), "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        optimizer = optim.build_optimizer(
            self.named_parameters(), self.optim_cfg, fresh=not self.adapter_loaded
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = optim.build_scheduler(optimizer, self.optim_cfg, total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        """Clip by norm (when set) and log the norm clip_grad_norm_ computed anyway."""
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"trainer.gradient_clip_algorithm={gradient_clip_algorithm}: use norm")
        if (norm := optim.clip_gradients(optimizer, gradient_clip_val)) is not None:
            self.log("train/grad_norm", norm)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Decide on the device whether this step applies: not if any rank's loss was
        non-finite or any rank stepped on a stand-in batch. The fused optimizer reads the flag."""
        getattr(optimizer, "optimizer", optimizer).found_inf = self.skips.decide(self.device)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.model.heads is not None:
            self.model.heads.clamp_temperature()
        if self.global_step % self.trainer.log_every_n_steps:
            return
        # samples skipped by reason since the run began, summed over ranks (a host exchange once
        # per logging interval; every rank is at the same step)
        totals: Counter[str] = Counter()
        for counts in gather_objects(dict(self.skipped_samples)):
            totals.update(counts)
        for name, n in sorted(totals.items()):
            self.log(f"train/{name}", float(n), rank_zero_only=True)
        if self.skips.total is not None:
            self.log("train/skipped_steps", self.skips.total, reduce_fx="max")
            if (longest := self.skips.longest_run()) >= self.max_nonfinite_steps:
                raise optim.TrainingDiverged(
                    f"{longest} non-finite losses in a row before step {self.global_step}: "
                    "stopping (lower stage.optim.lr, or check the data)"
                )

    # ----------------------------------------------------------------- batches
    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int = 0) -> Batch:
        """On the host, before the copy: count the work, note the clip lengths it trains on, and
        give a rank whose batch is empty (every clip skipped) a stand-in, so it still runs the
        step's collectives (training: its last real batch, for alike shapes; else silence)."""
        training = self._trainer is not None and self.trainer.training
        if len(batch):
            self._last_batch = batch
            if training:
                self._note_clip_seconds(batch.audio_lens)
        else:
            last = self._last_batch if training and self._last_batch is not None else self.silence()
            batch = Batch(
                **{**vars(last), "num_skipped": batch.num_skipped, "skipped": batch.skipped}
            )
            batch.standin = True
        batch.host_lengths = batch.speech[1].tolist()
        batch.audio_seconds = float(batch.audio_lens.sum()) / self.model.encoder.sample_rate
        if self.model.llm is not None:  # the LLM input layout, from the host's lengths
            batch.speech_lengths = self.model.speech_lengths(batch.speech[1])
        return batch

    def _note_clip_seconds(self, audio_lens: torch.Tensor) -> None:
        sr = self.model.encoder.sample_rate
        lo, hi = float(audio_lens.min()) / sr, float(audio_lens.max()) / sr
        if self.trained_clip_seconds is not None:
            lo, hi = min(lo, self.trained_clip_seconds[0]), max(hi, self.trained_clip_seconds[1])
        self.trained_clip_seconds = (round(lo, 3), round(hi, 3))

    def silence(self) -> Batch:
        """One second of silence asking for a transcript: a stand-in that counts nothing."""
        enc, sr = self.model.encoder, self.model.encoder.sample_rate
        speech = {"audio": torch.zeros(1, sr)}
        if not getattr(enc, "encodes", True):  # feature shards: a second of zero features
            frames = max(1, round(enc.frame_rate))
            speech = {
                "features": torch.zeros(1, frames, enc.hidden_size),
                "feature_lens": torch.tensor([frames]),
            }
        texts = {"text": ["."], "task": [TRANSCRIBE], "lang": ["en"], "target": ["."]}
        return Batch(
            id=["<stand-in>"],
            instruction=[instruction(TRANSCRIBE)],
            audio_lens=torch.tensor([sr]),
            **texts,
            **speech,
        )

    # ----------------------------------------------------------------- steps
    def model_step(self, batch: Batch, validating: bool = False) -> dict[str, Any]:
        """The stage's losses on a batch. Validating: a stand-in counts nothing (no rows, no
        tokens), stage 2's loss is this rank's sum over its tokens, and stage 1 takes each row's
        hardest negative instead of drawing one."""
        speech, lens = batch.speech
        counts = not (validating and batch.standin)
        if self.stage == "pretrain":
            return self.model.pretrain(
                speech, lens, batch.text, contributes=counts, sample_negatives=not validating
            )
        loss, inputs = self.model(
            speech, lens, batch.instruction, batch.target, batch.speech_lengths,
            scored=counts, summed=validating,
        )  # fmt: skip
        return {
            "loss": loss,
            "target_tokens": inputs.scored_tokens,
            "llm_tokens": inputs.positions,
            "llm_rows": inputs.row_lengths,
            "llm_scored_from": inputs.scored_from,
        }

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """The loss, and the step's work (audio seconds, clips, LLM tokens, FLOPs: host-side
        counts) for the throughput callback."""
        self.skipped_samples.update(
            {"skipped": batch.num_skipped}
            | {f"skipped/{k.replace(' ', '_')}": n for k, n in batch.skipped.items()}
        )
        out = self.model_step(batch)
        bad = ~torch.isfinite(out["loss"].detach())
        self.skips.note(torch.ones_like(bad) if batch.standin else bad)  # no host->device copy
        if batch.standin:
            return {"loss": out["loss"] * 0.0}
        for k in ("loss", "itc", "itm", "itg", "query_spread", "temperature"):
            if k in out:  # not on the progress bar: it would read the loss back every step
                self.log(f"train/{k}", out[k], batch_size=len(batch))
        work = {
            "audio_seconds": batch.audio_seconds,
            "samples": len(batch),
            "llm_tokens": float(out.get("llm_tokens", 0)),
            "flops": flops.step_work(self.model, batch.host_lengths, out),
        }
        return {"loss": out["loss"], "work": work}

    # ----------------------------------------------------------------- validation
    def on_validation_start(self) -> None:
        # keep validation's draws out of the training stream, so a resumed run replays exactly
        self._rng_before_val = checkpoints.rng_state()

    def on_validation_end(self) -> None:
        checkpoints.set_rng_state(self._rng_before_val)

    def on_validation_epoch_start(self) -> None:
        self.tally = ValidationTally()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """A rank with nothing (a stand-in) adds nothing, and decodes only where the model is
        sharded (every rank must then take part in each generation step)."""
        clips = 0 if batch.standin else len(batch)
        out = self.model_step(batch, validating=True)
        if self.stage == "pretrain":
            return self.tally.add_stage1(out, clips)
        self.tally.add("loss", out["loss"], out["target_tokens"])
        if self.tally.decoded >= self.val_decode_clips:
            return
        self.tally.decoded += int(sum(gather_objects(clips)))  # the same count on every rank
        if batch.standin and not isinstance(self.trainer.strategy, FSDP2Strategy):
            return
        decoded = decode(self.model, batch.clips(), batch.instruction, self.generation)
        self.tally.add_hypotheses(batch, [d.text for d in decoded][:clips])

    def on_validation_epoch_end(self) -> None:
        heads = self.model.heads
        figures = self.tally.reduce(heads.query_spread_weight if heads is not None else None)
        for name in sorted(figures):
            self.log(f"val/{name}", figures[name], prog_bar=name == "loss")
        if self.global_rank == 0:
            rows = self.tally.examples()
            log_examples(self.loggers, rows, self.model.encoder.sample_rate, self.global_step)
