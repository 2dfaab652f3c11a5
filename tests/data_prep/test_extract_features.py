"""Feature shards: a frozen encoder's output per clip, written once, trained on without it."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from data_prep.extract_features import extract_features, main
from data_prep.make_shards import make_shards
from sparqle.data.audio import load_audio
from sparqle.data.shard_datamodule import ShardDataModule
from sparqle.data.shards import FEATURES, read_index
from sparqle.models.encoder import SpeechEncoder


def _overrides(tiny_dir: Path) -> list[str]:
    return ["encoder=tiny", f"paths.cache_dir={tiny_dir}", "encoder.layer=1"]


@pytest.fixture(scope="module")
def audio_shards(synth_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audio")
    make_shards(synth_data / "train.jsonl", out, "train", shard_size_mb=0.1, seed=0)
    make_shards(synth_data / "val.jsonl", out, "val", shard_size_mb=0.1, seed=0)
    return out


@pytest.fixture(scope="module")
def features(audio_shards, tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features")
    for split in ("train", "val"):
        extract_features(audio_shards / f"{split}.json", out, _overrides(tiny_dir))
    return out


def test_features_are_the_encoders_output_in_the_audio_shards_order(audio_shards, features, tiny):
    index = read_index(features / "train.json")
    audio_index = read_index(audio_shards / "train.json")
    encoder = SpeechEncoder(tiny["encoder"], layer=1).eval()
    record = index["features"]
    assert record["layer"] == 1 and record["dtype"] == "float32"
    assert record["hidden_size"] == encoder.hidden_size
    assert record["frame_rate"] == encoder.frame_rate and record["sample_rate"] == 16000
    assert Path(record["encoder"]).name == Path(tiny["encoder"]).name
    assert index["num_samples"] == audio_index["num_samples"] == 18
    assert [s["samples"] for s in index["shards"]] == [s["samples"] for s in audio_index["shards"]]
    for shard in sorted(features.glob("train-*.tar"))[:2]:
        source = audio_shards / shard.name
        pairs = zip(
            wds.WebDataset(str(shard), shardshuffle=False),
            wds.WebDataset(str(source), shardshuffle=False),
            strict=True,
        )
        for feat, audio in pairs:
            assert feat["__key__"] == audio["__key__"]
            meta = json.loads(feat["json"])
            stored = torch.load(io.BytesIO(feat[FEATURES]), weights_only=True)
            wave = torch.from_numpy(load_audio(audio["flac"], 16000))
            with torch.inference_mode():
                want = encoder(wave[None], torch.tensor([len(wave)])).features[0]
            assert stored.shape == want.shape and meta["frames"] == want.shape[0]
            torch.testing.assert_close(stored, want, atol=1e-4, rtol=1e-4)  # batched vs alone
            assert meta["text"] == json.loads(audio["json"])["text"]


def test_a_killed_extraction_resumes_and_ranks_split_the_shards(
    audio_shards, features, tiny_dir, tmp_path, monkeypatch
):
    # two ranks, one after the other: rank 0 leaves the index to whoever finishes last
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        index = extract_features(audio_shards / "train.json", tmp_path, _overrides(tiny_dir))
        assert (index is None) == (rank == 0)
    tars = sorted(p.name for p in features.glob("train-*.tar"))
    assert tars == sorted(p.name for p in tmp_path.glob("train-*.tar"))
    assert all((tmp_path / t).read_bytes() == (features / t).read_bytes() for t in tars)
    assert (tmp_path / "train.json").read_text() == (features / "train.json").read_text()
    # killed: one shard gone, a temp file left; the rerun writes that one and keeps the rest
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    (tmp_path / tars[1]).unlink()
    (tmp_path / f".{tars[1]}.999.tmp").write_bytes(b"half")
    kept = {t: (tmp_path / t).stat().st_mtime_ns for t in tars if t != tars[1]}
    extract_features(audio_shards / "train.json", tmp_path, _overrides(tiny_dir))
    assert (tmp_path / tars[1]).read_bytes() == (features / tars[1]).read_bytes()
    assert all((tmp_path / t).stat().st_mtime_ns == m for t, m in kept.items())


def test_broken_audio_is_skipped_and_counted(audio_shards, tiny_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    samples = [
        s
        for shard in sorted(audio_shards.glob("train-*.tar"))
        for s in wds.WebDataset(str(shard), shardshuffle=False)
    ]
    with wds.TarWriter(str(src / "train-000000.tar")) as sink:
        for i, s in enumerate(samples):
            sink.write(
                {
                    "__key__": s["__key__"],
                    "flac": b"garbage" if i == 0 else s["flac"],
                    "json": s["json"],
                }
            )
    # a second shard cut off in the middle of its last member
    whole = (src / "train-000000.tar").read_bytes()
    (src / "train-000001.tar").write_bytes(whole[: len(whole) // 2])
    index = {"split": "train", "shards": [{"url": f"train-00000{i}.tar"} for i in (0, 1)]}
    (src / "train.json").write_text(json.dumps(index))
    out = extract_features(src / "train.json", tmp_path / "out", _overrides(tiny_dir))
    assert out["skipped"]["undecodable audio"] == 2  # the garbage clip, in both shards
    assert out["skipped"]["unreadable shard"] >= 1
    assert out["shards"][0]["samples"] == len(samples) - 1
    assert 0 < out["shards"][1]["samples"] < len(samples) - 1


def _rewrite(src: Path, dst: Path, change) -> None:
    """A copy of a feature shard with the features of member i replaced by change(i, tensor)."""
    with tarfile.open(src) as tar, wds.TarWriter(str(dst)) as sink:
        samples = list(wds.WebDataset(str(src), shardshuffle=False))
        assert tar.getnames()
        for i, s in enumerate(samples):
            buf = io.BytesIO()
            torch.save(change(i, torch.load(io.BytesIO(s[FEATURES]), weights_only=True)), buf)
            sink.write({"__key__": s["__key__"], FEATURES: buf.getvalue(), "json": s["json"]})


def test_bad_feature_shards_are_skipped_and_counted_not_fatal(features, tmp_path):
    shards = sorted(features.glob("train-*.tar"))
    index = read_index(features / "train.json")
    bad = tmp_path / "bad"
    bad.mkdir()

    def nan_first(i, t):
        return t.fill_(float("nan")) if i == 0 else t

    def narrow_second(i, t):
        return t[:, :3] if i == 1 else t

    _rewrite(shards[0], bad / shards[0].name, nan_first)
    _rewrite(shards[1], bad / shards[1].name, narrow_second)
    whole = shards[2].read_bytes()
    (bad / shards[2].name).write_bytes(whole[: len(whole) // 2])  # truncated
    for s in shards[3:]:
        (bad / s.name).write_bytes(s.read_bytes())
    (bad / "train.json").write_text(json.dumps(index))
    dm = ShardDataModule(
        train={"main": {"urls": str(bad / "train.json")}}, num_workers=0, max_seconds_per_batch=20
    )
    seen, skipped = [], {}
    for b in dm.train_dataloader():
        seen += b.id
        assert b.features.shape[-1] == index["features"]["hidden_size"]
        assert torch.isfinite(b.features).all()
        assert b.feature_lens.max() == b.features.shape[1]
        for k, n in b.skipped.items():
            skipped[k] = skipped.get(k, 0) + n
    # the cut shard may end in a partial member: bad features too, or just the tar error
    assert skipped["NaN features"] == 1 and skipped["bad features"] in (1, 2)
    assert skipped["unreadable shard"] >= 1
    keys = [
        [s["__key__"] for s in wds.WebDataset(str(shard), shardshuffle=False)] for shard in shards
    ]
    whole_shards = {k for i, ks in enumerate(keys) if i != 2 for k in ks}
    assert set(seen) == whole_shards - {keys[0][0], keys[1][1]} | (set(seen) & set(keys[2]))
    assert len(seen) == len(set(seen))


def test_mixing_audio_and_feature_shards_or_two_encoders_is_refused(
    audio_shards, features, tmp_path
):
    from sparqle.data.shards import data_features, feature_record

    data = {
        "_target_": "sparqle.data.shard_datamodule.ShardDataModule",
        "train": {"main": {"urls": str(features / "train.json")}},
        "val": {"urls": str(audio_shards / "val.json")},
    }
    with pytest.raises(ValueError, match="data.val.urls=.*: audio shards, while data.train.main"):
        data_features(data)

    other = json.loads((features / "val.json").read_text())
    other["features"]["layer"] = 2
    (tmp_path / "val.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="data.val.urls=.*layer 2, but data.train.main"):
        feature_record(
            {
                "data.train.main": {"urls": str(features / "train.json")},
                "data.val": {"urls": str(tmp_path / "val.json")},
            }
        )


def test_the_cli_takes_encoder_overrides_only(audio_shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--shards", str(audio_shards / "val.json"), "--out", str(tmp_path), "stage=pretrain"])
    assert stop.value.code == 2
    assert "stage=pretrain: only encoder" in capsys.readouterr().err
