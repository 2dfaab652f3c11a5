import json

from sparqle.data.manifest_datamodule import ManifestDataModule


def test_batches_decode_and_skip_unreadable_clips(synth_data, tmp_path):
    lines = (synth_data / "train.jsonl").read_text().splitlines()[:5]
    (tmp_path / "broken.flac").write_bytes(b"garbage")
    bad = json.loads(lines[0]) | {"id": "broken", "audio": str(tmp_path / "broken.flac")}
    missing = json.loads(lines[0]) | {"id": "missing", "audio": str(tmp_path / "gone.flac")}
    good = [json.loads(x) | {"audio": str(synth_data / json.loads(x)["audio"])} for x in lines]
    rows = [*good[:2], bad, *good[2:], missing]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    dm = ManifestDataModule(
        train_manifest=str(tmp_path / "m.jsonl"), batch_size=7, tasks={"transcribe": 1}
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_skipped == 2
    assert sorted(batch.id) == sorted(r["id"] for r in good)
    assert batch.audio.shape[0] == 5 and batch.audio.dtype.is_floating_point
    for i, n in enumerate(batch.audio_lens.tolist()):
        assert batch.audio[i, n:].abs().sum() == 0 and batch.audio[i, :n].abs().sum() > 0
    assert batch.target == batch.text


def test_clips_outside_the_seconds_range_are_skipped_and_counted(synth_data, tmp_path):
    """A clip shorter than one encoder frame gives no features, then a NaN loss: never trained."""
    import numpy as np
    import soundfile as sf

    rows = [json.loads(x) for x in (synth_data / "train.jsonl").read_text().splitlines()[:3]]
    rows = [r | {"audio": str(synth_data / r["audio"])} for r in rows]
    sf.write(tmp_path / "blip.wav", np.zeros(300, dtype=np.float32), 16000)  # 19 ms
    rows.append(rows[0] | {"id": "blip", "audio": str(tmp_path / "blip.wav")})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = ManifestDataModule(train_manifest=str(tmp_path / "m.jsonl"), batch_size=8, min_seconds=1.0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_skipped == 1 and "blip" not in batch.id and len(batch.id) == 3
