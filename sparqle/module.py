"""The LightningModule: builds the model for a stage, trains it, validates it, checkpoints it.

Stages:
- pretrain: encoder (frozen) + Q-Former trained with ITC + ITM + ITG; no LLM is loaded.
- instruct: encoder (frozen) + adapter (+ LoRA) trained with the frozen LLM's next-token loss.

Checkpoints hold the trainable parameters (and the adapter's few frozen ones), never the
frozen encoder and LLM, which are rebuilt from their `name_or_path` in the saved config.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import grad_norm
from transformers import AutoConfig, get_cosine_with_min_lr_schedule_with_warmup

from sparqle import metrics
from sparqle.models.adapters import QFormerAdapter
from sparqle.models.pretrain import SpeechTextPretrainer
from sparqle.models.sparqle import SparQLe

log = logging.getLogger(__name__)

STAGES = ("pretrain", "instruct")
_NO_DECAY = ("bias", "norm", "LayerNorm", "layernorm", "query_tokens", "temp", "layer_weights")


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the configured model; the message names the parameters."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


class SparQLeModule(L.LightningModule):
    def __init__(
        self,
        stage: dict[str, Any],
        encoder: dict[str, Any],
        adapter: dict[str, Any],
        llm: dict[str, Any],
        generation: dict[str, Any] | None = None,
        val_decode_batches: int = 2,
        max_nonfinite_steps: int = 10,
        train_tasks: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stage = stage["name"]
        if self.stage not in STAGES:
            raise ValueError(f"stage.name={self.stage!r}: expected one of {', '.join(STAGES)}")
        self.optim_cfg = dict(stage.get("optim", {}))
        self.generation = dict(generation or {})
        self.val_decode_batches = val_decode_batches
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.batch_stats: dict[str, float] = {}
        self._rng_to_restore: dict[str, Any] | None = None
        self.strict_loading = (
            False  # checkpoints hold trainable weights only; see on_load_checkpoint
        )

        enc = instantiate(encoder)
        if self.stage == "pretrain":
            llm_module = None
            llm_dim = AutoConfig.from_pretrained(llm["name_or_path"]).hidden_size
        else:
            llm_module = instantiate(llm)
            llm_dim = llm_module.hidden_size
        ada = instantiate(
            adapter, encoder_dim=enc.hidden_size, llm_dim=llm_dim, frame_rate=enc.frame_rate
        )
        self.model = SparQLe(enc, ada, llm_module)
        self.heads: SpeechTextPretrainer | None = None
        if self.stage == "pretrain":
            if not isinstance(ada, QFormerAdapter):
                raise ValueError(
                    f"stage=pretrain trains a Q-Former; adapter={type(ada).__name__} has none"
                )
            if adapter.get("bert") is None:
                raise ValueError(
                    "stage=pretrain needs adapter.bert: its tokenizer encodes the transcripts"
                )
            opts = dict(stage.get("pretrain", {}))
            self.heads = SpeechTextPretrainer(ada.qformer, adapter["bert"], **opts)
            self.heads.load_bert_lm_head(adapter["bert"])
            ada.proj.requires_grad_(False)  # the projection to the LLM is trained in stage 2
        elif isinstance(getattr(ada, "qformer", None), torch.nn.Module):
            for (
                p
            ) in ada.qformer.text_parameters():  # text positions are unused without stage-1 losses
                p.requires_grad_(False)
        if stage.get("init_from"):
            self.load_adapter_from(stage["init_from"])
        self._flop_params = {
            "encoder": sum(p.numel() for p in enc.parameters()),
            "adapter": sum(p.numel() for n, p in self.named_parameters() if p.requires_grad),
            "llm": 0
            if llm_module is None
            else sum(p.numel() for p in llm_module.parameters())
            - llm_module.model.get_input_embeddings().weight.numel(),
        }

    # ----------------------------------------------------------------- parameters and checkpoints
    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def checkpoint_names(self) -> list[str]:
        """Everything but the frozen pretrained encoder and LLM, which load from name_or_path.

        Frozen-but-new tensors (the stage-1 projection, Q-Former text parts in stage 2) are kept
        so a restored model is exactly the saved one.
        """
        trainable = set(self.trainable_names())
        pretrained = ("model.encoder.model.", "model.llm.model.")
        return [k for k in self.state_dict() if k in trainable or not k.startswith(pretrained)]

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
        own = self.state_dict()
        bad = [k for k, v in wanted.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise CheckpointMismatch(
                f"stage.init_from={path}: adapter weights do not fit this model ({len(bad)} tensors, "
                f"first: {bad[0]}); was it trained with another encoder or adapter config?"
            )
        self.load_state_dict(wanted, strict=False)
        log.info("initialised %d adapter tensors from %s", len(wanted), path)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = set(self.checkpoint_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["sparqle_trainable"] = self.trainable_names()
        np_state = np.random.get_state()
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng")
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
        if not rng:
            return
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in rng["python"]))

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = grad_norm(self, norm_type=2)
        if "grad_2.0_norm_total" in norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"])

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if any(k in name for k in _NO_DECAY) else decay).append(p)
        cfg = self.optim_cfg
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.get("weight_decay", 0.05)},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.get("lr", 1e-4),
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer,
            num_warmup_steps=min(cfg.get("warmup_steps", 0), total),
            num_training_steps=total,
            min_lr_rate=cfg.get("min_lr_ratio", 0.1),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ----------------------------------------------------------------- steps
    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.stage == "pretrain":
            enc = self.model.encode(batch["audio"], batch["audio_lens"])
            return self.heads(self.model.adapter.qformer, enc.features, enc.mask, batch["text"])
        loss, inputs = self.model(
            batch["audio"], batch["audio_lens"], batch["instruction"], batch["target"]
        )
        speech_positions, llm_tokens = self.model.count_positions(inputs)
        return {"loss": loss, "llm_tokens": llm_tokens, "adapter_positions": speech_positions}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        bs = len(batch["id"])
        skips = {"skipped": batch["num_skipped"]}
        skips.update(
            {f"skipped/{k.replace(' ', '_')}": n for k, n in batch.get("skipped", {}).items()}
        )
        for name, n in skips.items():
            self.log(f"train/{name}", float(n), reduce_fx="sum", on_step=False, on_epoch=True)
        if bs == 0:
            return None
        out = self._losses(batch)
        if self._skip_nonfinite(out["loss"]):
            return None
        for k in ("loss", "itc", "itm", "itg"):
            if k in out:
                self.log(f"train/{k}", out[k], prog_bar=k == "loss", batch_size=bs)
        if self.heads is not None:
            self.log("train/temperature", self.heads.temp.detach(), batch_size=bs)
        self.batch_stats = self._batch_stats(batch, out)
        return out["loss"]

    def _skip_nonfinite(self, loss: torch.Tensor) -> bool:
        """Skip the step (on every rank) when any rank's loss is NaN/Inf; stop after K in a row."""
        bad = self.trainer.strategy.reduce_boolean_decision(
            not bool(torch.isfinite(loss.detach())), all=False
        )
        if not bad:
            self.nonfinite_in_a_row = 0
            return False
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_total), reduce_fx="max")
        log.warning("non-finite loss at step %d: step skipped", self.global_step)
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.global_step}: "
                "stopping (lower stage.optim.lr, check the data, or use bf16 instead of fp16)"
            )
        return True

    def _batch_stats(self, batch: dict[str, Any], out: dict[str, torch.Tensor]) -> dict[str, float]:
        """Work done by this step, for throughput and MFU (FLOPs: 2N per token forward for every
        module, plus 2N backward through the frozen LLM's activations and 4N more for the
        trainable adapter's weight gradients)."""
        sr = self.model.encoder.sample_rate
        audio_seconds = float(batch["audio_lens"].sum()) / sr
        frames = audio_seconds * self.model.encoder.frame_rate
        n = self._flop_params
        llm_tokens = float(out.get("llm_tokens", 0))
        qformer = getattr(self.model.adapter, "qformer", None)
        default_positions = (
            len(batch["id"]) * qformer.num_queries if qformer is not None else frames
        )
        adapter_positions = float(out.get("adapter_positions", default_positions))
        flops = (
            2 * n["encoder"] * frames
            + 6 * n["adapter"] * adapter_positions
            + 4 * n["llm"] * llm_tokens
        )
        return {
            "audio_seconds": audio_seconds,
            "samples": len(batch["id"]),
            "llm_tokens": llm_tokens,
            "flops": flops,
        }

    def on_validation_start(self) -> None:
        # Validation draws random numbers too (ITM negatives); keep them out of the training stream
        # so a run resumed from a checkpoint replays training exactly.
        self._rng_before_val = torch.get_rng_state()

    def on_validation_end(self) -> None:
        torch.set_rng_state(self._rng_before_val)

    def on_validation_epoch_start(self) -> None:
        self._val = defaultdict(list)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        bs = len(batch["id"])
        if bs == 0:
            return
        out = self._losses(batch)
        for k in ("loss", "itc", "itm", "itg"):
            if k in out:
                self.log(f"val/{k}", out[k], prog_bar=k == "loss", batch_size=bs, sync_dist=True)
        if self.stage == "pretrain":
            hits = (out["sim_s2t"].argmax(1) == torch.arange(bs, device=self.device)).float().mean()
            self.log("val/r_at_1_in_batch", hits, batch_size=bs, sync_dist=True)
        elif batch_idx < self.val_decode_batches:
            hyps = self.model.generate(
                batch["audio"], batch["audio_lens"], batch["instruction"], **self.generation
            )
            for i, hyp in enumerate(hyps):
                key = (
                    batch["task"][i]
                    if batch["task"][i] == "transcribe"
                    else f"translate_{batch['lang'][i]}"
                )
                audio = batch["audio"][i, : batch["audio_lens"][i]].cpu().numpy()
                self._val[key].append((batch["id"][i], batch["target"][i], hyp, audio))

    def on_validation_epoch_end(self) -> None:
        table = []
        for key, rows in getattr(self, "_val", {}).items():
            refs, hyps = [r[1] for r in rows], [r[2] for r in rows]
            if key == "transcribe":
                self.log("val/wer", metrics.word_error_rate(refs, hyps)["wer"])
            else:
                lang = key.split("_", 1)[1]
                self.log(f"val/bleu_{lang}", metrics.translation_scores(refs, hyps, lang)["bleu"])
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
            lg.log_audio(
                key="val/audio",
                audios=[row[4] for row in rows],
                caption=[
                    f"[{task}] {uid} | ref: {ref} | hyp: {hyp}" for task, uid, ref, hyp, _ in rows
                ],
                sample_rate=[sr] * len(rows),
                step=self.global_step,
            )
