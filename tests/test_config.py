"""The composed config is checked before anything is built: one line naming the key, exit 2."""

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from sparqle.cli import report_user_errors
from sparqle.config_check import ConfigError, validate_config
from tests.conftest import ROOT

BAD = [
    ("adapter.num_queries=-3", "adapter.num_queries=-3: expected an integer >= 1"),
    ("trainer.max_steps=abc", "trainer.max_steps='abc': expected an integer >= -1"),
    ("stage.name=finetune", "stage.name='finetune': expected one of pretrain, instruct"),
    ("stage.optim.lr=0", "stage.optim.lr=0: expected a number > 0"),
    ("stage.optim.schedule=step", "stage.optim.schedule='step': expected one of constant"),
    ("data.batch_size=0", "data.batch_size=0: expected an integer >= 1"),
    ("data.min_seconds=40", "data.min_seconds=40: must be below data.max_seconds=30.0"),
    ("trainer.devices=0", "trainer.devices=0: expected an integer >= 1, a list"),
    ("trainer.precision=bf32", "trainer.precision='bf32': expected one of 32-true"),
    ("llm.dtype=int4", "llm.dtype='int4': expected one of float32, bfloat16, float16"),
    ("stage.init_from=/no/such.ckpt", "stage.init_from='/no/such.ckpt': expected an existing file"),
    ("trainer=fsdp trainer.devices=1", "trainer.devices=1: trainer=fsdp shards over 2 or more"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1: expected a number >= 0"),
    (
        "encoder=whisper_medium encoder.whisper_window_seconds=5",
        "data.max_seconds=30.0: must be at most encoder.whisper_window_seconds=5",
    ),
    (
        "encoder=whisper_medium encoder.whisper_window_seconds=45",
        "encoder.whisper_window_seconds=45: expected a number > 0 and <= 30 or null",
    ),
    (
        "stage=pretrain stage.pretrain.query_spread_weight=1",
        "stage.pretrain.query_spread_weight=1: needs adapter.dropout=0 (is 0.1)",
    ),
    (
        "stage=pretrain stage.pretrain.query_spread_target=0",
        "stage.pretrain.query_spread_target=0: expected a number > 0",
    ),
    (
        "stage=pretrain stage.pretrain.query_spread_weight=-1",
        "stage.pretrain.query_spread_weight=-1: expected a number >= 0",
    ),
    ("trainer.precision=16-mixed", "trainer.precision='16-mixed': expected one of 32-true, bf16"),
    (
        "adapter=linear +adapter.num_queries=32",
        "adapter.num_queries: not a setting of adapter=LinearAdapter (it takes downsample, hidden_dim)",
    ),
    (
        "+llm.lora_rank=8",
        "llm.lora_rank: not a setting of llm=LLM (it takes activation_checkpointing, dtype",
    ),
    ("trainer.val_check_interval=7", "trainer.val_check_interval=7: set val_every_n_steps"),
]


def composed(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("overrides, message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_value_is_one_line_naming_its_key(overrides, message, capsys):
    cfg = composed("data.train_manifest=null", "data.val_manifest=null", *overrides.split())
    with pytest.raises(SystemExit) as stop:
        report_user_errors(validate_config, cfg)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err


def test_the_shipped_presets_pass():
    for experiment in ("tiny", "demo", "demo_smollm2", "sparqle_paper"):
        for stage in ("pretrain", "instruct"):
            cfg = composed(f"experiment={experiment}", f"stage={stage}")
            validate_config(cfg)  # no ConfigError; manifests are a training run's to check
    # every adapter composes with the paper preset (its Q-Former keys are the adapter's own)
    for adapter in ("qformer", "linear", "window_qformer"):
        validate_config(composed("experiment=sparqle_paper", f"adapter={adapter}"))


def test_a_missing_manifest_is_named():
    cfg = composed("data.train_manifest=null", "data.val_manifest=/nowhere/val.jsonl")
    with pytest.raises(ConfigError, match=r"data.val_manifest='/nowhere/val.jsonl': expected"):
        validate_config(cfg, run_here=True)


def test_train_py_stops_before_loading_anything(tmp_path):
    """As a user meets it: exit code 2, one line, no traceback, no model loaded."""
    run = f"hydra.run.dir={tmp_path}"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=tiny", "adapter.num_queries=-3", run],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: adapter.num_queries=-3: expected an integer >= 1"
    ]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "world, cap, batch, accumulate",
    [(1, 8, 8, 2), (2, 8, 8, 1), (8, 8, 2, 1), (4, 2, 2, 2), (16, 8, 1, 1)],
)
def test_a_global_batch_is_kept_on_any_number_of_ranks(monkeypatch, world, cap, batch, accumulate):
    """The authors' 16 utterances an update, on 1 to 16 ranks: the per-rank batch (at most the
    configured one) and accumulation follow; the learning rate scales only where asked."""
    from sparqle.config import apply_global_batch

    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = composed(
        "experiment=sparqle_paper", "data.global_batch_size=16", f"data.batch_size={cap}"
    )
    apply_global_batch(cfg)
    assert (cfg.data.batch_size, cfg.trainer.accumulate_grad_batches) == (batch, accumulate)
    assert cfg.stage.optim.lr == 1e-4  # lr_scaling: none
    for scaling, factor in (("linear", 2.0), ("sqrt", 2**0.5)):
        cfg = composed(
            "experiment=sparqle_paper",
            "data.global_batch_size=32",
            f"stage.optim.lr_scaling={scaling}",
        )
        apply_global_batch(cfg)
        assert cfg.stage.optim.lr == pytest.approx(1e-4 * factor)


def test_a_global_batch_that_does_not_split_is_one_line(monkeypatch):
    from sparqle.config import apply_global_batch

    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = composed("experiment=sparqle_paper", "data.global_batch_size=16")
    with pytest.raises(ConfigError, match=r"data.global_batch_size=16: not a multiple of 3 rank"):
        apply_global_batch(cfg)


def test_train_mode_augment_is_refused_with_a_feature_cache():
    cfg = composed(
        "data.train_manifest=null",
        "data.val_manifest=null",
        "encoder.train_mode_augment=true",
        "encoder.cache_features=true",
    )
    with pytest.raises(ConfigError, match="encoder.train_mode_augment=true with encoder.cache"):
        validate_config(cfg)
