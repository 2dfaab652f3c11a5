"""WER/CER (jiwer) and BLEU/chrF (sacrebleu) with the field's standard text handling.

English is normalised with Whisper's English normaliser, other languages with its basic one,
before WER/CER. BLEU and chrF score the raw text with sacrebleu's tokenizer for the language.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache

import jiwer
import sacrebleu
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer


@cache
def normalizer(lang: str = "en") -> Callable[[str], str]:
    norm = EnglishTextNormalizer() if lang == "en" else BasicTextNormalizer()
    return lambda text: " ".join(norm(text).split())


def word_error_rate(
    references: list[str], hypotheses: list[str], lang: str = "en"
) -> dict[str, float]:
    """Corpus WER and CER after normalisation, with substitution/deletion/insertion counts.

    References that normalise to nothing are left out (and counted in `empty_references`).
    """
    norm = normalizer(lang)
    pairs = [(norm(r), norm(h)) for r, h in zip(references, hypotheses, strict=True)]
    kept = [(r, h) for r, h in pairs if r]
    out = {"empty_references": len(pairs) - len(kept)}
    if not kept:
        return out | {
            "wer": float("nan"),
            "cer": float("nan"),
            "substitutions": 0,
            "deletions": 0,
            "insertions": 0,
            "words": 0,
        }
    refs, hyps = [r for r, _ in kept], [h for _, h in kept]
    w = jiwer.process_words(refs, hyps)
    return out | {
        "wer": w.wer,
        "cer": jiwer.cer(refs, hyps),
        "substitutions": w.substitutions,
        "deletions": w.deletions,
        "insertions": w.insertions,
        "words": w.hits + w.substitutions + w.deletions,
    }


def utterance_errors(reference: str, hypothesis: str, lang: str = "en") -> int:
    """Word edits (S + D + I) for one utterance, after normalisation."""
    norm = normalizer(lang)
    ref, hyp = norm(reference), norm(hypothesis)
    if not ref:
        return len(hyp.split())
    w = jiwer.process_words(ref, hyp)
    return w.substitutions + w.deletions + w.insertions


def _installed(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def bleu_tokenizer(lang: str) -> str:
    """sacrebleu's tokenizer for a target language; 'char' where the right one is not installed."""
    if lang == "zh":
        return "zh"
    if lang == "ja":
        return "ja-mecab" if _installed("MeCab") and _installed("ipadic") else "char"
    if lang == "ko":
        return "ko-mecab" if _installed("mecab_ko") else "char"
    if lang in ("th", "lo", "my", "km"):
        return "char"
    return "13a"


def translation_scores(
    references: list[str], hypotheses: list[str], lang: str
) -> dict[str, object]:
    bleu = sacrebleu.metrics.BLEU(tokenize=bleu_tokenizer(lang))
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def bleu(
    references: list[str], hypotheses: list[str], tokenize: str = "13a"
) -> sacrebleu.metrics.bleu.BLEUScore:
    return sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tokenize)


def chrf(references: list[str], hypotheses: list[str]) -> sacrebleu.metrics.chrf.CHRFScore:
    return sacrebleu.corpus_chrf(hypotheses, [references])


def is_looping(text: str, max_ngram: int = 4) -> bool:
    """A degenerate hypothesis: one word 4+ times in a row, or an n-gram (n >= 2) 3+ times in a row."""
    words = text.split()
    for n in range(1, max_ngram + 1):
        needed = 4 if n == 1 else 3
        for start in range(0, len(words) - n * needed + 1):
            gram = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == gram for k in range(1, needed)):
                return True
    return False


_REFUSAL = re.compile(
    r"\b(i('m| am) sorry|i apologi[sz]e|i can(no|')t (help|assist|provide|transcribe|translate)|"
    r"as an ai\b|i('m| am) (unable|not able) to|i do not have (access|the ability))",
    re.IGNORECASE,
)


def is_refusal(text: str) -> bool:
    """The LLM declined instead of answering (an instruction-tuned model's stock phrases)."""
    return bool(_REFUSAL.search(text))


def score_task(spec: str, references: list[str], hypotheses: list[str], lang: str = "en") -> dict:
    """A task's corpus figures: WER/CER for transcription, BLEU/chrF (with sacrebleu's signature)
    for translation into the spec's language. Validation and eval.py score with this alone."""
    from sparqle.prompts import TRANSCRIBE, parse_task

    task, target = parse_task(spec)
    if task == TRANSCRIBE:
        return word_error_rate(references, hypotheses, lang)
    return translation_scores(references, hypotheses, target)


def headline(spec: str, references: list[str], hypotheses: list[str]) -> tuple[str, float]:
    """The one figure a task is watched by in training: ("wer", ...) or ("bleu_LANG", ...)."""
    from sparqle.prompts import TRANSCRIBE, parse_task

    task, target = parse_task(spec)
    scores = score_task(spec, references, hypotheses)
    return ("wer", scores["wer"]) if task == TRANSCRIBE else (f"bleu_{target}", scores["bleu"])
