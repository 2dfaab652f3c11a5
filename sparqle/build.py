"""The model a stage trains, as a plain function of its config groups (no Trainer needed), and
the one way a composed Hydra config becomes the LightningModule's arguments.

    stage 1 (pretrain): encoder (frozen) -> Q-Former -> BLIP-2's heads; no LLM is loaded, only
                        its width is read (the Q-Former's projection is built, not trained)
    stage 2 (instruct): encoder (frozen) -> adapter -> LLM (frozen, optional LoRA)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig

from sparqle.config_check import STAGES
from sparqle.models.adapters import QFormerAdapter
from sparqle.models.encoder import PrecomputedFeatures
from sparqle.models.loading import describe, quiet_loading
from sparqle.models.pretrain import SpeechTextPretrainer
from sparqle.models.sparqle import SparQLe

log = logging.getLogger(__name__)


def build_model(
    stage: dict[str, Any],
    encoder: dict[str, Any],
    adapter: dict[str, Any],
    llm: dict[str, Any],
    features: dict[str, Any] | None = None,
    load_device: str | None = None,
) -> SparQLe:
    """The composed model for `stage["name"]`, its trainable parts marked. `features`: the
    index record of feature shards (the encoder is then neither loaded nor run); `load_device`:
    where the frozen encoder and LLM load straight to (a rank's GPU)."""
    name = stage["name"]
    if name not in STAGES:
        raise ValueError(f"stage.name={name!r}: expected one of {', '.join(STAGES)}")
    with quiet_loading():  # one line per part below instead of transformers' reports
        on = {"device": load_device} if load_device else {}
        enc = PrecomputedFeatures(features) if features else instantiate(encoder, **on)
        if name == "pretrain":
            llm_module = None
            llm_dim = AutoConfig.from_pretrained(llm["name_or_path"]).hidden_size
        else:
            llm_module = instantiate(llm, **on)
            llm_dim = llm_module.hidden_size
        ada = instantiate(
            adapter, encoder_dim=enc.hidden_size, llm_dim=llm_dim, frame_rate=enc.frame_rate
        )
        heads = None
        if name == "pretrain":
            if not isinstance(ada, QFormerAdapter):
                raise ValueError(
                    f"stage=pretrain trains a Q-Former; adapter={type(ada).__name__} has none"
                )
            if adapter.get("bert") is None:
                raise ValueError(
                    "stage=pretrain needs adapter.bert: its tokenizer encodes the transcripts"
                )
            heads = SpeechTextPretrainer(ada.qformer, adapter["bert"], **stage.get("pretrain", {}))
            heads.load_bert_lm_head(adapter["bert"])
            ada.proj.requires_grad_(False)  # the projection to the LLM is trained in stage 2
        elif isinstance(getattr(ada, "qformer", None), torch.nn.Module):
            # text positions are unused without the stage-1 losses
            for p in ada.qformer.text_parameters():
                p.requires_grad_(False)
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
    return SparQLe(enc, ada, llm_module, heads)


def training_tasks(data: DictConfig) -> list[str]:
    """Task specs the configured data trains on (to tell zero-shot directions apart at eval)."""
    default = data.get("tasks") or OmegaConf.create({})
    sources = (data.get("train") or {}).values()  # shards: named sources, each may set its own
    weights = [OmegaConf.to_container(src.get("tasks") or default) for src in sources]
    if not weights:
        weights.append(OmegaConf.to_container(default))
    return sorted({k for w in weights for k, v in w.items() if float(v) > 0} or {"transcribe"})


def module_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The parts of the composed config the LightningModule is built (and rebuilt) from."""
    return {
        "stage": OmegaConf.to_container(cfg.stage, resolve=True),
        "encoder": OmegaConf.to_container(cfg.encoder, resolve=True),
        "adapter": OmegaConf.to_container(cfg.adapter, resolve=True),
        "llm": OmegaConf.to_container(cfg.llm, resolve=True),
        "generation": OmegaConf.to_container(cfg.generation, resolve=True),
        "val_decode_clips": cfg.val_decode_clips,
        "max_nonfinite_steps": cfg.max_nonfinite_steps,
        "train_tasks": training_tasks(cfg.data),
        "text_case": cfg.data.get("text_case"),
    }
