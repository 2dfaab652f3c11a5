"""Validation figures that are the same on any number of ranks and however the set is batched.

Each figure is a (sum, weight) pair over the whole validation set, reduced over ranks at the
epoch's end and averaged over what it is a mean of: clips (ITC, ITM, R@1 within a batch, query
spread), ITG's text tokens, stage 2's LLM target tokens. Stage 1's loss is the sum of its parts.
Hypotheses of every rank are gathered and scored once (WER, BLEU) with the task's metric.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch

from sparqle import metrics
from sparqle.distributed import all_reduce_sum, gather_objects
from sparqle.prompts import task_spec

log = logging.getLogger(__name__)


class ValidationTally:
    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, list[tuple]] = defaultdict(list)  # spec -> (id, ref, hyp, audio)
        self.decoded = 0  # clips decoded so far, over every rank

    def add(self, name: str, total: torch.Tensor, weight: float) -> None:
        """`total`: the figure summed over what it averages (`weight` of them). A zero weight adds
        nothing (whatever `total` is: a stand-in's NaN included)."""
        total = total.detach().float() if weight else torch.zeros_like(total, dtype=torch.float)
        self.sums[name] = self.sums.get(name, 0) + torch.stack(
            [total, total.new_tensor(float(weight))]
        )

    def add_stage1(self, out: dict[str, Any], clips: int) -> None:
        for k in ("itc", "itm", "query_spread", "query_spread_hinge"):
            self.add(k, out[k] * clips, clips)
        tokens = out["itg_tokens"] if clips else 0
        self.add("itg", out["itg"] * tokens, tokens)
        hits = (out["sim_s2t"].argmax(1) == out["itc_targets"]).float().sum()
        self.add("r_at_1_in_batch", hits, clips)

    def add_hypotheses(self, batch, hyps: list[str]) -> None:
        for i, hyp in enumerate(hyps):
            audio = (  # none to play back from feature shards
                batch.audio[i, : batch.audio_lens[i]].cpu().numpy()
                if batch.audio is not None
                else None
            )
            spec = task_spec(batch.task[i], batch.lang[i])
            self.rows[spec].append((batch.id[i], batch.target[i], hyp, audio))

    def reduce(self, spread_weight: float | None = None) -> dict[str, torch.Tensor | float]:
        """Every figure over all ranks (collectives: every rank calls it, in the same order).
        `spread_weight`: stage 1's query-spread hinge weight (its loss adds weight x hinge)."""
        out: dict[str, torch.Tensor | float] = {}
        for name in sorted(self.sums):  # the same names, in the same order, on every rank
            total, weight = all_reduce_sum(self.sums[name]).unbind()
            out[name] = total / weight.clamp(min=1)
        if "itc" in out:  # stage 1's loss from its parts, each averaged as above
            out["loss"] = out["itc"] + out["itm"] + out["itg"]
            if spread_weight:
                out["loss"] = out["loss"] + spread_weight * out["query_spread_hinge"]
            out.pop("query_spread_hinge")
        merged: dict[str, list] = defaultdict(list)
        for part in gather_objects({k: [r[:3] for r in rows] for k, rows in self.rows.items()}):
            for spec, rows in part.items():
                merged[spec] += rows
        for spec in sorted(merged):
            refs, hyps = [r[1] for r in merged[spec]], [r[2] for r in merged[spec]]
            name, value = metrics.headline(spec, refs, hyps)
            out[name] = value
        return out

    def examples(self, per_task: int = 8) -> list[tuple]:
        """(spec, id, reference, hypothesis, audio) of this rank's first clips of each task, the
        first three also in the log."""
        table = []
        for spec, rows in self.rows.items():
            for uid, ref, hyp, _ in rows[:3]:
                log.info("[%s] %s | ref: %s | hyp: %s", spec, uid, ref, hyp)
            table += [(spec, *row) for row in rows[:per_task]]
        return table


def log_examples(loggers: list, rows: list[tuple], sample_rate: int, step: int) -> None:
    """Validation examples on wandb: a table of reference vs hypothesis, and the audio itself
    with the same text as captions (wandb 0.31 drops audio placed inside table cells)."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in (lg for lg in loggers if isinstance(lg, WandbLogger)):
        lg.log_table(
            key="val/examples",
            columns=["task", "id", "reference", "hypothesis"],
            data=[[task, uid, ref, hyp] for task, uid, ref, hyp, _ in rows],
            step=step,
        )
        audible = [row for row in rows if row[4] is not None]  # feature shards: no audio
        if audible:
            lg.log_audio(
                key="val/audio",
                audios=[row[4] for row in audible],
                caption=[
                    f"[{task}] {uid} | ref: {ref} | hyp: {hyp}"
                    for task, uid, ref, hyp, _ in audible
                ],
                sample_rate=[sample_rate] * len(audible),
                step=step,
            )
