"""The shard training stream as the loop consumes it: the same batches on a rerun, and a stream
resumed from a checkpoint's position continues with exactly the batches the uninterrupted one
delivered next, for audio and feature shards, any number of workers, one rank or several."""

from __future__ import annotations

import logging
from dataclasses import asdict

import pytest

from sparqle.data.shard_datamodule import ShardDataModule


def _module(urls, workers, rank, world):
    dm = ShardDataModule(
        train={"main": {"urls": str(urls)}},
        num_workers=workers,
        persistent_workers=False,
        batch_size=2,
        max_seconds_per_batch=6.0,  # several batches an epoch, resampled too
        shuffle_buffer=4,
        pool_size=4,
        seed=3,
        max_seconds=10.0,
        tasks={"transcribe": 1.0, "translate_de": 0.5},
    )
    dm._rank_world = lambda: (rank, world)
    dm.set_epoch(1)
    return dm


def _epoch(dm):
    return [tuple(b.id) for b in dm.train_dataloader()]


@pytest.mark.parametrize("kind", ["audio", "features"])
@pytest.mark.parametrize("workers, world", [(2, 1), (0, 1), (1, 2), (2, 2)])
def test_a_resumed_stream_continues_with_the_next_batch(
    kind, workers, world, tiny_shards, tiny_features
):
    urls = (tiny_shards if kind == "audio" else tiny_features) / "train.json"
    for rank in range(world):
        dm = _module(urls, workers, rank, world)
        full = _epoch(dm)
        assert full == _epoch(_module(urls, workers, rank, world))  # a rerun: the same batches
        assert len(full) >= 4
        # cut where the loop stopped: after the first batch, mid-epoch (whichever worker's
        # batch was next) and before the last
        for k in sorted({1, len(full) // 2, len(full) // 2 + 1, len(full) - 1}):
            position = dm._positions.position(1, world, k)
            resumed = _module(urls, workers, rank, world)
            resumed.load_state_dict({"stream_positions": [asdict(position)] * world})
            assert _epoch(resumed) == full[k:], f"rank {rank}, resumed after {k} batches"


def test_a_position_from_another_layout_restarts_the_epoch_with_one_line(tiny_shards, caplog):
    urls = tiny_shards / "train.json"
    dm = _module(urls, 2, 0, 1)
    full = _epoch(dm)
    position = asdict(dm._positions.position(1, 1, 3))
    resumed = _module(urls, 2, 0, 2)  # two ranks now
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict({"stream_positions": [position]})
    assert "saved on 1 rank(s), resuming on 2" in caplog.text
    assert resumed._resume is None and full
