"""Hypotheses do not depend on how they were batched or where they were decoded: greedy float32
decoding of the same 24 clips by a briefly trained tiny model (its LLM unfrozen, so its text
follows the speech) gives the same text for eval batches of 1, 7 and 32, on 1 and 2 ranks, and
from training-time validation, `sparqle.transcribe` and an exported adapter. bf16 is not exact
bit for bit; the bound it holds is stated below."""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys

import lightning as L
import pytest
from hydra import compose, initialize_config_dir

from tests.helpers import ROOT, tiny_overrides, torchrun

MAX_NEW_TOKENS = 16  # the tiny preset's generation.max_new_tokens, given to every path alike


@pytest.fixture(scope="module")
def golden(tiny_dir, synth_data, tmp_path_factory):
    """A tiny stage-2 model fitted to the training clips in ~15 s (its hypotheses differ from
    clip to clip), and its export."""
    run = tmp_path_factory.mktemp("golden")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *tiny_overrides(tiny_dir, synth_data, "stage=instruct"),
            "llm.frozen=false",
            "stage.optim.lr=1e-2",
            "data.batch_size=6",
            "trainer.max_steps=200",
            "val_every_n_steps=1000",
            f"hydra.run.dir={run}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    from sparqle.export import export

    export(run / "checkpoints/last.ckpt", run / "export")
    return run


def _eval(ckpt, manifest, out, *extra):
    """eval.py's own function, in this process."""
    sys.path.insert(0, str(ROOT))
    evaluate = importlib.import_module("eval").evaluate
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"ckpt={ckpt}",
                f"data.test_manifest={manifest}",
                "data.num_workers=0",
                "vad=false",
                f"out={out}",
                f"paths.output_dir={out}",
                *extra,
            ],
        )
    evaluate(cfg)
    return _tsv(next(out.glob("*.tsv")))


def _tsv(path):
    return {r["id"]: r["hypothesis"] for r in csv.DictReader(path.open(), delimiter="\t")}


@pytest.mark.slow
def test_the_same_text_however_and_wherever_it_is_decoded(golden, synth_data, tmp_path, capsys):
    clips = synth_data / "manifest.jsonl"  # 24 clips: batches of 7 leave a short last one
    ckpt = golden / "checkpoints/last.ckpt"
    one = _eval(ckpt, clips, tmp_path / "b1", "batch_size=1")
    assert len(one) == 24 and len(set(one.values())) >= 6  # the text follows the speech
    for b in (7, 32):
        assert _eval(ckpt, clips, tmp_path / f"b{b}", f"batch_size={b}") == one, f"batch {b}"
    assert _eval(golden / "export", clips, tmp_path / "export", "batch_size=7") == one

    # two ranks, each its share of every batch of 7
    done = subprocess.run(
        [
            *torchrun(2),
            str(ROOT / "eval.py"),
            f"ckpt={ckpt}",
            f"data.test_manifest={clips}",
            "data.num_workers=0",
            "vad=false",
            "batch_size=7",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            f"out={tmp_path / 'ranks'}",
            f"hydra.run.dir={tmp_path / 'ranks'}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _tsv(tmp_path / "ranks" / "last.tsv") == one
    scores = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("b7", "ranks")]
    assert scores[0]["models"]["last"]["tasks"] == scores[1]["models"]["last"]["tasks"]

    # sparqle.transcribe on the audio files
    from sparqle.data.manifest import read_manifest
    from sparqle.transcribe import main as transcribe

    utts = read_manifest(clips)
    capsys.readouterr()
    code = transcribe(
        ["--ckpt", str(ckpt), "--no-vad", "--batch-size", "5"]
        + ["--max-new-tokens", str(MAX_NEW_TOKENS)]
        + [str(u.audio) for u in utts]
    )
    printed = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    assert code == 0 and {u.id: printed[str(u.audio)] for u in utts} == one

    # training-time validation of the same clips, batches of 4
    from sparqle.data.manifest_datamodule import ManifestDataModule
    from sparqle.export import load_model

    module = load_model(ckpt)
    module.val_decode_clips = len(one)  # the tiny preset decodes 8 a validation
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    data = ManifestDataModule(val_manifest=str(clips), val_batch_size=4, num_workers=0)
    trainer.validate(module, datamodule=data, verbose=False)
    validated = {uid: hyp for rows in module.tally.rows.values() for uid, _, hyp, _ in rows}
    assert validated == one


@pytest.mark.slow
def test_bf16_batching_stays_within_its_stated_bound(golden, synth_data, tmp_path):
    """bf16 rounds the logits to ~3 significant digits, so a near-tie may fall either way with
    another batch shape. Measured 2026-12-01 (Intel Xeon, AMX-BF16): batches of 1 and 32 agree on
    all 24 clips, and bf16 differs from float32 on 3. The bound held: at most 3 of the 24
    hypotheses differ between bf16 batches of 1 and 32."""
    clips, ckpt = synth_data / "manifest.jsonl", golden / "checkpoints/last.ckpt"
    one = _eval(ckpt, clips, tmp_path / "b1", "batch_size=1", "precision=bf16")
    many = _eval(ckpt, clips, tmp_path / "b32", "batch_size=32", "precision=bf16")
    assert len(one) == 24 and sum(one[k] != many[k] for k in one) <= 3
