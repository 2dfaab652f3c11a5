"""sparqle.plan: memory per strategy as sparqle.memory_plan counts it, the largest batch that
fits, FLOPs as sparqle.flops counts them, and the time and GPU-hours that follow from them."""

import json
import math
from dataclasses import replace

import pytest

from sparqle.data.manifest import read_manifest
from sparqle.plan import main, make_plan


def _tiny(tiny_dir, synth_data, *extra):
    return [
        "experiment=tiny",
        f"paths.cache_dir={tiny_dir}",
        f"data.train_manifest={synth_data / 'train.jsonl'}",
        "trainer.devices=2",
        "trainer.max_steps=1000",
        "trainer.accumulate_grad_batches=2",
        *extra,
    ]


def test_the_plan_adds_up_from_the_memory_plan_and_the_flop_count(tiny_dir, synth_data):
    from sparqle.flops import step_work
    from sparqle.memory_plan import plan, step_shape
    from sparqle.random_model import build_module

    overrides = _tiny(tiny_dir, synth_data)
    p = make_plan(overrides, "a100")
    utts = read_manifest(synth_data / "train.jsonl")
    seconds = sum(u.duration for u in utts)
    assert p["data"]["clips"] == len(utts)
    assert p["data"]["hours"] == pytest.approx(seconds / 3600)
    assert p["gpu"] == {"name": "a100", "memory_gb": 80.0, "peak_tflops": 312.0}
    assert p["mfu"] == {"value": 0.35, "source": "assumed"}

    module, cfg = build_module(overrides, meta=True)
    shape = step_shape(module, cfg)
    kw = {"world": 2, "gathered_ranks": 2, "compute_bytes": 2, "checkpointed": False}
    ddp = p["strategies"]["ddp"]
    assert ddp["peak_gib"] * 2**30 == pytest.approx(plan(module, shape, "ddp", **kw)["peak"])
    cap = 0.9 * 80e9  # the largest batch fits, one more does not
    assert plan(module, replace(shape, batch=ddp["largest_batch"]), "ddp", **kw)["peak"] <= cap
    assert plan(module, replace(shape, batch=ddp["largest_batch"] + 1), "ddp", **kw)["peak"] > cap

    step = p["step"]
    assert step["clip_seconds"] == pytest.approx(seconds / len(utts))
    samples = int(step["clip_seconds"] * 16000)
    row = shape.prompt_tokens + module.model.adapter.qformer.num_queries + shape.target_tokens
    losses = {"llm_rows": [row] * shape.batch, "llm_scored_from": row - shape.target_tokens}
    flops = 2 * step_work(module.model, [samples] * shape.batch, losses)  # 2 micro-batches
    assert step["tflops_per_gpu"] * 1e12 == pytest.approx(flops)
    assert step["seconds"] == pytest.approx(flops / (312e12 * 0.35))
    assert step["global_batch"] == shape.batch * 2 * 2
    assert p["epoch"]["steps"] == math.ceil(len(utts) / step["global_batch"])
    assert p["run"]["gpu_hours"] == pytest.approx(1000 * step["seconds"] * 2 / 3600)
    # a measured MFU replaces the assumed one: time scales inversely
    given = make_plan(overrides, "a100", mfu=0.7)
    assert given["mfu"]["source"] == "given"
    assert given["step"]["seconds"] == pytest.approx(step["seconds"] / 2)


def test_the_command_prints_a_table_or_json_and_refuses_an_unknown_gpu(
    tiny_dir, synth_data, capsys
):
    main([*_tiny(tiny_dir, synth_data), "gpu=h100", "--json"])
    planned = json.loads(capsys.readouterr().out)
    assert planned["gpu"]["name"] == "h100" and set(planned["strategies"]) == {"ddp", "fsdp"}
    main([*_tiny(tiny_dir, synth_data), "gpu=l4"])
    table = capsys.readouterr().out
    assert "largest batch that fits" in table and "assumed MFU 0.35" in table
    assert "GPU-hours" in table and "epoch:" in table
    with pytest.raises(SystemExit) as exit_:
        main([*_tiny(tiny_dir, synth_data), "gpu=tpu"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: gpu=tpu: expected one of h200")


def test_the_paper_plan_on_four_nodes():
    """Llama-3-8B on 4 nodes of 8 H100s: FSDP frees memory for larger batches, HSDP keeps all
    but the gradients inside a node; the figures are docs/benchmarks.md's memory plan."""
    p = make_plan(
        ["experiment=sparqle_paper", "trainer=fsdp", "trainer.devices=8", "trainer.num_nodes=4"]
    )
    s = p["strategies"]
    assert round(s["ddp"]["peak_gib"], 1) == 32.2 and round(s["fsdp"]["peak_gib"], 1) == 17.2
    assert s["fsdp"]["largest_batch"] > s["ddp"]["largest_batch"] >= 8
    assert s["hybrid"]["across_nodes_gb_per_step"] < 1 < s["fsdp"]["across_nodes_gb_per_step"]
    assert p["experiment"]["llm"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert p["step"]["global_batch"] == 8 * 2 * 32 and p["run"]["max_steps"] == 100000
