"""Shard streams resumed mid-epoch end with the weights of a run never interrupted: audio shards on
one rank with two loader workers, feature shards on two ranks (the stage-1 ITM negatives and the
task draws come from the random streams, so any data or random-state slip shows)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, differing, torchrun, trained_weights


def _run(args, launcher=(), timeout=240):
    proc = subprocess.run(
        [*launcher, str(ROOT / "train.py"), *args]
        if launcher
        else [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _resumes_exactly(common, tmp_path, cuts, launcher=()):
    _run([*common, f"hydra.run.dir={tmp_path / 'ref'}"], launcher)
    ref = tmp_path / "ref" / "checkpoints"
    _, final = trained_weights(ref / "last.ckpt")
    for step in cuts:
        ckpt = torch.load(ref / f"step{step:07d}.ckpt", weights_only=False)
        assert not ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"]
        run = tmp_path / f"from{step}"
        _run(
            [*common, f"ckpt_path={ref / f'step{step:07d}.ckpt'}", f"hydra.run.dir={run}"], launcher
        )
        _, weights = trained_weights(run / "checkpoints" / "last.ckpt")
        assert not differing(weights, final), f"resumed from step {step}"


def _common(tiny_dir, data, urls, *extra):
    return [
        "experiment=tiny",
        f"data={data}",
        f"paths.cache_dir={tiny_dir}",
        f"data.train.main.urls={urls / 'train.json'}",
        f"data.val.urls={urls / 'val.json'}",
        "data.batch_size=2",
        "data.max_seconds_per_batch=6",
        "data.shuffle_buffer=4",
        "data.pool_size=4",
        "callbacks.progress_bar=null",
        "val_every_n_steps=100",
        *extra,
    ]


@pytest.mark.slow
def test_audio_shards_one_rank_two_workers_resume_mid_epoch_exactly(
    tiny_dir, tiny_shards, tmp_path
):
    common = _common(
        tiny_dir,
        "shards",
        tiny_shards,
        "stage=pretrain",
        "data.num_workers=2",
        "trainer.max_steps=10",
        "callbacks.model_checkpoint.every_n_train_steps=3",
    )
    # after 3 batches the next one is worker 1's, after 6 worker 0's (round-robin)
    _resumes_exactly(common, tmp_path, cuts=(3, 6))


@pytest.mark.slow
def test_feature_shards_on_two_ranks_resume_mid_epoch_exactly(tiny_dir, tiny_features, tmp_path):
    common = _common(
        tiny_dir,
        "feature_shards",
        tiny_features,
        "encoder.layer=1",
        "stage=instruct",
        "data.num_workers=1",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=6",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    )
    launcher = tuple(torchrun(2))
    _resumes_exactly(common, tmp_path, cuts=(2,), launcher=launcher)
