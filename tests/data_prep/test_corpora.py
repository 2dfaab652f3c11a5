"""Each corpus builder on a tiny fake tree in the corpus's published layout."""

import csv

import numpy as np
import pytest
import soundfile as sf

from data_prep import covost2, librispeech, mustc
from sparqle.data.audio import load_audio


def _tone(seconds: float, sr: int) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_librispeech(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    chapter.mkdir(parents=True)
    (chapter / "84-121123.trans.txt").write_text(
        "84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n84-121123-0002 MISSING FILE\n"
    )
    for i, sec in enumerate([1.0, 2.0]):
        sf.write(chapter / f"84-121123-000{i}.flac", _tone(sec, 16000), 16000)
    utts, skipped = librispeech.build(tmp_path / "LibriSpeech", "dev-clean")
    assert [u.id for u in utts] == ["84-121123-0000", "84-121123-0001"]
    assert utts[0].text == "GO DO YOU HEAR" and utts[0].speaker == "84"
    assert utts[1].duration == pytest.approx(2.0)
    assert skipped == {"missing audio": 1}
    assert (
        librispeech.build(tmp_path / "LibriSpeech", "dev-clean", lowercase=True)[0][0].text
        == "go do you hear"
    )
    with pytest.raises(FileNotFoundError, match="train-other-500"):
        librispeech.build(tmp_path / "LibriSpeech", "train-other-500")


def _write_tsv(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(
            f, fieldnames=list(rows[0]), delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\"
        )
        w.writeheader()
        w.writerows(rows)


def test_covost2_with_transcripts_from_common_voice(tmp_path):
    cv = tmp_path / "cv" / "en"
    (cv / "clips").mkdir(parents=True)
    for name in ("common_voice_en_1.mp3", "common_voice_en_2.mp3", "common_voice_en_3.mp3"):
        sf.write(cv / "clips" / name, _tone(1.5, 48000), 48000, format="MP3")
    _write_tsv(
        cv / "validated.tsv",
        [
            {"client_id": "c1", "path": "common_voice_en_1.mp3", "sentence": "Hello world."},
            {"client_id": "c2", "path": "common_voice_en_2.mp3", "sentence": "Good morning."},
            {"client_id": "c3", "path": "common_voice_en_3.mp3", "sentence": "See you."},
        ],
    )
    tsv = tmp_path / "covost_v2.en_de.tsv"
    _write_tsv(
        tsv,
        [
            {"path": "common_voice_en_1.mp3", "translation": "Hallo Welt.", "split": "train"},
            {"path": "common_voice_en_2.mp3", "translation": "Guten Morgen.", "split": "dev"},
            {"path": "common_voice_en_3.mp3", "translation": "Bis bald.", "split": "train"},
            {"path": "common_voice_en_9.mp3", "translation": "Fehlt.", "split": "train"},
        ],
    )
    utts, skipped = covost2.build(cv, tsv, "train")
    assert [(u.text, u.translation) for u in utts] == [
        ("Hello world.", {"de": "Hallo Welt."}),
        ("See you.", {"de": "Bis bald."}),
    ]
    assert utts[0].lang == "en" and skipped["missing audio"] == 1
    audio = load_audio(utts[0].audio, 16000)  # MP3 at 48 kHz decodes and resamples
    assert abs(len(audio) / 16000 - 1.5) < 0.1


def test_mustc_cuts_segments(tmp_path):
    root = tmp_path / "en-de"
    txt, wav = root / "data" / "dev" / "txt", root / "data" / "dev" / "wav"
    txt.mkdir(parents=True)
    wav.mkdir(parents=True)
    talk = np.concatenate([_tone(2.0, 16000), np.zeros(16000, np.float32), _tone(1.0, 16000) * 0.5])
    sf.write(wav / "ted_1.wav", talk, 16000)
    (txt / "dev.yaml").write_text(
        "- {duration: 2.0, offset: 0.0, rw: 1, speaker_id: spk.1, wav: ted_1.wav}\n"
        "- {duration: 1.0, offset: 3.0, rw: 1, speaker_id: spk.1, wav: ted_1.wav}\n"
        "- {duration: 1.0, offset: 0.0, rw: 1, speaker_id: spk.2, wav: ted_2.wav}\n"
    )
    (txt / "dev.en").write_text("First sentence.\nSecond one.\nNo audio.\n")
    (txt / "dev.de").write_text("Erster Satz.\nZweiter.\nKein Ton.\n")
    utts, skipped = mustc.build(root, "dev", tmp_path / "out")
    assert [u.id for u in utts] == ["ted_1_00000", "ted_1_00001"]
    assert utts[1].translation == {"de": "Zweiter."} and skipped["missing talk audio"] == 1
    second = load_audio(tmp_path / "out" / utts[1].audio, 16000)
    assert len(second) == 16000 and np.abs(second).max() == pytest.approx(0.15, abs=0.01)

    (txt / "dev.de").write_text("only one line\n")
    with pytest.raises(ValueError, match="3 segments but 3 English and 1 de lines"):
        mustc.build(root, "dev", tmp_path / "out")
