"""The benchmarks run and print what they claim to measure."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(*args):
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_train_step_bench(tiny_dir):
    out = _run(
        "bench/train_step.py",
        "experiment=tiny",
        f"paths.cache_dir={tiny_dir}",
        "--batch",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
    )
    result = json.loads(out[out.index("{") :])
    assert (
        result["step_time_s"] > 0
        and result["audio_seconds_per_s"] > 0
        and result["llm_tokens_per_s"] > 0
    )
    assert 0 < result["mfu"] < 1.5


def test_data_throughput_bench(synth_data, tmp_path):
    from data_prep.make_shards import make_shards

    make_shards(synth_data / "manifest.jsonl", tmp_path, "train", shard_size_mb=0.2)
    out = _run(
        "bench/data_throughput.py",
        "--shards",
        str(tmp_path / "train.json"),
        "--repeats",
        "1",
        "--profile",
    )
    for line in (
        "FLAC decode (libsndfile)",
        "tar stream + sample grouping",
        "bare FLAC decode",
        "full shard pipeline",
        "ratio",
        "padding, these shards",
        "padding, LibriSpeech-like",
    ):
        assert line in out


def test_query_spread_bench(trained, synth_data, tmp_path):
    from data_prep.make_shards import make_shards

    make_shards(synth_data / "val.jsonl", tmp_path, "val", shard_size_mb=0.2)
    ckpt = trained / "model.ckpt"
    out = _run(
        "bench/query_spread.py", "--shards", str(tmp_path / "val.json"), "--layers", str(ckpt)
    )
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(str(ckpt)))
    stage, value = lines[i].split()[1:3]
    assert stage == "instruct" and 0.0 < float(value) < 100.0
    by_layer = [float(v) for v in re.findall(r"\d+: ([0-9.]+)", lines[i + 1])]
    assert len(by_layer) == 2, lines[i + 1]  # the tiny Q-Former's layers

    # the last layer's hooked output is the Q-Former's own output, the one the LLM reads
    import importlib.util

    import torch

    from sparqle.data.shard_datamodule import ShardDataModule
    from sparqle.export import load_model
    from sparqle.models.pretrain import query_spread

    spec = importlib.util.spec_from_file_location(
        "query_spread_bench", ROOT / "bench" / "query_spread.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dm = ShardDataModule(val={"urls": str(tmp_path / "val.json")}, batch_size=4, num_workers=0)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    module = load_model(ckpt, generates=False)
    with torch.no_grad():
        enc = module.model.encode(batch.audio, batch.audio_lens)
        direct = float(query_spread(module.model.adapter.qformer(enc.features, enc.mask)).mean())
    assert bench.spread(module, [batch])[-1] == pytest.approx(direct, rel=1e-6)


def test_eval_throughput_bench(tiny_dir):
    out = _run(
        "bench/eval_throughput.py",
        f"paths.cache_dir={tiny_dir}",
        "--n",
        "8",
        "--batch",
        "4",
        "--new-tokens",
        "4",
    )
    assert "one at a time" in out and "batches of 4" in out and "ratio" in out


def test_cpu_bf16_bench():
    out = _run(
        "bench/cpu_bf16.py", "--batch", "2", "--seconds", "1", "--tokens", "8", "--repeats", "1"
    )
    rows = [line for line in out.splitlines() if "SmolLM2-135M fwd+bwd" in line]
    assert [r.split(":")[0].strip() for r in rows] == ["float32", "bfloat16"], out
    assert out.startswith("native bf16 on this CPU: ")


def test_saved_activations_bench(tiny_dir):
    out = _run("bench/saved_activations.py", "--batch", "2", f"paths.cache_dir={tiny_dir}")
    kept, recomputed = (int(m.replace(",", "")) for m in re.findall(r":\s+([\d,]+) elements", out))
    losses = re.findall(r"loss ([\d.]+)", out)
    assert kept >= 3 * recomputed and losses[0] == losses[1]
