import subprocess
import sys

import pytest

from sparqle import metrics


def test_wer_with_known_errors():
    refs = ["The cat sat on the mat.", "Hello world", "one two three four"]
    hyps = ["the cat sat on a mat", "hello, World!", "one three four five"]
    # 1 substitution (the->a); 0; 1 deletion (two) + 1 insertion (five); 12 reference words
    out = metrics.word_error_rate(refs, hyps)
    assert (out["substitutions"], out["deletions"], out["insertions"], out["words"]) == (
        1,
        1,
        1,
        12,
    )
    assert out["wer"] == pytest.approx(3 / 12)


def test_normalisation_and_cer():
    assert metrics.basic_normalize("  Don't STOP — now!! ") == "don't stop now"
    assert metrics.char_error_rate(["abcd"], ["abxd"]) == pytest.approx(0.25)


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
    assert metrics.bleu(refs, hyps).score == pytest.approx(float(cli.stdout.strip()), abs=1e-4)
    assert 0 < metrics.chrf(refs, hyps).score < 100
