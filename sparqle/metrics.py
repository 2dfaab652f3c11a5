"""WER / CER with jiwer and BLEU / chrF with sacrebleu, after one shared text normalisation."""

from __future__ import annotations

import re
import unicodedata

import jiwer
import sacrebleu

_PUNCT = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")


def basic_normalize(text: str) -> str:
    """Lower-case, NFKC, punctuation removed, whitespace collapsed (language-neutral)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT.sub(" ", text)
    return " ".join(text.split())


def word_error_rate(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus WER after basic normalisation, with substitution/deletion/insertion counts."""
    refs = [basic_normalize(r) for r in references]
    hyps = [basic_normalize(h) for h in hypotheses]
    keep = [i for i, r in enumerate(refs) if r]
    refs, hyps = [refs[i] for i in keep], [hyps[i] for i in keep]
    if not refs:
        return {
            "wer": float("nan"),
            "substitutions": 0,
            "deletions": 0,
            "insertions": 0,
            "words": 0,
        }
    out = jiwer.process_words(refs, hyps)
    words = out.hits + out.substitutions + out.deletions
    return {
        "wer": out.wer,
        "substitutions": out.substitutions,
        "deletions": out.deletions,
        "insertions": out.insertions,
        "words": words,
    }


def char_error_rate(references: list[str], hypotheses: list[str]) -> float:
    refs = [basic_normalize(r) for r in references]
    hyps = [basic_normalize(h) for h in hypotheses]
    keep = [i for i, r in enumerate(refs) if r]
    if not keep:
        return float("nan")
    return jiwer.cer([refs[i] for i in keep], [hyps[i] for i in keep])


def bleu(
    references: list[str], hypotheses: list[str], tokenize: str = "13a"
) -> sacrebleu.metrics.bleu.BLEUScore:
    return sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tokenize)


def chrf(references: list[str], hypotheses: list[str]) -> sacrebleu.metrics.chrf.CHRFScore:
    return sacrebleu.corpus_chrf(hypotheses, [references])
