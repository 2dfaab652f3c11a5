"""eval.py's work: decoding an evaluation set on any number of ranks, scoring, the report files.

batches -> sparqle.inference.decode -> rows (one per utterance and task) -> per-task metrics
(sparqle.metrics.score_task) -> out/{NAME}.tsv, report.json, report.md
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.progress import Progress

from sparqle import metrics
from sparqle.inference import decode
from sparqle.prompts import TRANSCRIBE, parse_task, task_spec


@dataclass
class Row:
    id: str
    task: str  # "transcribe" or "translate_LANG"
    lang: str
    reference: str
    hypothesis: str
    seconds: float
    errors: int | None = None  # word edits, ASR only
    looping: bool = False
    refusal: bool = False
    no_speech: bool = False  # the VAD found none: scored with an empty hypothesis


def task_key(spec: str) -> str:
    """A task as eval.py's `tasks` give it ('asr' is accepted for 'transcribe') -> its one name."""
    return task_spec(*parse_task(spec))


@torch.no_grad()
def generate_rows(
    module,
    batches: Iterable,
    spec: str,
    generation: dict[str, Any],
    progress: Progress | None = None,
    cap: dict[str, float] | None = None,
    max_piece_seconds: float | None = None,
    precision: str = "auto",
) -> tuple[list[Row], int]:
    """A row per utterance of `batches`, decoded by `sparqle.inference.decode` (a whole batch per
    generate call; `max_piece_seconds` turns the VAD on: long clips decoded piece by piece and
    the text joined, a clip with no speech an empty hypothesis, flagged)."""
    key = task_key(spec)
    _, lang = parse_task(spec)
    sr = module.model.encoder.sample_rate
    rows, skipped = [], 0
    bar = progress.add_task(f"{key}", total=None) if progress else None
    for batch in batches:
        skipped += int(batch.num_skipped)
        if not len(batch):
            continue
        decoded = decode(
            module.model,
            batch.clips(),
            batch.instruction,
            generation,
            max_piece_seconds=max_piece_seconds,
            cap=cap,
            precision=precision,
        )
        seconds = (batch.audio_lens.float() / sr).tolist()
        for i, d in enumerate(decoded):
            row = Row(
                id=batch.id[i],
                task=key,
                lang=lang or batch.lang[i],
                reference=batch.target[i],
                hypothesis=d.text,
                seconds=round(seconds[i], 3),
                looping=metrics.is_looping(d.text),
                refusal=metrics.is_refusal(d.text),
                no_speech=d.no_speech,
            )
            if key == TRANSCRIBE:
                row.errors = metrics.utterance_errors(row.reference, d.text, row.lang)
            rows.append(row)
        if progress:
            progress.advance(bar, len(decoded))
    return rows, skipped


class BatchGenerator(L.LightningModule):
    """Generation as Lightning's predict step, so `eval.py trainer.devices=N` runs on N devices
    (each rank its share of every batch, from the DataModule's eval loader) as training does."""

    def __init__(
        self,
        module,
        loader: Callable[[], Iterable[dict]],
        spec: str,
        generation: dict[str, Any],
        cap: dict[str, float] | None = None,
        precision: str = "auto",
        max_piece_seconds: float | None = None,
    ) -> None:
        super().__init__()
        self.module, self.loader = module, loader
        self.spec, self.generation, self.cap, self.precision = spec, generation, cap, precision
        self.max_piece_seconds = max_piece_seconds
        # every rank loads the same files: nothing to broadcast from rank 0 before predicting
        from torch.nn.parallel import DistributedDataParallel

        names = [n for n, _ in self.named_parameters()] + [n for n, _ in self.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, names)

    def predict_dataloader(self) -> Iterable[dict]:
        """Built once the ranks are up, so the loader knows this rank's share."""
        return self.loader()

    def predict_step(self, batch, batch_idx: int) -> tuple[list[Row], int]:
        return generate_rows(
            self.module,
            [batch],
            self.spec,
            self.generation,
            cap=self.cap,
            max_piece_seconds=self.max_piece_seconds,
            precision=self.precision,
        )


def merge_rank_rows(per_rank: list[list[tuple[list[Row], int]]]) -> tuple[list[Row], int]:
    """Each rank's (rows, skipped) per batch -> one list in the one-process order: rank r held
    items r, r + world, ... of every batch (RankShareBatches, the shard loaders' b[r::world])."""
    rows, skipped = [], 0
    for k in range(max(map(len, per_rank), default=0)):
        parts = [r[k][0] if k < len(r) else [] for r in per_rank]
        skipped += sum(r[k][1] for r in per_rank if k < len(r))
        for j in range(max(map(len, parts), default=0)):
            rows += [p[j] for p in parts if j < len(p)]
    return rows, skipped


def score(rows: list[Row], key: str, skipped: int, train_tasks: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "utterances": len(rows),
        "skipped": skipped,
        "looping": sum(r.looping for r in rows),
        "refusals": sum(r.refusal for r in rows),
        "no_speech": sum(r.no_speech for r in rows),
    }
    if not rows:
        return out
    out |= metrics.score_task(
        key, [r.reference for r in rows], [r.hypothesis for r in rows], rows[0].lang
    )
    if key != TRANSCRIBE:
        out["zero_shot"] = key not in {task_key(t) for t in (train_tasks or [])}
    return out


def write_rows(path: Path, rows: list[Row]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(Row.__dataclass_fields__), delimiter="\t")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})


def markdown(report: dict[str, Any]) -> str:
    """The comparison table people paste into papers: one row per checkpoint."""
    models = report["models"]
    tasks = sorted({t for m in models.values() for t in m["tasks"]})
    supervised = [
        t for t in tasks if not any(m["tasks"].get(t, {}).get("zero_shot") for m in models.values())
    ]
    zero_shot = [t for t in tasks if t not in supervised]

    def table(task_list: list[str]) -> list[str]:
        head, cols = ["model"], []
        for t in task_list:
            names = ["WER", "CER"] if t == TRANSCRIBE else ["BLEU", "chrF"]
            head += [f"{t} {n}" for n in names]
            cols += [(t, n) for n in names]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, m in models.items():
            cells = [name]
            for t, n in cols:
                v = (
                    m["tasks"]
                    .get(t, {})
                    .get({"WER": "wer", "CER": "cer", "BLEU": "bleu", "chrF": "chrf"}[n])
                )
                cells.append(
                    "–" if v is None else f"{100 * v:.1f}" if n in ("WER", "CER") else f"{v:.1f}"
                )
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    out = ["# Evaluation", ""]
    if supervised:
        out += ["## Trained directions", "", *table(supervised), ""]
    if zero_shot:
        out += [
            "## Zero-shot directions (no training data for these targets)",
            "",
            *table(zero_shot),
            "",
        ]
    out += [
        "WER/CER in %, after Whisper's English normaliser (basic normaliser for other languages).",
        "",
    ]
    sigs = {
        m["tasks"][t].get("bleu_signature")
        for m in models.values()
        for t in m["tasks"]
        if t != TRANSCRIBE
    }
    for s in sorted(x for x in sigs if x):
        out.append(f"BLEU signature: `{s}`  ")
    for name, m in models.items():
        degenerate = {
            t: (v["looping"], v["refusals"], v.get("no_speech", 0), v["skipped"])
            for t, v in m["tasks"].items()
        }
        out.append(
            f"`{name}` ({m['checkpoint_sha256']}): looping / refusals / no speech / skipped per "
            f"task: {degenerate}  "
        )
    return "\n".join(out) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str))
    (out / "report.md").write_text(markdown(report))
