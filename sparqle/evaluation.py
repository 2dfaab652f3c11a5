"""Batched generation over an evaluation set, scoring, and the report files.

rows (one per utterance and task) -> per-task metrics -> out/{NAME}.tsv, report.json, report.md
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.progress import Progress
from torch.nn.utils.rnn import pad_sequence

from sparqle import metrics
from sparqle.data.tasks import parse_task
from sparqle.models.llm import check_generation


@dataclass
class Row:
    id: str
    task: str  # "asr" or "translate_LANG"
    lang: str
    reference: str
    hypothesis: str
    seconds: float
    errors: int | None = None  # word edits, ASR only
    looping: bool = False
    refusal: bool = False
    no_speech: bool = False  # the VAD found none: scored with an empty hypothesis


def task_key(spec: str) -> str:
    task, lang = parse_task(spec)
    return "asr" if task == "transcribe" else f"translate_{lang}"


def load_model(path: str | Path, device: str | torch.device = "cpu", generates: bool = True):
    """A SparQLeModule from a trainable-only export folder or a full training checkpoint;
    `generates=False` also accepts a stage-1 one (no LLM: for looking at its Q-Former)."""
    from sparqle.export import WEIGHTS, load_exported
    from sparqle.module import SparQLeModule

    path = Path(path)
    if path.is_dir() and (path / WEIGHTS).is_file():
        module = load_exported(path)
    elif path.is_file():
        hparams = torch.load(path, map_location="cpu", weights_only=True).get(
            "hyper_parameters", {}
        )
        stage = {**hparams.get("stage", {}), "init_from": None}  # the weights are in the checkpoint
        with warnings.catch_warnings():  # the frozen encoder/LLM are absent from it by design
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict")
            module = SparQLeModule.load_from_checkpoint(
                path, map_location="cpu", weights_only=True, stage=stage
            )
    else:
        raise FileNotFoundError(f"ckpt={path}: neither a checkpoint file nor an export folder")
    if generates and module.stage != "instruct":
        raise ValueError(
            f"ckpt={path}: a stage-{module.stage} model cannot generate text; evaluate a stage-instruct one"
        )
    return module.to(device).eval()


def fingerprint(path: str | Path) -> str:
    from sparqle.export import WEIGHTS

    path = Path(path)
    target = path / WEIGHTS if path.is_dir() else path
    digest = hashlib.sha256()
    with target.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def inference_bf16(device: torch.device | str, precision: str = "auto") -> bool:
    """Whether generation runs under bf16 autocast: on a GPU by default (the adapter's fp32
    weights then run at the frozen LLM's speed), on a CPU only when asked."""
    if precision not in ("auto", "bf16", "32"):
        raise ValueError(f"precision={precision}: expected auto, bf16 or 32")
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def inference_autocast(device: torch.device | str, precision: str = "auto") -> torch.autocast:
    device = torch.device(device)
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=inference_bf16(device, precision)
    )


def length_cap(seconds: float, base: int = 16, per_second: float = 8) -> int:
    """A max_new_tokens bound from the audio duration (speech is ~3 words/s), where the
    decoding settings give none."""
    return int(math.ceil(base + per_second * seconds))


def plan_pieces(
    audio: torch.Tensor, audio_lens: torch.Tensor, sample_rate: int, max_seconds: float | None
) -> list[list[tuple[int, int]]]:
    """Per clip, the spans given to the model: the whole clip, or (with the VAD, `max_seconds`
    set) nothing for a clip without speech and pieces cut at pauses for one longer than that."""
    lens = audio_lens.tolist()
    if max_seconds is None:
        return [[(0, n)] for n in lens]
    from sparqle.data.vad import speech_pieces

    host = audio.float().cpu().numpy()
    return [speech_pieces(host[i, :n], sample_rate, max_seconds) for i, n in enumerate(lens)]


@torch.no_grad()
def generate_rows(
    module,
    batches: Iterable[dict],
    spec: str,
    generation: dict[str, Any],
    progress: Progress | None = None,
    cap: dict[str, float] | None = None,
    max_piece_seconds: float | None = None,
) -> tuple[list[Row], int]:
    """Hypotheses for every utterance of `batches` (a whole batch per generate call).

    `generation` goes whole to `generate` (checked: unknown keys are an error); without
    max_new_tokens in it, each batch is capped by `length_cap` of its longest piece.
    `max_piece_seconds` turns the VAD on (`plan_pieces`): long clips are decoded piece by
    piece and the text joined; a clip with no speech gets an empty hypothesis, flagged."""
    key = task_key(spec)
    _, lang = parse_task(spec)
    gen = check_generation(generation)
    fixed = gen.pop("max_new_tokens", None)
    sr = module.model.encoder.sample_rate
    rows, skipped = [], 0
    bar = progress.add_task(f"{key}", total=None) if progress else None
    for batch in batches:
        skipped += int(batch["num_skipped"])
        if not batch["id"]:
            continue
        seconds = (batch["audio_lens"].float() / sr).tolist()
        plans = plan_pieces(batch["audio"], batch["audio_lens"], sr, max_piece_seconds)
        owner = [i for i, plan in enumerate(plans) for _ in plan]
        texts: list[list[str]] = [[] for _ in plans]
        if owner:
            spans = [span for plan in plans for span in plan]
            lens = torch.tensor([b - a for a, b in spans])
            audio = pad_sequence(
                [batch["audio"][i, a:b] for i, (a, b) in zip(owner, spans, strict=True)],
                batch_first=True,
            )
            hyps = module.model.generate(
                audio.to(module.device),
                lens.to(module.device),
                [batch["instruction"][i] for i in owner],
                max_new_tokens=fixed or length_cap(float(lens.max()) / sr, **(cap or {})),
                **gen,
            )
            for i, hyp in zip(owner, hyps, strict=True):
                texts[i].append(hyp.strip())
        for i, plan in enumerate(plans):
            hyp = " ".join(t for t in texts[i] if t)
            row = Row(
                id=batch["id"][i],
                task=key,
                lang=lang or batch["lang"][i],
                reference=batch["target"][i],
                hypothesis=hyp,
                seconds=round(seconds[i], 3),
                looping=metrics.is_looping(hyp),
                refusal=metrics.is_refusal(hyp),
                no_speech=not plan,
            )
            if key == "asr":
                row.errors = metrics.utterance_errors(row.reference, hyp, row.lang)
            rows.append(row)
        if progress:
            progress.advance(bar, len(plans))
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

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> tuple[list[Row], int]:
        with inference_autocast(self.device, self.precision):
            return generate_rows(
                self.module,
                [batch],
                self.spec,
                self.generation,
                cap=self.cap,
                max_piece_seconds=self.max_piece_seconds,
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
    refs, hyps = [r.reference for r in rows], [r.hypothesis for r in rows]
    out: dict[str, Any] = {
        "utterances": len(rows),
        "skipped": skipped,
        "looping": sum(r.looping for r in rows),
        "refusals": sum(r.refusal for r in rows),
        "no_speech": sum(r.no_speech for r in rows),
    }
    if not rows:
        return out
    if key == "asr":
        out |= metrics.word_error_rate(refs, hyps, rows[0].lang)
    else:
        lang = key.split("_", 1)[1]
        out |= metrics.translation_scores(refs, hyps, lang)
        trained = {task_key(t) for t in (train_tasks or [])}
        out["zero_shot"] = key not in trained
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
            names = ["WER", "CER"] if t == "asr" else ["BLEU", "chrF"]
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
        if t != "asr"
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
