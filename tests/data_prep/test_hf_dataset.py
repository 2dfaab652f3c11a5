"""data_prep.hf_dataset on sources built here from synthesised speech: a `datasets.Dataset` with an
`Audio` column, saved to parquet and with save_to_disk, read into manifests as users run it."""

import io
import json

import numpy as np
import pytest
import soundfile as sf

from data_prep.hf_dataset import main
from sparqle.data.manifest import read_manifest


@pytest.fixture(scope="module")
def hf_sources(synth_data, tmp_path_factory):
    """Eight clips as a hub dataset holds them, plus a resampled stereo WAV, undecodable bytes,
    an empty and a missing transcript. Returns (parquet file, save_to_disk folder, rows)."""
    from datasets import Audio, Dataset, DatasetDict, Features, Value

    utts = read_manifest(synth_data / "train.jsonl")[:8]
    rows = []
    for u in utts:
        data = (synth_data / u.audio).read_bytes()
        rows.append(
            {
                "audio": {"bytes": data, "path": u.audio},
                "sentence": u.text,
                "translation": u.translation["de"],
                "client_id": u.speaker,
                "id": u.id,
            }
        )
    samples, sr = sf.read(synth_data / utts[0].audio, dtype="float32")
    at_44k = np.interp(np.arange(0, len(samples), sr / 44100), np.arange(len(samples)), samples)
    wav = io.BytesIO()
    sf.write(wav, np.stack([at_44k, at_44k], axis=1), 44100, format="WAV")  # stereo, 44.1 kHz
    rows.append(
        {
            "audio": {"bytes": wav.getvalue(), "path": "x.wav"},
            "sentence": "A wav clip.",
            "translation": "Ein Clip.",
            "client_id": "s",
            "id": "stereo-wav",
        }
    )
    rows.append(
        {
            "audio": {"bytes": b"not audio", "path": "bad.flac"},
            "sentence": "Lost.",
            "translation": "Weg.",
            "client_id": "s",
            "id": "bad",
        }
    )
    rows.append({**rows[1], "id": "blank", "sentence": "   "})
    rows.append({**rows[2], "id": "none", "sentence": None})
    features = Features(
        {
            "audio": {"bytes": Value("binary"), "path": Value("string")},
            **{k: Value("string") for k in ("sentence", "translation", "client_id", "id")},
        }
    )
    ds = Dataset.from_list(rows, features=features).cast_column("audio", Audio(decode=False))
    out = tmp_path_factory.mktemp("hf")
    ds.to_parquet(str(out / "train-00000.parquet"))
    DatasetDict({"train": ds}).save_to_disk(str(out / "disk"))
    return out / "train-00000.parquet", out / "disk", rows


FLAGS = [
    "--text",
    "sentence",
    "--translation",
    "de=translation",
    "--speaker",
    "client_id",
    "--id",
    "id",
    "--split",
    "train",
]


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.*"))}


def test_every_clip_and_text_arrives_bad_rows_are_counted_and_a_rerun_is_identical(
    hf_sources, synth_data, tmp_path, capsys
):
    parquet, disk, rows = hf_sources
    main(["--source", str(parquet), "--out", str(tmp_path / "a"), *FLAGS])
    said = capsys.readouterr().err
    assert "9 clips" in said
    assert "'undecodable audio': 1, 'empty text': 2, 'missing translation': 0" in said
    utts = {u.id: u for u in read_manifest(tmp_path / "a" / "train.jsonl")}
    assert list(utts)[:8] == [r["id"] for r in rows[:8]] and "stereo-wav" in utts
    for row in rows[:8]:  # 16 kHz mono FLAC already: kept byte for byte
        u = utts[row["id"]]
        assert (u.text, u.translation, u.speaker) == (
            row["sentence"],
            {"de": row["translation"]},
            row["client_id"],
        )
        assert (tmp_path / "a" / u.audio).read_bytes() == row["audio"]["bytes"]
    wav = utts["stereo-wav"]  # decoded, mixed to mono, written as 16 kHz FLAC
    info = sf.info(tmp_path / "a" / wav.audio)
    assert (info.samplerate, info.channels) == (16000, 1)
    assert wav.duration == pytest.approx(utts[rows[0]["id"]].duration, abs=0.01)

    # the same rows from a save_to_disk folder, and a rerun over the first output
    main(["--source", str(disk), "--out", str(tmp_path / "b"), *FLAGS])
    main(["--source", str(parquet), "--out", str(tmp_path / "a"), *FLAGS])
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_a_wrong_column_or_source_is_one_line(hf_sources, tmp_path, capsys):
    parquet, _, _ = hf_sources
    with pytest.raises(SystemExit) as exit_:
        main(["--source", str(parquet), "--out", str(tmp_path), *FLAGS, "--text", "transcript"])
    assert exit_.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("error: --text transcript: no such column (the rows hold audio, sentence")
    )
    with pytest.raises(SystemExit):
        main(["--source", str(tmp_path / "none.parquet"), "--out", str(tmp_path), *FLAGS])
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --source ")


def test_two_workers_write_the_same_clips_and_go_on_into_shards(hf_sources, tmp_path, capsys):
    """--workers 2 decodes in processes and keeps the row order; --shards writes make_shards'
    shards from the split, each 16 kHz FLAC clip in them byte for byte as the dataset held it."""
    import webdataset as wds

    parquet, _, rows = hf_sources
    main(["--source", str(parquet), "--out", str(tmp_path / "one"), *FLAGS])
    argv = ["--source", str(parquet), "--out", str(tmp_path / "two"), *FLAGS, "--workers", "2"]
    main([*argv, "--shards", str(tmp_path / "shards"), "--shard-size-mb", "0.05"])
    said = capsys.readouterr().err
    assert "train: 9 samples" in said and "shards" in said
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    index = json.loads((tmp_path / "shards" / "train.json").read_text())
    assert index["num_samples"] == 9 and len(index["shards"]) > 1
    held = {r["id"]: r["audio"]["bytes"] for r in rows[:8]}
    seen = set()
    for shard in sorted((tmp_path / "shards").glob("train-*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            uid = json.loads(sample["json"])["id"]
            seen.add(uid)
            if uid in held:
                assert sample["flac"] == held[uid]
    assert seen == {r["id"] for r in rows[:9]}
    before = _files(tmp_path / "shards")
    main([*argv, "--shards", str(tmp_path / "shards"), "--shard-size-mb", "0.05"])  # a rerun
    assert _files(tmp_path / "shards") == before
