"""The LightningModule: builds the model for a stage, trains it, validates it, checkpoints it.

Stages:
- pretrain: encoder (frozen) + Q-Former trained with ITC + ITM + ITG; no LLM is loaded.
- instruct: encoder (frozen) + adapter (+ LoRA) trained with the frozen LLM's next-token loss.

Checkpoints hold the trainable parameters (and the adapter's few frozen ones), never the
frozen encoder and LLM, which are rebuilt from their `name_or_path` in the saved config.

On several ranks (DDP or FSDP) every rank runs the same collectives each step: a rank whose
batch is empty steps on a stand-in, and whether the optimizer applies a step (any rank's loss
non-finite, or any stand-in) is decided on the device and applied by the fused optimizer, so
no rank waits on a host read of the loss.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from transformers import AutoConfig

from sparqle import flops, metrics
from sparqle.distributed import all_reduce_max, all_reduce_sum, gather_objects, world
from sparqle.models.adapters import QFormerAdapter
from sparqle.models.encoder import PrecomputedFeatures, SpeechEncoder
from sparqle.models.llm import check_generation
from sparqle.models.loading import describe, quiet_loading
from sparqle.models.pretrain import SpeechTextPretrainer
from sparqle.models.sparqle import SparQLe
from sparqle.prompts import TRANSCRIBE, instruction
from sparqle.schedule import build_scheduler
from sparqle.strategies import FSDP2Strategy

log = logging.getLogger(__name__)

STAGES = ("pretrain", "instruct")
# parameters left out of weight decay by default (name fragments; stage.optim.no_decay)
NO_DECAY = ("bias", "norm", "LayerNorm", "layernorm", "query_tokens", "temp", "layer_weights")


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the configured model; the message names the parameters."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


class StepSkips:
    """Which optimizer steps are skipped, kept on the device: flags accumulate over a step's
    micro-batches, are reduced over ranks, and are read on the host once per logging interval.

    `riders`: flags other parts of the run send along on the same all-reduce (a max over ranks),
    so they cost no collective of their own (the stop signals of sparqle/lifecycle.py);
    `reduced_riders` holds them after each step's reduction."""

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None
        self.run = self.longest = self.total = None
        self.riders: torch.Tensor | None = None
        self.reduced_riders: torch.Tensor | None = None

    def note(self, bad: torch.Tensor) -> None:
        bad = bad.float()
        self.pending = bad if self.pending is None else torch.maximum(self.pending, bad)

    def decide(self, device: torch.device) -> torch.Tensor:
        """1.0 if any rank flagged this step, else 0.0 (a device collective, no host read)."""
        zero = torch.zeros((), device=device)
        pending = self.pending if self.pending is not None else zero
        if self.riders is None:
            skip = all_reduce_max(pending)
        else:
            reduced = all_reduce_max(torch.cat([pending.reshape(1), self.riders]))
            skip, self.reduced_riders = reduced[0], reduced[1:]
        self.pending = None
        if self.total is None:
            self.run, self.longest, self.total = zero, zero, zero
        self.run = (self.run + 1) * skip
        self.longest = torch.maximum(self.longest, self.run)
        self.total = self.total + skip
        return skip

    def longest_run(self) -> int:
        """The longest run of skipped steps since the last call (one host read)."""
        if self.longest is None:
            return 0
        longest, self.longest = int(self.longest), torch.zeros_like(self.longest)
        return longest


def upgrade_llm_config(llm: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint or export written before 2026-12-01 names llm.activation_checkpointing
    `gradient_checkpointing`; it loads as the new name."""
    if "gradient_checkpointing" not in llm:
        return llm
    llm = dict(llm)
    llm["activation_checkpointing"] = llm.pop("gradient_checkpointing")
    return llm


def speech_input(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the encoder takes: (audio, samples), or from feature shards (features, frames)."""
    if "features" in batch:
        return batch["features"], batch["feature_lens"]
    return batch["audio"], batch["audio_lens"]


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
        """`features`: the index record of the feature shards it trains on; the encoder is then
        neither loaded nor run (not saved: the checkpoint's encoder config rebuilds the encoder
        for inference on audio). `load_device`: where the frozen encoder and LLM are loaded
        straight to (this rank's GPU; not saved either). `train_tasks`, `text_case`: what the
        data taught it (saved, so evaluation scores zero-shot directions apart and cases its
        references as the model learnt them)."""
        super().__init__()
        llm = upgrade_llm_config(llm)
        self.save_hyperparameters(ignore=["features", "load_device"])
        self.stage = stage["name"]
        if self.stage not in STAGES:
            raise ValueError(f"stage.name={self.stage!r}: expected one of {', '.join(STAGES)}")
        self.optim_cfg = dict(stage.get("optim", {}))
        self.generation = check_generation(generation or {})
        self.val_decode_clips = val_decode_clips
        self.max_nonfinite_steps = max_nonfinite_steps
        self.batch_stats: dict[str, float] = {}
        self.skips = StepSkips()
        self.skipped_samples: Counter[str] = Counter()  # by reason, this rank, since the start
        self._rng_to_restore: dict[str, Any] | None = None
        self._last_batch: dict[str, Any] | None = None
        # (shortest, longest) training clip in seconds: inference cuts long audio to this
        self.clip_seconds: tuple[float, float] | None = None
        self.strict_loading = (
            False  # checkpoints hold trainable weights only; see on_load_checkpoint
        )

        with quiet_loading():  # one line per part below instead of transformers' reports
            on = {"device": load_device} if load_device else {}
            enc = PrecomputedFeatures(features) if features else instantiate(encoder, **on)
            if self.stage == "pretrain":
                llm_module = None
                llm_dim = AutoConfig.from_pretrained(llm["name_or_path"]).hidden_size
            else:
                llm_module = instantiate(llm, **on)
                llm_dim = llm_module.hidden_size
            ada = instantiate(
                adapter, encoder_dim=enc.hidden_size, llm_dim=llm_dim, frame_rate=enc.frame_rate
            )
            heads = None
            if self.stage == "pretrain":
                if not isinstance(ada, QFormerAdapter):
                    raise ValueError(
                        f"stage=pretrain trains a Q-Former; adapter={type(ada).__name__} has none"
                    )
                if adapter.get("bert") is None:
                    raise ValueError(
                        "stage=pretrain needs adapter.bert: its tokenizer encodes the transcripts"
                    )
                heads = SpeechTextPretrainer(
                    ada.qformer, adapter["bert"], **stage.get("pretrain", {})
                )
                heads.load_bert_lm_head(adapter["bert"])
                ada.proj.requires_grad_(False)  # the projection to the LLM is trained in stage 2
            elif isinstance(getattr(ada, "qformer", None), torch.nn.Module):
                # text positions are unused without the stage-1 losses
                for p in ada.qformer.text_parameters():
                    p.requires_grad_(False)
        self.model = SparQLe(enc, ada, llm_module, heads)
        if features:
            log.info(
                "encoder: none loaded; features of %s from feature shards (%d-d, %s)",
                features["encoder"],
                enc.hidden_size,
                features.get("dtype"),
            )
        else:
            log.info(describe("encoder", encoder["name_or_path"], enc))
        log.info(describe("adapter", type(ada).__name__, ada))
        if llm_module is not None:
            log.info(describe("llm", llm["name_or_path"], llm_module))
        self.adapter_loaded = False  # set where a stage-1 checkpoint initialises the adapter
        if stage.get("init_from") and str(stage["init_from"]).lower() != "none":
            self.load_adapter_from(stage["init_from"])

    # ----------------------------------------------------------------- parameters and checkpoints
    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def checkpoint_names(self) -> list[str]:
        """What a checkpoint holds: the trained parameters and the persistent buffers outside the
        pretrained encoder and LLM. Frozen parameters are left out: the pretrained ones reload
        from name_or_path, and the adapter's (stage 1's projection, the Q-Former's text parts in
        stage 2: ~80M for the paper) are idle in the stage that froze them."""
        trainable = set(self.trainable_names())
        params = {n for n, _ in self.named_parameters()}
        pretrained = ("model.encoder.model.", "model.llm.model.")
        return [
            k
            for k in self.state_dict()
            if k in trainable or (k not in params and not k.startswith(pretrained))
        ]

    def load_adapter_from(self, path: str) -> None:
        """Initialise the adapter from what another run (e.g. stage 1) trained; the rest is ignored.

        Tensors that run kept but never trained (stage 1's projection into its LLM) are skipped,
        so a stage-1 checkpoint serves any LLM.
        """
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = ckpt.get("state_dict", ckpt)
        learned = ckpt.get("sparqle_trainable")
        wanted = {
            k: v
            for k, v in state.items()
            if k.startswith("model.adapter.") and (learned is None or k in learned)
        }
        if not wanted:
            raise CheckpointMismatch(
                f"stage.init_from={path}: no adapter weights in this checkpoint"
            )
        if not hasattr(self.model.adapter, "qformer") and all(
            k.startswith("model.adapter.qformer.") for k in wanted
        ):  # a sweep over adapters from one stage-1 run: only the Q-Former ones take it
            log.warning(
                "stage.init_from=%s holds a stage-1 Q-Former; adapter %s has none and starts fresh",
                path,
                type(self.model.adapter).__name__,
            )
            return
        own = self.state_dict()
        bad = [k for k, v in wanted.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise CheckpointMismatch(
                f"stage.init_from={path}: adapter weights do not fit this model ({len(bad)} tensors, "
                f"first: {bad[0]}); was it trained with another encoder or adapter config?"
            )
        self.load_state_dict(wanted, strict=False)
        log.info("initialised %d adapter tensors from %s", len(wanted), path)
        self.adapter_loaded = True

    def configure_model(self) -> None:
        """Under trainer=fsdp, shard the model (once) over the strategy's device mesh."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy) and not strategy.units:
            strategy.shard(self.model)
            log.info("FSDP2 units: %s", ", ".join(strategy.units))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = set(self.checkpoint_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["sparqle_trainable"] = self.trainable_names()
        checkpoint["rng"] = gather_objects(_rng_state())  # one entry per rank
        seen = [r for r in gather_objects(self.clip_seconds) if r is not None]
        if seen:
            checkpoint["sparqle_clip_seconds"] = [min(r[0] for r in seen), max(r[1] for r in seen)]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("rng")
        rank, size = world()
        if isinstance(rng, list):  # one state per rank; another world size replays rank 0's
            rng = rng[rank] if len(rng) == size else rng[0]
        self._rng_to_restore = rng
        if checkpoint.get("sparqle_clip_seconds"):
            self.clip_seconds = tuple(checkpoint["sparqle_clip_seconds"])
        state = checkpoint["state_dict"]
        own = self.state_dict()
        unexpected = [k for k in state if k not in own]
        mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
        missing = [k for k in self.checkpoint_names() if k not in state]
        for what, keys in (
            ("unknown", unexpected),
            ("wrongly shaped", mismatched),
            ("missing", missing),
        ):
            if keys:
                raise CheckpointMismatch(
                    f"checkpoint does not fit this model: {len(keys)} {what} tensors (first: {keys[0]}); "
                    "it was trained with another stage, encoder, adapter or LLM config"
                )

    def on_train_start(self) -> None:
        """A resumed run continues the random streams (dropout, ITM negatives) where they stood."""
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng:
            _set_rng_state(rng)

    def on_train_epoch_start(self) -> None:
        """Before the epoch's loader starts its workers: streamed data reads another shard order
        each epoch (a DataModule with `set_epoch`; samplers get theirs from Lightning)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        if "16" in str(self.trainer.precision) and "bf16" not in str(self.trainer.precision):
            raise ValueError(
                f"trainer.precision={self.trainer.precision}: fp16 is not supported, use bf16-mixed"
            )
        cfg = self.optim_cfg
        lr = cfg.get("lr", 1e-4)
        # BERT has no cross-attention: it starts from random weights unless a stage-1 checkpoint
        # brought it, and may then learn faster than the pretrained rest (1: one rate, as LAVIS)
        no_decay = tuple(cfg.get("no_decay", NO_DECAY))
        fresh = not self.adapter_loaded
        new_scale = float(cfg.get("new_cross_attention_lr_scale", 1.0)) if fresh else 1.0
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                key = (
                    not any(k in name for k in no_decay),
                    new_scale != 1.0 and "crossattention" in name,
                )
                groups.setdefault(key, []).append(p)
        # fused: one kernel, and it skips a step the device flagged (found_inf) without a host read
        optimizer = torch.optim.AdamW(
            [
                {
                    "params": params,
                    "weight_decay": cfg.get("weight_decay", 0.05) if decays else 0.0,
                    "lr": lr * (new_scale if new else 1.0),
                }
                for (decays, new), params in sorted(groups.items(), reverse=True)
            ],
            lr=lr,
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
            eps=cfg.get("eps", 1e-8),
            fused=True,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = build_scheduler(optimizer, cfg, total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Clip by norm (when set) and log the norm clip_grad_norm_ computed anyway."""
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"trainer.gradient_clip_algorithm={gradient_clip_algorithm}: use norm")
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val or float("inf"))
        self.log("train/grad_norm", _local(norm))

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
            longest = self.skips.longest_run()
            if longest >= self.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"{longest} non-finite losses in a row before step {self.global_step}: "
                    "stopping (lower stage.optim.lr, check the data, or use bf16 instead of fp16)"
                )

    # ----------------------------------------------------------------- batches
    def longest_clip_seconds(self, default: float = 30.0) -> float:
        """The longest clip it trained on (kept in checkpoints and exports): inference cuts
        longer audio into pieces of at most this."""
        return self.clip_seconds[1] if self.clip_seconds else default

    def _note_clip_seconds(self, audio_lens: torch.Tensor) -> None:
        """Host-side lengths (before the copy), so this reads nothing back from a device."""
        sr = self.model.encoder.sample_rate
        lo, hi = float(audio_lens.min()) / sr, float(audio_lens.max()) / sr
        if self.clip_seconds is not None:
            lo, hi = min(lo, self.clip_seconds[0]), max(hi, self.clip_seconds[1])
        self.clip_seconds = (round(lo, 3), round(hi, 3))

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int = 0):
        """On the host, before the copy to the device: count the work, and give a rank whose
        batch is empty (every clip skipped) a stand-in, so it still runs the step's collectives."""
        if batch["id"]:
            self._last_batch = {
                k: v for k, v in batch.items() if k not in ("skipped", "num_skipped")
            }
            batch["standin"] = False
            if self._trainer is not None and self.trainer.training:
                self._note_clip_seconds(batch["audio_lens"])
        else:
            # training: the last real batch, so the step's shapes stay alike; evaluation: one
            # second of silence (it counts nothing either way)
            training = self._trainer is not None and self.trainer.training
            standin = self._last_batch if training and self._last_batch else self._silence()
            batch = {**batch, **standin, "standin": True}
        batch["stats"] = {
            "audio_seconds": float(batch["audio_lens"].sum()) / self.model.encoder.sample_rate,
            "samples": len(batch["id"]),
            "lengths": speech_input(batch)[1].tolist(),
        }
        if self.model.llm is not None:  # the LLM input layout, from the host's lengths
            batch["speech_lengths"] = self.model.speech_lengths(speech_input(batch)[1])
        return batch

    def _silence(self) -> dict[str, Any]:
        sr = self.model.encoder.sample_rate
        if isinstance(self.model.encoder, PrecomputedFeatures):
            frames = max(1, round(self.model.encoder.frame_rate))
            speech = {
                "features": torch.zeros(1, frames, self.model.encoder.hidden_size),
                "feature_lens": torch.tensor([frames]),
            }
        else:
            speech = {"audio": torch.zeros(1, sr)}
        return {
            "id": ["<stand-in>"],
            **speech,
            "audio_lens": torch.tensor([sr]),
            "text": ["."],
            "task": [TRANSCRIBE],
            "lang": ["en"],
            "instruction": [instruction(TRANSCRIBE)],
            "target": ["."],
        }

    # ----------------------------------------------------------------- steps
    def _losses(self, batch: dict[str, Any], validating: bool = False) -> dict[str, torch.Tensor]:
        """The stage's losses on a batch. Validating: a stand-in batch counts nothing (no rows,
        no tokens), stage 2's loss is this rank's sum over its tokens, and stage 1 takes each
        row's hardest negative instead of drawing one."""
        speech, lens = speech_input(batch)
        counts = not (validating and batch.get("standin"))
        if self.stage == "pretrain":
            return self.model.pretrain(
                speech, lens, batch["text"], contributes=counts, sample_negatives=not validating
            )
        loss, inputs = self.model(
            speech,
            lens,
            batch["instruction"],
            batch["target"],
            batch.get("speech_lengths"),
            scored=counts,
            summed=validating,
        )
        return {
            "loss": loss,
            "target_tokens": inputs.scored_tokens,
            "llm_tokens": inputs.positions,
            "adapter_positions": inputs.speech_positions,
            "llm_rows": inputs.row_lengths,
            "llm_scored_from": inputs.scored_from,
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        standin = batch.get("standin", False)
        self.skipped_samples.update(_skip_counts(batch))  # host counts, logged every interval
        out = self._losses(batch)
        loss = out["loss"]
        bad = ~torch.isfinite(loss.detach())
        self.skips.note(torch.ones_like(bad) if standin else bad)  # no host->device copy
        if standin:
            return loss * 0.0
        bs = len(batch["id"])
        for k in ("loss", "itc", "itm", "itg", "query_spread"):
            if k in out:
                # not on the progress bar: it would read the loss back to the host every step
                self.log(f"train/{k}", out[k], batch_size=bs)
        if "temperature" in out:
            self.log("train/temperature", out["temperature"], batch_size=bs)
        self.batch_stats = self._batch_stats(batch, out)
        return loss

    def _batch_stats(self, batch: dict[str, Any], out: dict[str, Any]) -> dict[str, float]:
        """Work done by this step, for throughput and MFU, from host-side counts: FLOPs from the
        real shapes (sparqle/flops.py) of the encoder (forward once; nothing where features
        come from the cache), the trained adapter (x3: forward, both backwards) and the frozen
        LLM (x2: forward, backward to its inputs)."""
        stats = batch.get("stats") or {
            "audio_seconds": float(batch["audio_lens"].sum()) / self.model.encoder.sample_rate,
            "samples": len(batch["id"]),
            "lengths": speech_input(batch)[1].tolist(),
        }
        model = self.model
        lengths = stats.get("lengths") or []
        frames = model.encoder.output_lengths(torch.tensor(lengths, dtype=torch.long)).tolist()
        runs_encoder = isinstance(model.encoder, SpeechEncoder) and not model.encoder.cache_features
        encoder = sum(map(self._encoder_flops, lengths)) if runs_encoder else 0.0
        adapter = self._adapter_flops(frames, out.get("text_lengths"))
        llm = 0.0
        if model.llm is not None and out.get("llm_rows"):
            rows, start = out["llm_rows"], out["llm_scored_from"]
            llm = flops.llm_forward(model.llm.model.config, rows, [n - start for n in rows])
        llm_tokens = float(out.get("llm_tokens", 0))
        total = encoder + 3 * adapter + 2 * llm
        counts = {k: v for k, v in stats.items() if k != "lengths"}
        return {**counts, "llm_tokens": llm_tokens, "flops": total}

    def _encoder_flops(self, samples: int) -> float:
        enc = self.model.encoder
        if hasattr(enc.model.config, "conv_dim"):
            return flops.ssl_encoder(enc.model.config, samples)
        return flops.whisper_encoder(enc.model.config, enc.feature_extractor.nb_max_frames)

    def _adapter_flops(self, frames: list[int], text_lengths: list[int] | None) -> float:
        adapter, enc_dim = self.model.adapter, self.model.encoder.hidden_size
        qformer = getattr(adapter, "qformer", None)
        if qformer is None:  # LinearAdapter: the k-frame stacks through the 2-layer MLP
            first, second = adapter.mlp[0], adapter.mlp[2]
            per = 2 * (
                first.in_features * first.out_features + second.in_features * second.out_features
            )
            return sum(per * -(-f // adapter.k) for f in frames)
        cfg, nq, h = qformer.config, qformer.num_queries, qformer.hidden_size
        proj = 2 * nq * h * adapter.proj.out_features
        if hasattr(adapter, "window"):  # one pass per window that holds audio
            windows = adapter.output_lengths(torch.tensor(frames)).div(nq).long().tolist()
            return sum(
                w * (flops.qformer_pass(cfg, nq, 0, adapter.window, enc_dim) + proj)
                for w in windows
            )
        if text_lengths is None:  # stage 2: the queries, then the projection into the LLM
            return sum(flops.qformer_pass(cfg, nq, 0, f, enc_dim) + proj for f in frames)
        # stage 1: ITC (queries; text alone), ITM (3 pairs each), ITG (queries + text, LM head)
        vocab = qformer.embeddings.word_embeddings.weight.shape[0]
        return sum(
            flops.qformer_pass(cfg, nq, 0, f, enc_dim)
            + flops.qformer_pass(cfg, 0, t, 0, enc_dim)
            + 4 * flops.qformer_pass(cfg, nq, t, f, enc_dim)
            + 2 * t * h * (h + vocab)
            for f, t in zip(frames, text_lengths, strict=True)
        )

    def on_validation_start(self) -> None:
        # Validation draws random numbers too (dropout stays off, but a stand-in's data); keep them
        # out of the training stream so a run resumed from a checkpoint replays training exactly
        # (on GPU the CUDA generators are saved with the CPU, numpy and Python ones).
        self._rng_before_val = _rng_state()

    def on_validation_end(self) -> None:
        _set_rng_state(self._rng_before_val)

    def on_validation_epoch_start(self) -> None:
        self._val = defaultdict(list)
        self._val_sums: dict[str, torch.Tensor] = {}
        self._val_decoded = 0  # clips decoded so far, over every rank

    def _val_add(self, name: str, total: torch.Tensor, weight: float) -> None:
        """A (sum, weight) pair for a figure averaged over the whole validation set, reduced over
        ranks at the epoch's end: the figure is then the same however the set was batched or
        split over ranks. A zero weight adds nothing (whatever `total` is)."""
        total = total.detach().float() if weight else torch.zeros_like(total, dtype=torch.float)
        self._val_sums[name] = self._val_sums.get(name, 0) + torch.stack(
            [total, total.new_tensor(float(weight))]
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Figures over the validation set, equal to one process's on any number of ranks: each
        averaged over what it is a mean of (clips, ITG and LLM target tokens); a rank with
        nothing (a stand-in) adds nothing, and decodes only where the model is sharded (every
        rank must then take part in each generation step)."""
        standin = bool(batch.get("standin"))
        clips = 0 if standin else len(batch["id"])
        out = self._losses(batch, validating=True)
        if self.stage == "pretrain":
            for k in ("itc", "itm", "query_spread", "query_spread_hinge"):
                self._val_add(k, out[k] * clips, clips)
            self._val_add(
                "itg", out["itg"] * out["itg_tokens"], 0 if standin else out["itg_tokens"]
            )
            hits = (out["sim_s2t"].argmax(1) == out["itc_targets"]).float().sum()
            self._val_add("r_at_1_in_batch", hits, clips)
            return
        self._val_add("loss", out["loss"], out["target_tokens"])
        if self._val_decoded >= self.val_decode_clips:
            return
        self._val_decoded += int(sum(gather_objects(clips)))  # the same count on every rank
        if standin and not self._sharded():
            return
        hyps = self.model.generate(*speech_input(batch), batch["instruction"], **self.generation)
        for i, hyp in enumerate(hyps[:clips]):
            key = (
                batch["task"][i]
                if batch["task"][i] == TRANSCRIBE
                else f"translate_{batch['lang'][i]}"
            )
            audio = (  # none to play back from feature shards
                batch["audio"][i, : batch["audio_lens"][i]].cpu().numpy()
                if "audio" in batch
                else None
            )
            self._val[key].append((batch["id"][i], batch["target"][i], hyp, audio))

    def _sharded(self) -> bool:
        return self._trainer is not None and isinstance(self.trainer.strategy, FSDP2Strategy)

    def on_validation_epoch_end(self) -> None:
        """Every metric over all ranks' utterances: sums reduced, hypotheses gathered, so the
        figures equal a one-process validation of the same data."""
        reduced = {}
        for name in sorted(self._val_sums):  # the same names, in the same order, on every rank
            total, weight = all_reduce_sum(self._val_sums[name]).unbind()
            reduced[name] = total / weight.clamp(min=1)
        if self.stage == "pretrain":  # stage 1's loss from its parts, each averaged as above
            reduced["loss"] = reduced["itc"] + reduced["itm"] + reduced["itg"]
            spread_weight = self.model.heads.query_spread_weight
            if spread_weight > 0:
                reduced["loss"] = reduced["loss"] + spread_weight * reduced["query_spread_hinge"]
            reduced.pop("query_spread_hinge")
        for name in sorted(reduced):
            self.log(f"val/{name}", reduced[name], prog_bar=name == "loss")
        mine = {k: [row[:3] for row in rows] for k, rows in self._val.items()}
        merged: dict[str, list] = defaultdict(list)
        for part in gather_objects(mine):
            for key, rows in part.items():
                merged[key] += rows
        for key in sorted(merged):
            refs, hyps = [r[1] for r in merged[key]], [r[2] for r in merged[key]]
            if key == TRANSCRIBE:
                self.log("val/wer", metrics.word_error_rate(refs, hyps)["wer"])
            else:
                lang = key.split("_", 1)[1]
                self.log(f"val/bleu_{lang}", metrics.translation_scores(refs, hyps, lang)["bleu"])
        table = []
        for key, rows in self._val.items():
            for uid, ref, hyp, _ in rows[:3]:
                log.info("[%s] %s | ref: %s | hyp: %s", key, uid, ref, hyp)
            table += [(key, *row) for row in rows[:8]]
        self._log_examples(table)

    def _log_examples(self, rows: list[tuple]) -> None:
        """Validation examples on wandb: a table of reference vs hypothesis, and the audio itself
        with the same text as captions (wandb 0.31 drops audio placed inside table cells)."""
        from lightning.pytorch.loggers import WandbLogger

        wandb_loggers = [lg for lg in self.loggers if isinstance(lg, WandbLogger)]
        if not rows or not wandb_loggers or self.global_rank != 0:
            return
        sr = self.model.encoder.sample_rate
        for lg in wandb_loggers:
            lg.log_table(
                key="val/examples",
                columns=["task", "id", "reference", "hypothesis"],
                data=[[task, uid, ref, hyp] for task, uid, ref, hyp, _ in rows],
                step=self.global_step,
            )
            rows = [row for row in rows if row[4] is not None]  # feature shards: no audio
            if not rows:
                continue
            lg.log_audio(
                key="val/audio",
                audios=[row[4] for row in rows],
                caption=[
                    f"[{task}] {uid} | ref: {ref} | hyp: {hyp}" for task, uid, ref, hyp, _ in rows
                ],
                sample_rate=[sr] * len(rows),
                step=self.global_step,
            )


def _skip_counts(batch: dict[str, Any]) -> dict[str, int]:
    counts = {"skipped": batch.get("num_skipped", 0)}
    counts.update(
        {f"skipped/{k.replace(' ', '_')}": n for k, n in batch.get("skipped", {}).items()}
    )
    return counts


def _local(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly distributed one (clip_grad_norm_ of DTensor gradients)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        # one state per device the saving rank saw; an allocation with another device count
        # restores the devices both have (a rank uses its own, the first ones)
        saved, visible = list(rng["cuda"]), torch.cuda.device_count()
        if len(saved) != visible:
            log.warning(
                "checkpoint holds CUDA random states for %d device(s), this process sees %d: "
                "restoring the first %d",
                len(saved),
                visible,
                min(len(saved), visible),
            )
        for device, state in enumerate(saved[:visible]):
            torch.cuda.set_rng_state(state, device)
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in rng["python"]))
