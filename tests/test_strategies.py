"""FSDP2 and DDP executed on CPU processes over gloo, in the paper's dtype layout (frozen bf16
encoder and LLM, fp32 trainable adapter), through train.py as users run it."""

import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerLayer

from sparqle.lit_module import SparQLeModule
from sparqle.models.blocks import block_classes
from sparqle.models.tiny import save_llama, tiny_llm_tokenizer
from sparqle.strategies import cpu_has_native_bf16
from tests.conftest import ROOT
from tests.helpers import make_cfg, make_module, torchrun

PAPER_DTYPES = ("encoder.dtype=bfloat16", "llm.dtype=bfloat16")
LORA = "llm.lora={r: 2, lora_alpha: 4, target_modules: [q_proj, v_proj]}"
ON_TWO_CPUS = ("trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=2")
FSDP = ("trainer=fsdp", *ON_TWO_CPUS, "trainer.precision=32-true")
STEPS = ("trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2")


@pytest.fixture(scope="module")
def wide_llm(tmp_path_factory):
    """A frozen LLM much larger than the adapter, as in the paper (tied embeddings, like SmolLM2)."""
    out = tmp_path_factory.mktemp("wide-llm")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        save_llama(
            out,
            tiny_llm_tokenizer(),
            hidden_size=384,
            intermediate_size=768,
            num_hidden_layers=6,
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    return out


def _overrides(tiny_dir, synth_data, wide_llm, run_dir, *extra):
    return [
        "experiment=tiny",
        "stage=instruct",
        f"paths.cache_dir={tiny_dir}",
        f"data.train_manifest={synth_data / 'train.jsonl'}",
        f"data.val_manifest={synth_data / 'val.jsonl'}",
        f"llm.name_or_path={wide_llm}",
        f"hydra.run.dir={run_dir}",
        "callbacks.progress_bar=null",
        "trainer.limit_val_batches=0",
        *extra,
    ]


def _start(args):
    """train.py in its own session, so a test can kill every rank it spawns at once."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,
    )


def _finish(proc, timeout=240) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the run hung") from None
    assert proc.returncode == 0, err[-3000:]
    return err


def _weights(run_dir, name="last.ckpt"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


@pytest.fixture(scope="module")
def runs(tiny_dir, synth_data, wide_llm, tmp_path_factory):
    """Stage 2 for 6 steps on the same global batches of 4: one process, and 2 ranks of 2."""
    root = tmp_path_factory.mktemp("runs")
    fp32 = ("encoder.dtype=float32", "llm.dtype=float32", "trainer.strategy.compute_dtype=float32")
    plans = {
        "one/fp32": ("data.batch_size=4", "encoder.dtype=float32", "llm.dtype=float32"),
        # with the frozen LLM's layers recomputed in backward, by either path (same weights)
        # ... and the joint batch of 4 given as a global batch (2 a rank derived from it)
        "ddp/fp32": (
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "data.batch_size=4",
            "data.global_batch_size=4",
            "encoder.dtype=float32",
            "llm.dtype=float32",
            "llm.activation_checkpointing=true",
        ),
        "fsdp/fp32": (*FSDP, *fp32, "trainer.strategy.activation_checkpointing=true"),
        "one/paper": ("data.batch_size=4", *PAPER_DTYPES, LORA),
        "fsdp/paper": (*FSDP, *PAPER_DTYPES, LORA, "trainer.strategy.compute_dtype=float32"),
    }
    out = {}
    for name, extra in plans.items():
        run_dir = root / name.replace("/", "-")
        out[name] = {
            "dir": run_dir,
            "args": _overrides(tiny_dir, synth_data, wide_llm, run_dir, *STEPS, *extra),
        }
    # the one-process runs side by side (two cores, mostly imports), the two-rank ones in turn
    alone = [_start(out[n]["args"]) for n in out if n.startswith("one/")]
    for proc in alone:
        _finish(proc)
    for name in out:
        if not name.startswith("one/"):
            _finish(_start(out[name]["args"]))
    return out


def _initial_adapter(tiny_dir, synth_data, wide_llm, *extra):
    cfg = make_cfg(tiny_dir, synth_data, "stage=instruct", f"llm.name_or_path={wide_llm}", *extra)
    L.seed_everything(cfg.seed)
    return SparQLeModule.from_config(cfg)


def _update_gap(init, a, b) -> float:
    """|b - a| / |a - init| over all adapter tensors: how far two runs' updates disagree."""
    keys = sorted(a)
    da = torch.cat([(a[k].float() - init[k].float()).flatten() for k in keys])
    db = torch.cat([(b[k].float() - init[k].float()).flatten() for k in keys])
    return float((db - da).norm() / da.norm())


@pytest.mark.slow
def test_fsdp_and_ddp_train_as_one_process_on_the_joint_batch(runs, tiny_dir, synth_data, wide_llm):
    one = _weights(runs["one/fp32"]["dir"])["state_dict"]
    for name in ("ddp/fp32", "fsdp/fp32"):
        other = _weights(runs[name]["dir"])
        assert other["global_step"] == 6 and other["state_dict"].keys() == one.keys()
        for k, v in one.items():
            # fp32 throughout: the only difference is the order of sums (two ranks' gradients
            # and token counts added instead of one batch's), ~1e-7 after six AdamW steps
            torch.testing.assert_close(other["state_dict"][k], v, rtol=0, atol=1e-6, msg=name)

    # the paper's layout: the frozen bf16 encoder and LLM round each clip differently in a batch
    # of 2 than in a batch of 4 (bf16 keeps 8 bits), and AdamW's first steps move a weight by
    # ~lr whatever its gradient's size, so near-zero gradients that change sign show: measured
    # 1.2 % of the update's norm; 5 % still fails any real mismatch (a lost gradient, a rank's
    # batch counted twice) by an order of magnitude
    init = _initial_adapter(tiny_dir, synth_data, wide_llm, *PAPER_DTYPES, LORA).state_dict()
    one, fsdp = (_weights(runs[n]["dir"])["state_dict"] for n in ("one/paper", "fsdp/paper"))
    assert any("lora_" in k for k in fsdp)  # LoRA inside the frozen LLM's units trains too
    assert _update_gap(init, one, fsdp) < 0.05

    # FSDP units as planned: every block, the tied embedding/head as one unit, the root last
    log = (runs["fsdp/paper"]["dir"] / "tiny.log").read_text()
    units = next(ln for ln in log.splitlines() if "FSDP2 units:" in ln)
    assert "embed_tokens+llm.model.base_model.model.lm_head" in units  # tied: one unit
    assert units.endswith("<root>")
    assert units.count("layers.") == 2 + 6 and units.count("encoder.layer.") == 2
    # one run directory for both ranks
    info = (runs["ddp/fp32"]["dir"] / "run_info.json").read_text()
    assert '"world_size": 2' in info


@pytest.mark.slow
def test_sharded_checkpoint_holds_only_what_is_trained(
    runs, tiny_dir, synth_data, wide_llm, tmp_path
):
    ckpt = _weights(runs["fsdp/paper"]["dir"])
    saved = ckpt["state_dict"]
    lora = {k for k in saved if "lora_" in k}
    assert lora and all(k.startswith("model.adapter.") for k in set(saved) - lora)
    assert set(ckpt["sparqle_trainable"]) == set(saved)
    module = _initial_adapter(tiny_dir, synth_data, wide_llm, *PAPER_DTYPES, LORA)
    model_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    saved_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    assert saved_bytes <= 0.02 * model_bytes
    # the optimizer state is per trained tensor, in the layout a one-device run writes
    state = ckpt["optimizer_states"][0]
    n = sum(len(g["params"]) for g in state["param_groups"])
    assert n == len(ckpt["sparqle_trainable"]) and set(state["state"]) <= set(range(n))
    assert len(ckpt["rng"]) == 2  # one random state per rank
    # and it exports (adapter + LoRA) and loads back like any other run's
    from sparqle.export import export, load_exported

    export(runs["fsdp/paper"]["dir"] / "checkpoints" / "last.ckpt", tmp_path / "export")
    loaded = load_exported(tmp_path / "export").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())


@pytest.mark.slow
def test_fsdp_killed_mid_epoch_resumes_to_the_same_weights(runs, tmp_path):
    ref = runs["fsdp/paper"]
    run_dir = tmp_path / "killed"
    args = [
        a if not a.startswith("hydra.run.dir=") else f"hydra.run.dir={run_dir}" for a in ref["args"]
    ]
    proc = _start(args)
    start = time.time()
    ckpts = run_dir / "checkpoints"
    while not ((ckpts / "step0000002.ckpt").exists() and (ckpts / "last.ckpt").exists()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - start < 120, "no checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank, no chance to save
    proc.wait()
    killed_at = _weights(run_dir)["global_step"]
    assert killed_at < 6
    _finish(_start([*args, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]))
    a, b = _weights(ref["dir"]), _weights(run_dir)
    assert a["global_step"] == b["global_step"] == 6
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), (
            f"{k} after resume at {killed_at}"
        )


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one(runs, tmp_path, tiny_dir, synth_data, wide_llm):
    ref = runs["fsdp/paper"]
    two_ranks = (*FSDP, "trainer.strategy.", "hydra.run.dir=")
    keep = [a for a in ref["args"] if not a.startswith(two_ranks)]
    step4 = ref["dir"] / "checkpoints" / "step0000004.ckpt"
    _finish(_start([*keep, "data.batch_size=4", f"hydra.run.dir={tmp_path}", f"ckpt_path={step4}"]))
    resumed = _weights(tmp_path)
    assert resumed["global_step"] == 6
    # the same global batches continue (the data position is kept in samples, not batches) with
    # the optimizer state of the two ranks: the update agrees as one process's does (see above)
    init = _initial_adapter(tiny_dir, synth_data, wide_llm, *PAPER_DTYPES, LORA).state_dict()
    assert _update_gap(init, _weights(ref["dir"])["state_dict"], resumed["state_dict"]) < 0.05


def _torchrun(*args, timeout=180):
    proc = subprocess.run(
        [*torchrun(2), *args],
        capture_output=True,
        text=True,
        timeout=timeout,  # a hang fails here instead of stalling the suite
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy, stage", [("ddp", "instruct"), ("hsdp", "instruct"), ("fsdp", "pretrain")]
)
def test_empty_batch_and_nan_on_different_ranks_skip_the_same_steps(
    strategy, stage, tiny_dir, synth_data, tmp_path
):
    out = tmp_path / "faults"
    _torchrun(
        str(ROOT / "tests" / "distributed_checks.py"),
        "faults",
        str(out),
        "--strategy",
        strategy,
        f"stage={stage}",
        f"paths.cache_dir={tiny_dir}",
        f"data.train_manifest={synth_data / 'train.jsonl'}",
        f"data.val_manifest={synth_data / 'val.jsonl'}",
        "data.batch_size=2",
        *PAPER_DTYPES,
    )
    r0, r1 = (torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in (0, 1))
    # step 2: rank 1's batch was empty; step 4: rank 0's loss was NaN; both ranks skip both
    assert r0["moved"] == r1["moved"] == [False, True, False, True, True]
    assert r0["skipped"] == r1["skipped"] == 2
    assert torch.equal(r0["final"], r1["final"])
    # the LLM's rotary frequencies stay fp32 beside its bf16 weights (no buffer is cast)
    assert all(dtype == torch.float32 for dtype in r0["buffers"].values())
    if strategy == "ddp":  # frozen weights are neither broadcast nor reduced by DDP
        ignored = {n.split("_forward_module.", 1)[-1] for n in r0["ddp_ignored"]}
        assert r0["frozen"] and set(r0["frozen"]) <= ignored
    if strategy == "hsdp":  # a 2-D mesh (1 node x 2 ranks), activations recomputed
        assert r0["mesh"] == ("replicate", "shard")


@pytest.mark.slow
def test_the_training_loop_reads_nothing_back_between_checks(tiny_dir, synth_data, tmp_path):
    """The whole loop on 2 ranks, Lightning's own work included (its per-batch SIGTERM broadcast,
    progress-bar metrics): between the checks every 3 steps (logging, skip counts, the stop flag)
    a step reads back only what HuBERT's padding-mask check reads in transformers itself. Rank 1's
    loader is late: rank 0 itself never waits for data (it waits for rank 1 in the all-reduce),
    yet the data wait it logs is rank 1's."""
    out = tmp_path / "reads"
    _torchrun(
        str(ROOT / "tests" / "distributed_checks.py"),
        "host_reads",
        str(out),
        f"paths.cache_dir={tiny_dir}",
        f"data.train_manifest={synth_data / 'train.jsonl'}",
        f"data.val_manifest={synth_data / 'val.jsonl'}",
        "data.batch_size=2",
        "stage=instruct",
    )
    assert torch.load(f"{out}.rank0.pt", weights_only=True)["data_wait"] > 0.4
    for rank in (0, 1):
        steps = torch.load(f"{out}.rank{rank}.pt", weights_only=True)["steps"]
        assert len(steps) == 9
        between = [s for i, s in enumerate(steps) if (i + 1) % 3]
        assert all(len(s) == 1 and "masking_utils" in s[0] for s in between), between
        checks = [s for i, s in enumerate(steps) if (i + 1) % 3 == 0]
        assert all(any("on_train_batch_end" in r for r in s) for s in checks)  # the stop flag


def _validate(out, world, batches, tiny_dir, val_manifest, shards):
    args = [
        str(ROOT / "tests" / "distributed_checks.py"),
        "validate",
        str(out),
        "--batches",
        ",".join(map(str, batches)),
        "--shards",
        str(shards),
        f"paths.cache_dir={tiny_dir}",
        f"data.train_manifest={val_manifest}",
        f"data.val_manifest={val_manifest}",
        "val_decode_clips=1000",
    ]
    if world == 1:
        launcher = [sys.executable]
    else:
        launcher = torchrun(world)
    proc = subprocess.run(
        [*launcher, *args],
        capture_output=True,
        text=True,
        timeout=300,
        # one thread a rank, as torchrun gives each: the same reduction order in every matmul
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in range(world)]
    assert all(r == ranks[0] for r in ranks)  # every rank logs the reduced figures
    return ranks[0]


@pytest.mark.slow
def test_validation_on_1_2_and_3_ranks_equals_one_process(tiny_dir, synth_data, tmp_path):
    """7 validation clips, per-rank batches of 1 and 4, on 2 and 3 ranks (with batches of 1 the
    last global batch leaves ranks with nothing), manifests and shards: stage 2's loss (a mean
    over target tokens), WER and BLEU are one process's; stage 1's in-batch figures are those of
    one process whose batch is the global one (per-rank batch x ranks)."""
    from data_prep.make_shards import make_shards
    from sparqle.data.manifest import read_manifest, write_manifest

    val = tmp_path / "val7" / "val.jsonl"
    write_manifest(val, read_manifest(synth_data / "manifest.jsonl")[:7])
    make_shards(val, val.parent, "val", shard_size_mb=0.05, seed=0)
    common = (tiny_dir, val, val.parent)
    one = _validate(tmp_path / "one", 1, [1, 2, 3, 4, 8, 12], *common)
    stage1 = ("val/itc", "val/itm", "val/itg", "val/loss", "val/r_at_1_in_batch")
    for kind in ("manifest", "shards"):
        # stage 2 does not depend on the batching at all
        for b in (2, 3, 4, 8, 12):
            for task, metric in (("transcribe", "val/wer"), ("translate_de", "val/bleu_de")):
                ref, got = one[f"{kind}/b1/instruct/{task}"], one[f"{kind}/b{b}/instruct/{task}"]
                assert got[metric] == ref[metric], (kind, b, task)
                assert got["val/loss"] == pytest.approx(ref["val/loss"], rel=1e-5), (kind, b, task)
    for world in (2, 3):
        many = _validate(tmp_path / f"w{world}", world, [1, 4], *common)
        for kind in ("manifest", "shards"):
            for b in (1, 4):
                for task, metric in (("transcribe", "val/wer"), ("translate_de", "val/bleu_de")):
                    ref = one[f"{kind}/b1/instruct/{task}"]
                    got = many[f"{kind}/b{b}/instruct/{task}"]
                    assert got[metric] == ref[metric], (world, kind, b, task)
                    assert got["val/loss"] == pytest.approx(ref["val/loss"], rel=1e-5)
                ref = one[f"{kind}/b{b * world}/pretrain/transcribe"]
                got = many[f"{kind}/b{b}/pretrain/transcribe"]
                for metric in stage1:
                    assert got[metric] == pytest.approx(ref[metric], rel=1e-4, abs=1e-6), (
                        world,
                        kind,
                        b,
                        metric,
                        got[metric],
                        ref[metric],
                    )
    assert 0 < one["manifest/b1/instruct/translate_de"]["val/bleu_de"] < 100


@pytest.mark.slow
def test_uneven_remote_shards_on_two_ranks_stream_equal_epochs(tiny_dir, synth_data, tmp_path):
    from data_prep.make_shards import FLAC_BYTES_PER_SECOND, make_shards
    from sparqle.data.manifest import read_manifest

    seconds = sum(u.duration for u in read_manifest(synth_data / "train.jsonl"))
    third = seconds * FLAC_BYTES_PER_SECOND / 1e6 / 2.5  # three shards, the last one short
    make_shards(synth_data / "train.jsonl", tmp_path / "shards", "train", shard_size_mb=third)
    make_shards(synth_data / "val.jsonl", tmp_path / "shards", "val", shard_size_mb=1)
    assert len(list((tmp_path / "shards").glob("train-*.tar"))) == 3
    # streamed as uploaded shards are: through a pipe: command, from the index for their copies
    from sparqle.data.shards import remote_index

    remote = tmp_path / "shards" / "train.remote.json"
    remote_index(
        tmp_path / "shards" / "train.json", f"pipe:cat {tmp_path / 'shards'}/{{name}}", remote
    )
    _finish(
        _start(
            [
                "experiment=tiny",
                "data=shards",
                "stage=instruct",
                "trainer=ddp",
                *ON_TWO_CPUS,
                "data.num_workers=1",
                "trainer.max_steps=4",
                "val_every_n_steps=2",
                "data.max_seconds_per_batch=8",
                f"paths.cache_dir={tiny_dir}",
                f"data.train.main.urls={remote}",
                f"data.val.urls={tmp_path / 'shards' / 'val.json'}",
                f"hydra.run.dir={tmp_path / 'run'}",
                "callbacks.progress_bar=null",
            ]
        )
    )
    log = (tmp_path / "run" / "tiny.log").read_text()
    said = [ln for ln in log.splitlines() if "data.resampled=false on 2 ranks" in ln]
    assert len(said) == 1, log[-2000:]
    assert _weights(tmp_path / "run")["global_step"] == 4


def test_blocks_found_in_every_model(tiny_dir, synth_data):
    module = make_module(tiny_dir, synth_data, "stage=instruct")
    blocks = block_classes(module)
    names = {c.__name__ for c in blocks}
    assert names == {"LlamaDecoderLayer", "HubertEncoderLayerStableLayerNorm", "Blip2QFormerLayer"}
    wrapped = [m for m in module.modules() if isinstance(m, tuple(blocks))]
    q_layers = sum(isinstance(m, Blip2QFormerLayer) for m in module.modules())
    assert len(wrapped) == 2 + 2 + q_layers == 6  # the conv front end is not a unit


def test_fsdp_asks_for_devices_the_machine_has(tiny_dir, synth_data, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "experiment=tiny",
            "trainer=fsdp",
            "trainer.devices=8",
            f"paths.cache_dir={tiny_dir}",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: trainer.accelerator=gpu: this machine has no GPU")
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "cpuinfo, native",
    [
        ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse avx2 fma avx512f avx512_vnni\n", False),
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd crc32 atomics\n", False),
        ("", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    assert cpu_has_native_bf16(cpuinfo) is native
