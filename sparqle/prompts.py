"""Task instructions. The data layer picks a task and an instruction; the LLM wrapper formats it.

The first instruction of each list is the canonical one used at evaluation.
"""

from __future__ import annotations

import random

TRANSCRIBE = "transcribe"
TRANSLATE = "translate"
TASKS = (TRANSCRIBE, TRANSLATE)

LANGUAGE_NAMES = {
    "en": "English",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "ru": "Russian",
    "zh": "Chinese",
    "ja": "Japanese",
    "ar": "Arabic",
    "tr": "Turkish",
    "fa": "Persian",
    "et": "Estonian",
    "mn": "Mongolian",
    "cy": "Welsh",
    "ca": "Catalan",
    "sl": "Slovenian",
    "lv": "Latvian",
    "sv": "Swedish",
    "id": "Indonesian",
    "ta": "Tamil",
}

# The authors' instruction lists, word for word (djanibekov/rebooting-llm,
# SparQLe-fairseq/models/sparqle/finetune_sparqle_instruct.py, `self.prompts`: 7 transcription,
# 4 translation; their TARGETLANG is our {language}). The speech slot and its <Speech> tags are
# the LLM wrapper's business, not part of the instruction.
INSTRUCTIONS = {
    TRANSCRIBE: (
        "Can you transcribe the speech into a written format?",
        "Listen to the speech and write down its content.",
        "What is the content of the speech you heard?",
        "Please write down the transcription of the speech.",
        "Please transcribe the speech into a written format.",
        "Write down the content of the speech you heard.",
        "Can you write down the transcription of the speech?",
    ),
    TRANSLATE: (
        "Can you translate the speech into {language}?",
        "Please translate the speech you heard into {language}.",
        "Listen to the speech and translate it into {language}.",
        "Give me the {language} translation of this speech.",
    ),
}

# The reference's system prompt (same file, `generate`: it used it only at inference; we use
# it in training too, so that training and inference see the same prompt).
PAPER_SYSTEM_PROMPT = (
    "You are a speech-to-text conversion model. Your tasks include accurately transcribing "
    "spoken language and translating audio samples as per user instructions. Please ensure "
    "clarity and precision in both transcription and translation processes."
)


def language_name(code: str) -> str:
    """ISO code or a language name -> the English name an LLM understands."""
    if code in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[code]
    if code in LANGUAGE_NAMES.values():
        return code
    raise ValueError(f"unknown language {code!r}; known codes: {', '.join(sorted(LANGUAGE_NAMES))}")


def instruction(task: str, lang: str | None = None, rng: random.Random | None = None) -> str:
    """The instruction text for a task; random among the variants when rng is given, else canonical."""
    if task not in INSTRUCTIONS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    variants = INSTRUCTIONS[task]
    text = rng.choice(variants) if rng is not None else variants[0]
    if task == TRANSLATE:
        if lang is None:
            raise ValueError("task 'translate' needs a target language")
        text = text.format(language=language_name(lang))
    return text


def task_spec(task: str, lang: str | None = None) -> str:
    """(task, lang) -> the one name a task goes by everywhere: 'transcribe' or 'translate_LANG'
    (data configs, validation figures, eval.py's `tasks` and report)."""
    return TRANSCRIBE if task == TRANSCRIBE else f"{TRANSLATE}_{lang}"


def parse_task(spec: str) -> tuple[str, str | None]:
    """'transcribe' or 'translate_de' / 'translate:de' -> (task, lang); 'asr' is an older name
    of 'transcribe' (eval.py's tasks before 2026-12-01)."""
    if spec == TRANSCRIBE or spec == "asr":
        return TRANSCRIBE, None
    for sep in ("_", ":"):
        head, _, lang = spec.partition(sep)
        if head == TRANSLATE and lang:
            return TRANSLATE, lang
    raise ValueError(
        f"task {spec!r}: expected 'transcribe' or 'translate_LANG' (e.g. translate_de)"
    )
