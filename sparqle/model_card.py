"""The model card written beside every export: a README.md in the Hugging Face format (a YAML
header the hub reads: languages, tasks, base models, datasets, scores; then what the model is,
what it was trained on and how to load it), so an exported adapter can go to a hub as it is.

What it reads: the export's config (the checkpoint's hparams), the run's composed config where the
checkpoint still sits in its run directory (`RUN/checkpoints/x.ckpt` -> `RUN/.hydra/config.yaml`:
the data it trained on), and optionally an eval.py `report.json` holding this checkpoint's scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from sparqle.prompts import TRANSCRIBE

CARD = "README.md"
_METRICS = {"wer": "WER", "cer": "CER", "bleu": "BLEU", "chrf": "chrF"}


def run_config(ckpt_path: str | Path) -> dict[str, Any] | None:
    """The data config of the run a checkpoint was saved in, its paths resolved as train.py
    resolved them (None: the checkpoint was moved out of its run)."""
    import os

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    os.environ.setdefault("SPARQLE_ROOT", str(Path(__file__).resolve().parents[1]))
    cfg = OmegaConf.load(path)
    data = {}
    for key in cfg.get("data") or {}:
        try:
            data[key] = OmegaConf.select(cfg, f"data.{key}")
            if OmegaConf.is_config(data[key]):
                data[key] = OmegaConf.to_container(data[key], resolve=True)
        except OmegaConfBaseException:  # what only the run could resolve is kept as written
            data[key] = OmegaConf.to_container(cfg.data, resolve=False)[key]
    return {"data": data}


def report_scores(report_path: str | Path, sha256: str) -> dict[str, Any]:
    """The entry of an eval.py report.json for the checkpoint with this fingerprint."""
    report = json.loads(Path(report_path).read_text())
    for entry in report.get("models", {}).values():
        if entry.get("checkpoint_sha256") == sha256:
            return {**entry, "data": report.get("config", {}).get("data", {})}
    raise ValueError(
        f"--report {report_path}: holds no scores of this checkpoint (no model with its sha256 "
        f"{sha256[:12]}...; evaluate the checkpoint that is exported)"
    )


def _hub_id(name: Any) -> bool:
    """A hub model id (`owner/name`), not a local path."""
    text = str(name)
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and " " not in text


def _sources(data: dict[str, Any], split: str) -> list[str]:
    """The manifests or shard indexes of one split of a data config."""
    found = []
    value = data.get(f"{split}_manifest")
    if value:
        found.append(str(value))
    part = data.get(split)
    parts = part.values() if isinstance(part, dict) and "urls" not in part else [part]
    for p in parts:
        if isinstance(p, dict) and p.get("urls"):
            urls = p["urls"]
            found += [str(u) for u in urls] if isinstance(urls, list) else [str(urls)]
    return found


def _size(source: str) -> str:
    """Hours and clips of a shard index (what the index says); blank for anything else."""
    if not source.endswith(".json") or not Path(source).is_file():
        return ""
    try:
        index = json.loads(Path(source).read_text())
        clips = sum(s["samples"] for s in index["shards"])
        return f"{index['hours']:.2f} h, {clips} clips"
    except (ValueError, KeyError, TypeError):
        return ""


def _languages(tasks: list[str]) -> list[str]:
    return sorted({t.removeprefix("translate_") for t in tasks if t.startswith("translate_")})


def _model_index(name: str, scores: dict[str, Any]) -> list[dict[str, Any]]:
    tested = _sources(scores.get("data", {}), "test") or _sources(scores.get("data", {}), "val")
    dataset = Path(tested[0]).stem if tested else "evaluation set"
    results = []
    for task, figures in scores.get("tasks", {}).items():
        metrics = [
            {"type": key, "name": label, "value": round(100 * v if key in ("wer", "cer") else v, 2)}
            for key, label in _METRICS.items()
            if isinstance(v := figures.get(key), int | float)
        ]
        if metrics:
            kind = "automatic-speech-recognition" if task == TRANSCRIBE else "translation"
            results.append(
                {
                    "task": {"type": kind, "name": task},
                    "dataset": {"name": dataset, "type": dataset},
                    "metrics": metrics,
                }
            )
    return [{"name": name, "results": results}] if results else []


def model_card(
    config: dict[str, Any],
    name: str,
    tensors: int,
    steps: int | None = None,
    run: dict[str, Any] | None = None,
    scores: dict[str, Any] | None = None,
) -> str:
    """The README.md of an export named `name`."""
    encoder, llm = config["encoder"]["name_or_path"], config["llm"]["name_or_path"]
    adapter = config["adapter"].get("_target_", "adapter").rsplit(".", 1)[-1]
    tasks = list(config.get("train_tasks") or [TRANSCRIBE])
    data = (run or {}).get("data", {})
    trained_on = _sources(data, "train")
    header: dict[str, Any] = {
        "library_name": "sparqle",
        "pipeline_tag": "automatic-speech-recognition",
        "tags": ["sparqle", "speech-llm", "q-former", *tasks],
    }
    if _languages(tasks):
        header["language"] = _languages(tasks)
    if hubs := [n for n in (encoder, llm) if _hub_id(n)]:
        header["base_model"] = hubs
    if trained_on:
        header["datasets"] = trained_on
    if scores and (index := _model_index(name, scores)):
        header["model-index"] = index

    stage = config["stage"]["name"]
    queries = config["adapter"].get("num_queries")
    clips = config.get("trained_clip_seconds")
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False, allow_unicode=True).strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"A SparQLe speech-LLM adapter: the frozen speech encoder `{encoder}` feeds a {adapter}"
        + (f" of {queries} queries" if queries else "")
        + f", whose outputs are projected into the frozen LLM `{llm}`. Stage `{stage}`,"
        f" trained for: {', '.join(tasks)} (`transcribe` writes the speech's own language).",
        "",
        f"This folder holds only the trained tensors (`adapter.safetensors`, {tensors} tensors) and"
        " `config.yaml`, which rebuilds the model; the encoder and the LLM load from their names.",
        "",
        "## Use",
        "",
        "```bash",
        "python -m sparqle.transcribe --ckpt THIS_FOLDER clip.wav",
        "python eval.py ckpt=THIS_FOLDER data=shards data.test.urls=test.json",
        "```",
        "",
        "```python",
        "from sparqle.export import load_model",
        'model = load_model("THIS_FOLDER")  # a SparQLeModule in eval mode',
        "```",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| stage | {stage} |",
        f"| optimizer steps | {steps if steps is not None else 'unknown'} |",
        f"| targets' text case | {config.get('text_case') or 'as written'} |",
    ]
    if clips:
        lines.append(f"| clip lengths trained on | {clips[0]:.1f}-{clips[1]:.1f} s |")
    optim = config["stage"].get("optim", {})
    if optim:
        lines.append(
            f"| learning rate | {optim.get('lr')} ({optim.get('schedule')}, "
            f"{optim.get('warmup_steps')} warm-up steps) |"
        )
    if trained_on:
        lines += ["", "Data (the run's training sources):", ""]
        lines += [f"- `{s}`" + (f": {_size(s)}" if _size(s) else "") for s in trained_on]
    else:
        lines += ["", "Data: not recorded (the checkpoint was exported away from its run)."]
    if scores:
        lines += [
            "",
            "## Evaluation",
            "",
            "| task | metric | value | utterances |",
            "|---|---|---|---|",
        ]
        for task, figures in scores.get("tasks", {}).items():
            for key, label in _METRICS.items():
                if isinstance(v := figures.get(key), int | float):
                    shown = f"{100 * v:.1f}" if key in ("wer", "cer") else f"{v:.1f}"
                    lines.append(f"| {task} | {label} | {shown} | {figures.get('utterances')} |")
        lines += ["", f"Decoding: `{json.dumps(scores.get('generation', {}))}`."]
        signatures = [
            f"- {task}: `{v}`"
            for task, figures in scores.get("tasks", {}).items()
            for k, v in figures.items()
            if "signature" in k
        ]
        if signatures:
            lines += ["", "sacrebleu signatures:", "", *signatures]
    return "\n".join(lines) + "\n"
