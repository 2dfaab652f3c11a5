"""data_prep.lhotse on manifests built here: synthesised utterances placed inside two longer
recordings (one stereo), a supervision per utterance, a recording whose file is gone."""

import json

import numpy as np
import pytest
import soundfile as sf

from data_prep.lhotse import main
from sparqle.data.manifest import read_manifest

GAP = 0.5  # seconds of silence around each utterance in a recording


@pytest.fixture(scope="module")
def lhotse_sources(synth_data, tmp_path_factory):
    """(cuts manifest, recordings manifest, supervisions manifest, {supervision id: samples})."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    out = tmp_path_factory.mktemp("lhotse")
    utts = read_manifest(synth_data / "train.jsonl")[:6]
    recordings, sups, clips = [], [], {}
    for r, (group, channels) in enumerate(((utts[:3], 1), (utts[3:], 2))):
        parts, t = [], GAP
        for u in group:
            samples, sr = sf.read(synth_data / u.audio, dtype="float32")
            sid = f"rec{r}-{u.id}"
            sups.append(
                SupervisionSegment(
                    id=sid,
                    recording_id=f"rec{r}",
                    channel=list(range(channels)) if channels > 1 else 0,
                    start=t,
                    duration=len(samples) / sr,
                    text=u.text,
                    speaker=u.speaker,
                    language="English",
                    custom={"translation": {"de": u.translation["de"]}},
                )
            )
            clips[sid] = samples
            parts += [np.zeros(int(GAP * sr), np.float32), samples]
            t += GAP + len(samples) / sr
        audio = np.concatenate([*parts, np.zeros(int(GAP * sr), np.float32)])
        if channels == 2:  # two microphones, the second at half the level: the mix is 3/4
            audio = np.stack([audio, audio / 2], axis=1)
        sf.write(out / f"rec{r}.flac", audio, sr, subtype="PCM_16")
        recordings.append(Recording.from_file(out / f"rec{r}.flac", recording_id=f"rec{r}"))
    # a supervision without text, and a recording whose file is gone
    sups.append(
        SupervisionSegment(
            id="rec0-silence", recording_id="rec0", start=0.0, duration=GAP / 2, text=""
        )
    )
    sf.write(out / "gone.flac", np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    recordings.append(Recording.from_file(out / "gone.flac", recording_id="gone"))
    sups.append(
        SupervisionSegment(
            id="gone-0", recording_id="gone", start=0.0, duration=0.5, text="never read"
        )
    )
    (out / "gone.flac").unlink()
    RecordingSet.from_recordings(recordings).to_file(out / "recordings.jsonl.gz")
    SupervisionSet.from_segments(sups).to_file(out / "supervisions.jsonl.gz")
    cuts = CutSet.from_manifests(
        recordings=RecordingSet.from_recordings(recordings),
        supervisions=SupervisionSet.from_segments(sups),
    ).trim_to_supervisions(keep_overlapping=False)
    cuts.to_file(out / "cuts.jsonl.gz")
    return out / "cuts.jsonl.gz", out / "recordings.jsonl.gz", out / "supervisions.jsonl.gz", clips


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.*"))}


def test_each_cut_becomes_its_clip_with_its_text_and_translation(
    lhotse_sources, synth_data, tmp_path, capsys
):
    cuts, recordings, supervisions, clips = lhotse_sources
    main(["--cuts", str(cuts), "--split", "train", "--out", str(tmp_path / "a")])
    said = capsys.readouterr().err
    assert "6 clips" in said and "'unreadable audio': 1, 'empty text': 1" in said
    by_id = {u.id: u for u in read_manifest(tmp_path / "a" / "train.jsonl")}
    source = {
        f"rec{0 if i < 3 else 1}-{u.id}": u
        for i, u in enumerate(read_manifest(synth_data / "train.jsonl")[:6])
    }
    assert set(by_id) == set(source)
    for sid, u in by_id.items():
        assert (u.text, u.translation, u.speaker, u.lang) == (
            source[sid].text,
            {"de": source[sid].translation["de"]},
            source[sid].speaker,
            "en",
        )
        got, sr = sf.read(tmp_path / "a" / u.audio, dtype="float32")
        want = clips[sid] * (0.75 if sid.startswith("rec1") else 1)  # both channels mixed
        assert sr == 16000 and abs(len(got) - len(want)) <= 1
        n = min(len(got), len(want))
        assert np.abs(got[:n] - want[:n]).max() < 2e-3  # the utterance, cut where it lies

    # recordings + supervisions give the same clips; --channel 1 keeps the second microphone
    main(
        [
            "--recordings",
            str(recordings),
            "--supervisions",
            str(supervisions),
            "--split",
            "train",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    main(["--cuts", str(cuts), "--split", "train", "--out", str(tmp_path / "a")])  # a rerun
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    main(["--cuts", str(cuts), "--split", "train", "--out", str(tmp_path / "c"), "--channel", "1"])
    u = next(u for u in read_manifest(tmp_path / "c" / "train.jsonl") if u.id.startswith("rec1"))
    got, _ = sf.read(tmp_path / "c" / u.audio, dtype="float32")
    assert np.abs(got - clips[u.id][: len(got)] / 2).max() < 2e-3


def test_missing_manifests_and_bad_flags_are_one_line(tmp_path, capsys):
    for argv, named in (
        (["--cuts", str(tmp_path / "none.jsonl.gz")], "--cuts"),
        (["--recordings", str(tmp_path / "none.jsonl.gz")], "--recordings"),
        (["--translation", "de"], "--translation de"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--split", "train", "--out", str(tmp_path)])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {named}")


def test_a_shar_folder_gives_the_cuts_clips_and_goes_on_into_shards(
    lhotse_sources, tmp_path, capsys
):
    """Lhotse Shar (cuts + FLAC recording shards, as `CutSet.to_shar` writes them): the same clips
    as the cuts manifest, read by 2 workers, then --shards writes make_shards' shards."""
    from lhotse import CutSet

    cuts, _, _, _ = lhotse_sources
    shar = tmp_path / "shar"
    readable = CutSet.from_file(cuts).filter(lambda c: c.recording_id != "gone")
    shar.mkdir()
    readable.to_shar(shar, fields={"recording": "flac"}, shard_size=2)
    main(["--cuts", str(cuts), "--split", "train", "--out", str(tmp_path / "a")])
    argv = ["--shar", str(shar), "--split", "train", "--out", str(tmp_path / "b"), "--workers", "2"]
    main([*argv, "--shards", str(tmp_path / "shards")])
    said = capsys.readouterr().err
    assert "train: 6 samples" in said
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert json.loads((tmp_path / "shards" / "train.json").read_text())["num_samples"] == 6
    with pytest.raises(SystemExit) as exit_:
        main(["--shar", str(tmp_path), "--split", "train", "--out", str(tmp_path / "c")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --shar ")
