import json
import random

import soundfile as sf

from data_prep.grammar import (
    ADJECTIVES,
    OBJECTS,
    SUBJECTS,
    noun_phrase,
    sample_sentence,
    unique_sentences,
)


def _entry(table, english):
    return next(row for row in table if row[0] == english)


def test_noun_phrases_inflect_correctly():
    man, table, house = _entry(SUBJECTS, "man"), _entry(OBJECTS, "table"), _entry(OBJECTS, "house")
    big, red = _entry(ADJECTIVES, "big"), _entry(ADJECTIVES, "red")
    assert noun_phrase(man, big, "nom") == ("the big man", "der große Mann", "le grand monsieur")
    assert noun_phrase(table, big, "acc") == (
        "the big table",
        "den großen Tisch",
        "la grande table",
    )
    assert noun_phrase(house, red, "acc") == ("the red house", "das rote Haus", "la maison rouge")
    assert noun_phrase(table, None, "acc") == ("the table", "den Tisch", "la table")


def test_sentences_are_unique_deterministic_and_punctuated():
    rng = random.Random(0)
    for s in (sample_sentence(rng) for _ in range(200)):
        assert (
            s.en[0].isupper() and s.en.endswith(".") and s.de.endswith(".") and s.fr.endswith(".")
        )
        assert len(s.en.split()) >= 3
    assert len({s.en for s in unique_sentences(50, seed=1)}) == 50
    assert unique_sentences(20, seed=1) == unique_sentences(20, seed=1)


def test_synthesised_corpus(synth_data):
    rows = [json.loads(x) for x in (synth_data / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and len({r["speaker"] for r in rows}) >= 4
    for r in rows[:5]:
        info = sf.info(synth_data / r["audio"])
        assert info.samplerate == 16000 and info.channels == 1 and info.format == "FLAC"
        assert 0.5 < info.duration < 8 and abs(info.duration - r["duration"]) < 0.01
        assert set(r["translation"]) == {"de", "fr"}
    train = (synth_data / "train.jsonl").read_text().splitlines()
    val = (synth_data / "val.jsonl").read_text().splitlines()
    assert len(train) == 18 and len(val) == 6


def test_split_holds_out_sentences_and_voices(tmp_path):
    from data_prep.synth_speech import main

    main(
        [
            "--out",
            str(tmp_path),
            "--n",
            "12",
            "--val-fraction",
            "0.25",
            "--voices",
            "espeak-ng:en-us+m1,flite:slt",
            "--heldout-voices",
            "flite:awb,festival:cmu_us_slt_arctic_hts",
        ]
    )
    train = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert len(train) == 9 and len(val) == 3
    assert {r["speaker"] for r in train} == {"espeak-ng:en-us+m1", "flite:slt"}
    assert {r["speaker"] for r in val} <= {"flite:awb", "festival:cmu_us_slt_arctic_hts"}
    assert not {r["text"] for r in train} & {r["text"] for r in val}
    for r in train + val:
        info = sf.info(tmp_path / r["audio"])
        assert info.samplerate == 16000 and 0.5 < info.duration < 8
