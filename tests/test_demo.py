"""A short `make demo`: real pretrained parts, real speech, and proof that learning happened."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

VOICES = "flite:slt,flite:rms,espeak-ng:en-us+m1"


def _run(*args, timeout=600):
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_short_demo_learns_to_transcribe(tmp_path):
    cache, data, logs = tmp_path / "cache", tmp_path / "data", tmp_path / "logs"
    _run(
        "-m",
        "data_prep.synth_speech",
        "--out",
        str(data),
        "--n",
        "48",
        "--seed",
        "5",
        "--voices",
        VOICES,
    )
    manifest, shards = data / "manifest.jsonl", data / "shards" / "train.json"
    _run(
        "-m",
        "data_prep.make_shards",
        "--manifest",
        str(manifest),
        "--out",
        str(shards.parent),
        "--split",
        "train",
    )
    _run("-m", "demo.text_llm", "--out", str(cache / "demo-text-llm"), "--steps", "150")
    common = [
        "experiment=demo",
        f"paths.cache_dir={cache}",
        f"data.train.main.urls={shards}",
        f"data.val.urls={shards}",
        "data.batch_size=8",
        "data.num_workers=0",
        "callbacks.progress_bar=null",
    ]
    _run(
        "train.py",
        *common,
        "stage=instruct",
        "trainer.max_steps=150",
        "trainer.log_every_n_steps=5",
        "val_every_n_steps=1000",
        "trainer.limit_val_batches=0",
        "stage.optim.lr=5e-4",
        # no stage 1 here, so the demo's 10x for a fresh cross-attention would apply (5e-3): the
        # thresholds below were measured at one rate
        "stage.optim.new_cross_attention_lr_scale=1",
        f"hydra.run.dir={logs / 'instruct'}",
    )
    rows = [
        r
        for r in csv.DictReader((logs / "instruct" / "csv" / "version_0" / "metrics.csv").open())
        if r.get("train/loss")
    ]
    first, last = float(rows[0]["train/loss"]), float(rows[-1]["train/loss"])
    _run(
        "eval.py",
        f"ckpt={logs / 'instruct' / 'checkpoints' / 'last.ckpt'}",
        "data=shards",
        f"data.val.urls={shards}",
        "tasks=[asr]",  # the older name of transcribe, still read
        f"out={tmp_path / 'report'}",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    wer = json.loads((tmp_path / "report" / "report.json").read_text())["models"]["last"]["tasks"][
        "transcribe"
    ]["wer"]
    # An adapter that learnt nothing leaves the LLM answering at random (WER ~100 %). After these
    # 150 steps (no stage 1) the loss fell to 0.46 of its start and the training-set WER to 59 %
    # in float32, to 0.50 and 59 % in bf16 autocast (the demo's setting on CPUs with bf16 maths;
    # measured 2026-11-23); with the demo's 5-s Whisper window, 0.59 and 43 % in bf16
    # (2026-11-30). The thresholds fail when learning stalls (ratio ~1), with room for CPU noise.
    print(f"short demo: loss {first:.2f} -> {last:.2f}, training-set WER {wer:.1%}")
    assert last < LOSS_RATIO * first, (first, last)
    assert wer < WER_THRESHOLD, wer

    # Long audio: the same clips joined with pauses, cut at the pauses and decoded piece by piece
    # (as eval.py and sparqle.transcribe do), must read as well as clip by clip: nothing dropped.
    out = _run(
        "bench/longform.py",
        "--ckpt",
        str(logs / "instruct" / "checkpoints" / "last.ckpt"),
        "--manifest",
        str(manifest),
        "--per-recording",
        "6",
        "--recordings",
        "2",
    ).stdout
    per_clip, long_form = (
        float(re.search(rf"{name} WER +([0-9.]+) %", out).group(1))
        for name in ("per-clip", "long-form")
    )
    print(out)
    assert abs(long_form - per_clip) <= 5.0, out


WER_THRESHOLD = 0.8
LOSS_RATIO = 0.7
