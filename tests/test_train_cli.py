"""train.py as users run it: a subprocess with Hydra overrides."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


def run_train(*overrides, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_a_finished_run_holds_its_checkpoint_clip_lengths_and_metrics(uninterrupted, synth_data):
    """The session's uninterrupted train.py run (stage 1, 16 steps, validation every 6)."""
    ckpt = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 16
    assert ckpt["hyper_parameters"]["stage"]["name"] == "pretrain"
    # the clip lengths it trained on (inference cuts long audio to them)
    from sparqle.data.manifest import read_manifest

    durations = [u.duration for u in read_manifest(synth_data / "train.jsonl")]
    lo, hi = ckpt["trained_clip_seconds"]
    assert min(durations) - 0.01 <= lo <= hi <= max(durations) + 0.01
    metrics = (uninterrupted / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss" in metrics


def test_paper_config_composes_offline():
    proc = run_train("experiment=sparqle_paper", "--cfg", "job", timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "facebook/hubert-large-ll60k" in out and "meta-llama/Meta-Llama-3-8B-Instruct" in out
    assert "num_queries: 100" in out and "cross_attention_frequency: 2" in out


@pytest.mark.parametrize("data", ["manifest", "shards"])
def test_paper_preset_builds_either_data_module(data):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train", overrides=["experiment=sparqle_paper", f"data={data}", "paths.output_dir=/tmp"]
        )
    # the preset's data keys fit both DataModules (train.py measures the shards' token overhead)
    measured = {"token_overhead": 179} if data == "shards" else {}
    dm = instantiate(cfg.data, **measured)
    assert (
        type(dm).__name__ == {"manifest": "ManifestDataModule", "shards": "ShardDataModule"}[data]
    )
    assert cfg.trainer.strategy._target_.endswith("TrainableOnlyDDPStrategy")
    assert cfg.encoder.dtype == "bfloat16"
    assert dm.min_seconds == 1.0 and dm.max_seconds == 30.0
    if data == "shards":  # the memory plan's 8 x (179 prompt + 129 target) LLM positions
        assert dm.bucket["max_tokens"] == 2464
    else:  # fixed-size batches: no token budget key reaches the manifest module
        assert "max_tokens" not in cfg.data


def test_paper_preset_shows_the_reference_values():
    """`train.py experiment=sparqle_paper --cfg job` prints the authors' train.sh/generation.py values."""
    import yaml

    from sparqle.prompts import PAPER_SYSTEM_PROMPT

    for stage in ("pretrain", "instruct"):
        proc = run_train(
            "experiment=sparqle_paper", f"stage={stage}", "--cfg", "job", "--resolve", timeout=60
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        cfg = yaml.safe_load(proc.stdout)
        optim = cfg["stage"]["optim"]
        # the second reading of the authors' code (issue 23)
        assert cfg["encoder"]["train_mode_augment"] is (stage == "pretrain")
        assert cfg["data"]["text_case"] == "lower" and cfg["data"]["global_batch_size"] == 16
        assert optim["no_decay"] == [] and optim["lr_scaling"] == "none"
        assert optim["eps"] == 1e-5 and optim["betas"] == [0.9, 0.98] and optim["lr"] == 1e-4
        assert optim["schedule"] == "constant" and optim["warmup_init_lr"] == 1e-6
        assert optim["warmup_steps"] == 1000 and optim["weight_decay"] == 0.05
        assert cfg["trainer"]["gradient_clip_val"] == 20.0
        assert cfg["trainer"]["accumulate_grad_batches"] * cfg["data"]["batch_size"] == 16
        assert cfg["generation"] == {
            "num_beams": 5,
            "no_repeat_ngram_size": 2,
            "early_stopping": True,
            "length_penalty": 1.0,
            "repetition_penalty": 1.0,
            "do_sample": False,
            "max_new_tokens": 75,
        }
        assert cfg["llm"]["system_prompt"] == PAPER_SYSTEM_PROMPT
        assert cfg["llm"]["max_target_tokens"] == 128
        assert cfg["data"]["tasks"] == {"transcribe": 1.0, "translate_de": 1.0}
    assert cfg["stage"]["require_init_from"] is True
    assert cfg["stage"]["pretrain"]["max_text_tokens"] == 512
    assert cfg["stage"]["pretrain"]["temperature_clamp"] is None
    # each of those values cites the authors' file and line in the preset
    preset = (ROOT / "conf/experiment/sparqle_paper.yaml").read_text()
    for key, source in (
        ("text_case: lower", "speech_to_text_dataset_raw.py line 238"),
        ("train_mode_augment:", "qformer_speech_raw.py line 79"),
        ("global_batch_size: 16", "train.sh --batch-size 8 --update-freq 2"),
        ("temperature_clamp: null", "sparqle_qformer_base_raw.py line 172"),
        ("max_text_tokens: 512", "sparqle_qformer_base_raw.py line 213"),
        ("num_beams: 5", "generation.py lines 345-358"),
    ):
        before = preset[: preset.index(key)]
        assert source in before[-700:], (key, source)
    reference = (ROOT / "conf/generation/reference.yaml").read_text()
    assert "line 151" in reference and "temperature: 0.6" in reference


@pytest.mark.parametrize(
    "override, message",
    [
        ("encoder=hubert_gigantic", "Could not find 'encoder/hubert_gigantic'"),
        ("trainer.max_stepz=3", "Key 'max_stepz' is not in struct"),
    ],
)
def test_bad_choice_or_key_fails_clearly(override, message):
    proc = run_train(override, "--cfg", "job", timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_missing_manifest_is_one_clear_line(tiny_dir, tmp_path):
    proc = run_train(
        "experiment=tiny",
        f"paths.cache_dir={tiny_dir}",
        f"data.train_manifest={tmp_path / 'nothing.jsonl'}",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 2  # stopped by the config check, before any model loads
    missing = tmp_path / "nothing.jsonl"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: data.train_manifest='{missing}': expected an existing file or null"
    )


@pytest.mark.slow
def test_both_stages_train_from_feature_shards_without_the_encoder(
    tiny_dir, tiny_features, tmp_path
):
    common = [
        "experiment=tiny",
        "data=feature_shards",
        "trainer.max_steps=6",
        "val_every_n_steps=3",
        "data.num_workers=1",
        "data.max_seconds_per_batch=12",
        "encoder.layer=1",
        f"paths.cache_dir={tiny_dir}",
        f"data.train.main.urls={tiny_features / 'train.json'}",
        f"data.val.urls={tiny_features / 'val.json'}",
        "callbacks.progress_bar=null",
    ]
    ckpt = tmp_path / "pretrain" / "checkpoints" / "last.ckpt"
    for stage, extra in (("pretrain", []), ("instruct", [f"stage.init_from={ckpt}"])):
        proc = run_train(*common, f"stage={stage}", *extra, f"hydra.run.dir={tmp_path / stage}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "encoder: none loaded; features of" in proc.stdout + proc.stderr
        saved = torch.load(tmp_path / stage / "checkpoints" / "last.ckpt", weights_only=True)
        assert saved["global_step"] == 6
        assert "features" not in saved["hyper_parameters"]  # inference rebuilds the encoder
    # features from another layer than the run's encoder: one line naming both, exit 2
    proc = run_train(
        *common, "stage=pretrain", "encoder.layer=2", f"hydra.run.dir={tmp_path / 'x'}"
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("error: data: feature shards of encoder ")
        and "layer 1, but the run's encoder is encoder" in proc.stderr
    )
