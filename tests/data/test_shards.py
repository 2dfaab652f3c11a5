import json
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_prep.make_shards import make_shards
from sparqle.data.audio import encode_flac, load_audio
from sparqle.data.manifest import read_manifest
from sparqle.data.shard_datamodule import ShardDataModule


@pytest.fixture(scope="module")
def shards(synth_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    make_shards(synth_data / "manifest.jsonl", out, "train", workers=2, shard_size_mb=0.15, seed=0)
    return out


def _ids(loader):
    return [i for b in loader for i in b.id]


def test_shards_round_trip(synth_data, shards):
    index = json.loads((shards / "train.json").read_text())
    assert index["num_samples"] == 24 and len(index["shards"]) >= 4
    assert (
        sum(s["samples"] for s in index["shards"]) == 24
        and sum(index["duration_histogram"]["counts"]) == 24
    )
    assert index["hours"] > 0 and index["skipped"] == {}
    utts = {u.id: u for u in read_manifest(synth_data / "manifest.jsonl")}
    seen = 0
    for shard in sorted(shards.glob("train-*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):  # a plain reader
            meta = json.loads(sample["json"])
            assert sample["__key__"] == meta["id"]
            utt = utts[meta["id"]]
            assert meta["text"] == utt.text and meta["translation"] == utt.translation
            original = load_audio(utt.audio, 16000)
            stored = load_audio(sample["flac"], 16000)
            assert len(stored) == len(original)
            assert np.max(np.abs(stored - original)) < 1e-4
            seen += 1
    assert seen == 24


def test_shards_readable_by_tar_and_hf_datasets(shards):
    listing = subprocess.run(
        ["tar", "tf", str(shards / "train-000000.tar")], capture_output=True, text=True, check=True
    )
    names = listing.stdout.split()
    assert names and all(n.endswith((".flac", ".json")) for n in names) and len(names) % 2 == 0

    import datasets

    features = datasets.Features(
        {
            "flac": datasets.Value("binary"),
            "json": {"id": datasets.Value("string"), "text": datasets.Value("string")},
            "__key__": datasets.Value("string"),
            "__url__": datasets.Value("string"),
        }
    )
    ds = datasets.load_dataset(
        "webdataset",
        data_files={"train": str(shards / "train-*.tar")},
        split="train",
        features=features,
    )
    assert len(ds) == 24
    row = ds[0]
    assert row["json"]["text"] and len(load_audio(row["flac"], 16000)) > 8000


def test_rerun_resumes_and_output_is_deterministic(synth_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_shards(synth_data / "manifest.jsonl", a, "train", shard_size_mb=0.15, seed=5)
    make_shards(synth_data / "manifest.jsonl", b, "train", workers=2, shard_size_mb=0.15, seed=5)
    tars = sorted(p.name for p in a.glob("*.tar"))
    assert tars == sorted(p.name for p in b.glob("*.tar"))
    assert all((a / t).read_bytes() == (b / t).read_bytes() for t in tars)
    # a killed run: one shard gone, one half-written temp file left behind
    (a / tars[1]).unlink()
    (a / f".{tars[1]}.123.tmp").write_bytes(b"half")
    before = {t: (a / t).stat().st_mtime_ns for t in tars if t != tars[1]}
    make_shards(synth_data / "manifest.jsonl", a, "train", shard_size_mb=0.15, seed=5)
    assert (a / tars[1]).read_bytes() == (b / tars[1]).read_bytes()
    assert all(
        (a / t).stat().st_mtime_ns == m for t, m in before.items()
    )  # finished shards untouched


def test_cluster_jobs_write_the_one_machine_shards_and_index(synth_data, tmp_path):
    # 3 submitit jobs (local processes standing in for a SLURM array) write disjoint slices;
    # the merged result is the one-machine result byte for byte, index included
    from data_prep.make_shards import main

    one, many = tmp_path / "one", tmp_path / "many"
    make_shards(synth_data / "manifest.jsonl", one, "train", shard_size_mb=0.15, seed=5)
    args = ["--manifest", str(synth_data / "manifest.jsonl"), "--split", "train"]
    args += ["--shard-size-mb", "0.15", "--seed", "5", "--jobs", "3", "--cluster", "local"]
    main([*args, "--out", str(many)])
    tars = sorted(p.name for p in one.glob("*.tar"))
    assert len(tars) >= 4 and tars == sorted(p.name for p in many.glob("*.tar"))
    assert all((one / t).read_bytes() == (many / t).read_bytes() for t in tars)
    assert (one / "train.json").read_bytes() == (many / "train.json").read_bytes()
    logs = list((many / ".submitit").glob("*_result.pkl"))
    assert len(logs) == 3  # three array tasks ran
    # a lost job's shard: the rerun submits only what is missing and keeps the rest
    (many / tars[2]).unlink()
    before = {t: (many / t).stat().st_mtime_ns for t in tars if t != tars[2]}
    main([*args, "--out", str(many)])
    assert (many / tars[2]).read_bytes() == (one / tars[2]).read_bytes()
    assert all((many / t).stat().st_mtime_ns == m for t, m in before.items())
    assert len(list((many / ".submitit").glob("*_result.pkl"))) == 4
    with pytest.raises(SystemExit) as exc:
        main([*args[:-2], "--out", str(many)])  # --jobs without --cluster
    assert exc.value.code == 2


def test_slurm_jobs_ask_for_the_workers_and_partition(tmp_path, monkeypatch):
    from data_prep.make_shards import cluster_executor

    with pytest.raises(ValueError, match="--cluster slurm: .*srun"):
        cluster_executor("slurm", tmp_path / "logs", 8, "cpu", 60)
    srun = tmp_path / "bin" / "srun"  # what submitit looks for to know it is on a cluster
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")
    params = cluster_executor("slurm", tmp_path / "logs", 8, "cpu", 60)._executor.parameters
    assert params["cpus_per_task"] == 8 and params["partition"] == "cpu"
    assert params["time"] == 60 and params["ntasks_per_node"] == 1


def _as_rank(dm, rank, world):
    dm._rank_world = lambda: (rank, world)
    return dm


def test_evaluation_shares_every_clip_once_over_ranks_in_equal_steps(shards):
    # each rank reads every shard but decodes only its share of each batch: the ranks step the
    # same number of times (a rank may get an empty batch) and together see every clip once
    ranks = []
    for rank in range(2):
        dm = ShardDataModule(
            val={"urls": str(shards / "train.json")}, num_workers=2, max_seconds_per_batch=20
        )
        ranks.append([b.id for b in _as_rank(dm, rank, 2).val_dataloader()])
    assert len(ranks[0]) == len(ranks[1]) > 1
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == 24 and len(set(seen)) == 24
    # a batch's bounds are per rank: the batches of one process with twice the bounds, each
    # split between the two ranks (batch k of one process = batch k of rank 0 + rank 1)
    one = ShardDataModule(
        val={"urls": str(shards / "train.json")},
        num_workers=2,
        max_seconds_per_batch=40,
        batch_size=128,
    )
    joint = [sorted(a + b) for a, b in zip(*ranks, strict=True)]
    assert joint == [sorted(b.id) for b in one.val_dataloader()]


def test_training_on_several_ranks_streams_equal_epochs(shards, caplog):
    dm = _as_rank(
        ShardDataModule(train={"main": {"urls": str(shards / "train.json")}}, num_workers=2),
        0,
        2,
    )
    with caplog.at_level("INFO"):
        batches = list(dm.train_dataloader())
    assert len(batches) == 2 * dm.batches_per_worker()
    assert [r.message for r in caplog.records if "data.resampled=false on 2 ranks" in r.message]


def test_resampled_mode_runs_the_indexed_epoch(shards):
    dm = ShardDataModule(
        train={"main": {"urls": str(shards / "train.json")}},
        num_workers=0,
        resampled=True,
        max_seconds_per_batch=10.0,
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.batches_per_worker() > 1
    assert all(b.audio.shape[0] * b.audio.shape[1] <= 10.0 * 16000 for b in batches)


@pytest.mark.parametrize("resampled, persistent", [(False, True), (True, True), (False, False)])
def test_each_epoch_reads_another_shard_order_and_a_rerun_the_same(shards, resampled, persistent):
    def first_ids(epoch, workers):
        dm = ShardDataModule(
            train={"main": {"urls": str(shards / "train.json")}},
            num_workers=workers,
            resampled=resampled,
            shuffle_buffer=1,  # so the order seen is the shards' order
            pool_size=1,
            batch_size=1,
            seed=5,
        )
        dm.set_epoch(epoch)
        return _ids(dm.train_dataloader())

    assert first_ids(0, 0) != first_ids(1, 0)
    assert first_ids(1, 0) == first_ids(1, 0)
    # as Lightning runs it: one loader for the whole fit, its workers kept from epoch to epoch
    # (persistent) or started again each epoch
    dm = ShardDataModule(
        train={"main": {"urls": str(shards / "train.json")}},
        num_workers=2,
        resampled=resampled,
        shuffle_buffer=1,
        pool_size=1,
        batch_size=1,
        seed=5,
        persistent_workers=persistent,
    )
    loader = dm.train_dataloader()
    torch_loader = loader.loader.pipeline[
        0
    ]  # PositionLog wraps a WebLoader, which wraps torch's DataLoader
    assert torch_loader.persistent_workers is persistent
    epochs, workers = [], []
    for epoch in range(2):
        dm.set_epoch(epoch)
        epochs.append(_ids(loader))
        workers.append(torch_loader._iterator)
    assert epochs[0] != epochs[1] and epochs[1] == first_ids(1, 2)
    if persistent:
        assert workers[0] is not None and workers[0] is workers[1]  # the same worker processes
    if not resampled:
        assert sorted(epochs[0]) == sorted(epochs[1])  # every clip, once an epoch


def test_pinned_batches_where_asked_and_by_default_only_with_a_gpu(shards):
    def loader(**kw):
        dm = ShardDataModule(
            train={"main": {"urls": str(shards / "train.json")}}, num_workers=1, **kw
        )
        return dm.train_dataloader()

    assert loader().loader.pipeline[0].pin_memory is torch.cuda.is_available()
    pinned = loader(pin_memory=True)
    assert pinned.loader.pipeline[0].pin_memory is True
    with warnings.catch_warnings():  # no accelerator here: torch says so and copies as usual
        warnings.simplefilter("ignore")
        ids = _ids(pinned)
    assert len(ids) == 24


def test_sources_mix_by_weight_and_tasks(shards):
    dm = ShardDataModule(
        train={
            "asr": {"urls": str(shards / "train.json"), "weight": 1.0, "tasks": {"transcribe": 1}},
            "st": {"urls": str(shards / "train.json"), "weight": 3.0, "tasks": {"translate_de": 1}},
        },
        num_workers=0,
        resampled=True,
        max_seconds_per_batch=8.0,
    )
    dm.batches_per_worker = lambda: 60
    tasks = [t for b in dm.train_dataloader() for t in b.task]
    share = tasks.count("translate") / len(tasks)
    assert 0.6 < share < 0.9


def _empty_wav() -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(0, np.float32), 16000, format="WAV")
    return buf.getvalue()


def _write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def test_corrupt_inputs_are_counted_not_fatal(tmp_path, synth_data):
    good_audio = encode_flac(
        load_audio(next(iter(sorted((synth_data / "audio").glob("*.flac")))), 16000), 16000
    )
    meta = lambda i, text="Hello there.": {"id": f"u{i}", "text": text}  # noqa: E731
    _write_tar(
        tmp_path / "s-000000.tar",
        [
            {"__key__": "u0", "flac": good_audio, "json": meta(0)},
            {"__key__": "u1", "flac": b"this is not flac", "json": meta(1)},
            {"__key__": "u2", "flac": good_audio, "json": meta(2, text="")},
            {"__key__": "u3", "wav": _empty_wav(), "json": meta(3)},
            {"__key__": "u4", "flac": good_audio, "json": meta(4)},
        ],
    )
    _write_tar(
        tmp_path / "s-000001.tar",
        [{"__key__": f"v{i}", "flac": good_audio, "json": meta(10 + i)} for i in range(4)],
    )
    whole = (tmp_path / "s-000001.tar").read_bytes()
    (tmp_path / "s-000001.tar").write_bytes(whole[: int(len(whole) * 0.6)])  # truncated mid-file
    (tmp_path / "s-000002.tar").write_bytes(os.urandom(3000))  # not a tar at all
    dm = ShardDataModule(
        train={"main": {"urls": str(tmp_path / "s-{000000..000002}.tar")}},
        num_workers=0,
        max_seconds_per_batch=60,
    )
    batches = list(dm.train_dataloader())
    ids = [i for b in batches for i in b.id]
    skipped = {}
    for b in batches:
        for k, v in b.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    assert {"u0", "u4"} <= set(ids) and not {"u1", "u2", "u3"} & set(ids)
    assert {"u10", "u11"} <= set(ids)  # samples before the truncation point survive
    # the truncated shard's last, cut-off clip is undecodable too
    assert (
        skipped["undecodable audio"] in (1, 2)
        and skipped["no text"] == 1
        and skipped["empty audio"] == 1
    )
    assert skipped["unreadable shard"] >= 2
    assert sum(b.num_skipped for b in batches) == sum(skipped.values())


def test_pipe_urls_stream_through_a_command(shards):
    # the same path object storage takes: `pipe:aws s3 cp s3://bucket/x.tar -`, here `pipe:cat x.tar`
    urls = [f"pipe:cat {p}" for p in sorted(shards.glob("train-*.tar"))]
    dm = ShardDataModule(train={"main": {"urls": urls}}, val={"urls": urls}, num_workers=0)
    assert len(_ids(dm.val_dataloader())) == 24


def test_remote_shards_know_their_epoch_from_an_index_or_a_length(shards, synth_data, tmp_path):
    """Uploaded shards streamed through pipe: commands on several ranks: the index make_shards
    writes for them (--remote-url), or a brace pattern and the source's seconds."""
    from data_prep.make_shards import main as make_shards_cli
    from sparqle.data.shards import read_index, remote_index

    local = read_index(shards / "train.json")
    remote = tmp_path / "train.remote.json"
    remote_index(shards / "train.json", f"pipe:cat {shards}/{{name}}", remote)
    index = read_index(remote)
    assert [s["url"] for s in index["shards"]] == [
        f"pipe:cat {shards}/{s['url']}" for s in local["shards"]
    ]
    assert [s["samples"] for s in index["shards"]] == [s["samples"] for s in local["shards"]]

    def module(urls, **src):
        dm = ShardDataModule(train={"main": {"urls": urls, **src}}, num_workers=0, resampled=True)
        dm._rank_world = lambda: (0, 2)
        return dm

    by_index = module(str(remote))
    assert by_index.batches_per_worker() == module(str(shards / "train.json")).batches_per_worker()
    assert len(_ids(by_index.train_dataloader())) > 0  # read through `cat`
    n = len(local["shards"]) - 1
    pattern = f"pipe:cat {shards}/train-{{000000..{n:06d}}}.tar"
    seconds = sum(s["seconds"] for s in local["shards"])
    assert module(pattern, seconds=seconds).batches_per_worker() == by_index.batches_per_worker()
    with pytest.raises(ValueError, match=r"data.train.main.seconds"):
        module(pattern).batches_per_worker()
    # the command line writes it beside the index
    out = tmp_path / "made"
    make_shards_cli(
        ["--manifest", str(synth_data / "val.jsonl"), "--out", str(out), "--split", "val"]
        + ["--remote-url", "pipe:aws s3 cp s3://bucket/val/{name} -"]
    )
    urls = [s["url"] for s in read_index(out / "val.remote.json")["shards"]]
    assert urls == [f"pipe:aws s3 cp s3://bucket/val/val-{i:06d}.tar -" for i in range(len(urls))]
