import subprocess
import sys

import pytest

from sparqle import metrics


def test_wer_with_known_errors():
    refs = ["The cat sat on the mat.", "Hello world", "red green blue black"]
    hyps = ["the cat sat on a mat", "hello, World!", "red blue black white"]
    # 1 substitution (the->a); 0; 1 deletion (green) + 1 insertion (white); 12 reference words
    out = metrics.word_error_rate(refs, hyps)
    assert (out["substitutions"], out["deletions"], out["insertions"], out["words"]) == (
        1,
        1,
        1,
        12,
    )
    assert out["wer"] == pytest.approx(3 / 12)
    assert [metrics.utterance_errors(r, h) for r, h in zip(refs, hyps, strict=True)] == [1, 0, 2]


def test_whisper_normalisation_for_english_basic_for_others():
    # Whisper's English normaliser expands contractions and spells out titles
    assert (
        metrics.word_error_rate(["Mr. Smith doesn't stop."], ["mister smith does not stop"])["wer"]
        == 0
    )
    assert metrics.normalizer("de")("Der Hund, schläft!") == "der hund schläft"
    assert metrics.word_error_rate(["abcd"], ["abxd"], lang="de")["cer"] == pytest.approx(0.25)
    out = metrics.word_error_rate(["!?", "a b"], ["x", "a b"])
    assert out["empty_references"] == 1 and out["wer"] == 0


def test_bleu_matches_sacrebleu_cli(tmp_path):
    refs = ["Der kleine Hund schläft heute.", "Die Frau sieht das rote Auto.", "Das Kind lacht."]
    hyps = ["Der kleine Hund schläft.", "Die Frau sieht ein rotes Auto.", "Das Kind lacht."]
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n")
    (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n")
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "sacrebleu",
            str(tmp_path / "ref.txt"),
            "-i",
            str(tmp_path / "hyp.txt"),
            "-b",
            "-w",
            "4",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    scores = metrics.translation_scores(refs, hyps, "de")
    assert scores["bleu"] == pytest.approx(float(cli.stdout.strip()), abs=1e-4)
    assert scores["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert (
        0 < scores["chrf"] < 100
        and "chrF2" in scores["chrf_signature"]
        or "nc:6" in scores["chrf_signature"]
    )


def test_tokenizer_per_language():
    assert metrics.bleu_tokenizer("de") == "13a"
    assert metrics.bleu_tokenizer("zh") == "zh"
    assert metrics.bleu_tokenizer("ja") in ("ja-mecab", "char")


@pytest.mark.parametrize(
    "text, looping",
    [
        ("the dog sleeps", False),
        ("the the the the dog", True),
        ("le chien le chien le chien dort", True),
        ("a b c a b c", False),
        ("one two three four one two three four one two three four", True),
    ],
)
def test_looping_detector(text, looping):
    assert metrics.is_looping(text) is looping


def test_refusal_detector():
    assert metrics.is_refusal("I'm sorry, but I cannot transcribe audio.")
    assert metrics.is_refusal("As an AI language model, I do not have access to audio.")
    assert not metrics.is_refusal("The sorry dog sleeps.")
