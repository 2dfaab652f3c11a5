"""`make demo-open`'s pieces: the sentence source (the Debian packages `make setup` installs), its
split (no held-out sentence trained on, never-heard words really unheard), the never-heard
recall, and a few stage-2 steps of the open preset on tiny models, as the Makefile runs them."""

from __future__ import annotations

import json

import pytest

from data_prep import open_sentences
from demo.open_vocab import never_heard_recall
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    out = tmp_path_factory.mktemp("open-text")
    open_sentences.main(["--out", str(out), "--heldout", "100", "--max-train", "2000"])
    return out


def _lines(path) -> list[str]:
    return path.read_text().splitlines()


def test_sentences_come_from_wordnet_and_fortunes_normalised_as_spoken():
    wordnet = open_sentences.collect(open_sentences.wordnet_examples())
    fortunes = open_sentences.collect(open_sentences.fortune_sentences())
    assert len(wordnet) > 20000 and len(fortunes) > 3000
    for text in wordnet[:500] + fortunes[:500]:
        words = text.split()
        assert 5 <= len(words) <= 14 and text == text.lower()
        assert all(w.replace("'", "").isalpha() for w in words), text
    assert open_sentences.normalise("In 1984, the 3 dogs ran home!") == (
        "in one thousand nine hundred eighty four the three dogs ran home"
    )
    for unsaid in (
        "The 20th century was long and cold",
        "He paid $5 for the old book",
        "It is NASA's best rocket ever",
    ):
        assert open_sentences.normalise(unsaid) is None, unsaid


def test_held_out_sentences_and_never_heard_words_are_not_in_training(sentences):
    train, held = _lines(sentences / "train.txt"), _lines(sentences / "heldout.txt")
    never = _lines(sentences / "never_heard.txt")
    assert len(train) == 2000 and len(held) == 100 and len(set(held)) == 100
    assert not set(held) & set(train)
    heard = {w for s in train for w in s.split()}
    held_words = {w for s in held for w in s.split()}
    assert never and not set(never) & heard and set(never) <= held_words
    assert set(never) == held_words - heard  # every unheard word is listed
    summary = json.loads((sentences / "summary.json").read_text())
    assert summary["never_heard_words"] == len(never) and summary["train"] == 2000
    # the split is seeded: the same command gives the same files
    again = sentences.parent / "again"
    open_sentences.main(["--out", str(again), "--heldout", "100", "--max-train", "2000"])
    for name in ("train.txt", "heldout.txt", "never_heard.txt"):
        assert (again / name).read_bytes() == (sentences / name).read_bytes()


def test_never_heard_recall_counts_each_occurrence_after_normalisation():
    pairs = [
        ("The Zebra saw a zebra", "the zebra saw one"),
        ("a quokka smiled", "A QUOKKA smiled."),
    ]
    assert never_heard_recall(pairs, ["zebra", "quokka", "absent"]) == (2, 3)


@pytest.mark.slow
def test_a_few_stage_two_steps_of_the_open_preset_on_tiny_models(sentences, tiny, tmp_path):
    """Speech of the open sentences -> shards -> feature shards of a tiny Whisper encoder ->
    train.py experiment=demo_open with the tiny LLM, as `make demo-open` runs each step."""
    from data_prep.extract_features import main as extract
    from data_prep.make_shards import make_shards
    from data_prep.synth_speech import main as synth

    data = tmp_path / "data"
    synth(
        [
            "--out",
            str(data),
            "--sentences",
            str(sentences / "train.txt"),
            "--n",
            "12",
            "--split",
            "train",
        ]
    )
    synth(
        [
            "--out",
            str(data),
            "--sentences",
            str(sentences / "heldout.txt"),
            "--n",
            "4",
            "--split",
            "val_sentences",
        ]
    )
    encoder = ["encoder=whisper_tiny_en", f"encoder.name_or_path={tiny['whisper']}"]
    encoder.append("encoder.whisper_window_seconds=8")
    for split in ("train", "val_sentences"):
        make_shards(data / f"{split}.jsonl", data / "shards", split, shard_size_mb=0.1)
        extract(
            [
                "--shards",
                str(data / "shards" / f"{split}.json"),
                "--out",
                str(data / "features"),
                *encoder,
            ]
        )
    proc = run_cli(
        "train.py",
        "experiment=demo_open",
        "stage=instruct",
        *encoder[1:],
        "encoder.dtype=float32",
        f"llm.name_or_path={tiny['llm']}",
        "llm.dtype=float32",
        "trainer.precision=32-true",
        f"paths.data_dir={data}",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "val_every_n_steps=3",
        "data.batch_size=4",
        "callbacks.progress_bar=null",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = next((tmp_path / "run" / "csv").glob("*/metrics.csv")).read_text()
    assert "val/wer" in metrics and "train/loss" in metrics
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
