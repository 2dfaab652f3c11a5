"""The benchmarks run and print what they claim to measure (their figures are measured in
docs/benchmarks.md; here they run side by side, which only their timings would notice)."""

import json
import re

import pytest

from tests.conftest import ROOT
from tests.helpers import run_side_by_side


@pytest.fixture(scope="module")
def outputs(tiny_dir, synth_data, trained, tmp_path_factory):
    """Each bench's stdout, by script name."""
    from data_prep.make_shards import make_shards

    shards = tmp_path_factory.mktemp("bench-shards")
    make_shards(synth_data / "manifest.jsonl", shards, "train", shard_size_mb=0.2)
    make_shards(synth_data / "val.jsonl", shards, "val", shard_size_mb=0.2)
    tiny = f"paths.cache_dir={tiny_dir}"
    benches = {
        "train_step": [
            *("experiment=tiny", tiny, "--batch", "2", "--steps", "2", "--warmup", "1"),
        ],
        "data_throughput": ["--shards", str(shards / "train.json"), "--repeats", "1", "--profile"],
        "query_spread": [
            *("--shards", str(shards / "val.json"), "--layers", str(trained / "model.ckpt")),
        ],
        "eval_throughput": [tiny, "--n", "8", "--batch", "4", "--new-tokens", "4"],
        "cpu_bf16": ["--batch", "2", "--seconds", "1", "--tokens", "8", "--repeats", "1"],
        "saved_activations": ["--batch", "2", tiny],
        "plan_vs_step": [
            *("experiment=tiny", "stage=instruct", tiny, "--shapes", "4x2", "2x4"),
            *("--steps", "1", "--warmup", "1"),
        ],
    }
    done = run_side_by_side([[f"bench/{name}.py", *args] for name, args in benches.items()])
    for name, proc in zip(benches, done, strict=True):
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    return {"shards": shards, **{n: p.stdout for n, p in zip(benches, done, strict=True)}}


def test_train_step_bench(outputs):
    out = outputs["train_step"]
    result = json.loads(out[out.index("{") :])
    assert (
        result["step_time_s"] > 0
        and result["audio_seconds_per_s"] > 0
        and result["llm_tokens_per_s"] > 0
    )
    assert 0 < result["mfu"] < 1.5


def test_data_throughput_bench(outputs):
    out = outputs["data_throughput"]
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


def test_query_spread_bench(outputs, trained):
    ckpt, out = trained / "model.ckpt", outputs["query_spread"]
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
    val = str(outputs["shards"] / "val.json")
    dm = ShardDataModule(val={"urls": val}, batch_size=4, num_workers=0)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    module = load_model(ckpt, generates=False)
    with torch.no_grad():
        enc = module.model.encode(batch.audio, batch.audio_lens)
        direct = float(query_spread(module.model.adapter.qformer(enc.features, enc.mask)).mean())
    assert bench.spread(module, [batch])[-1] == pytest.approx(direct, rel=1e-6)


def test_eval_throughput_bench(outputs):
    out = outputs["eval_throughput"]
    assert "one at a time" in out and "batches of 4" in out and "ratio" in out


def test_cpu_bf16_bench(outputs):
    out = outputs["cpu_bf16"]
    rows = [line for line in out.splitlines() if "SmolLM2-135M fwd+bwd" in line]
    assert [r.split(":")[0].strip() for r in rows] == ["float32", "bfloat16"], out
    assert out.startswith("native bf16 on this CPU: ")


def test_saved_activations_bench(outputs):
    out = outputs["saved_activations"]
    kept, recomputed = (int(m.replace(",", "")) for m in re.findall(r":\s+([\d,]+) elements", out))
    losses = re.findall(r"loss ([\d.]+)", out)
    assert kept >= 3 * recomputed and losses[0] == losses[1]


def test_plan_vs_step_bench(outputs):
    """The plan's FLOPs and activation memory, computed from shapes alone, agree with what a real
    step of the same shapes counts and saves (timings are printed, not asserted)."""
    out = outputs["plan_vs_step"]
    rows = json.loads(out[out.index("{") :])["rows"]
    assert [r["shape"] for r in rows] == ["4x2", "2x4"]
    for r in rows:
        assert r["planned_gflop"] == pytest.approx(r["counted_gflop"], rel=0.05), r
        assert 0.7 < r["planned_activation_mib"] / r["saved_activation_mib"] < 1.5, r
        assert r["predicted_step_s"] > 0 and r["measured_step_s"] > 0
