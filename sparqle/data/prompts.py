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

INSTRUCTIONS = {
    TRANSCRIBE: (
        "Transcribe the speech.",
        "Write down what is said in the audio.",
        "Repeat the spoken words as text.",
        "What does the speaker say? Answer with the exact words.",
    ),
    TRANSLATE: (
        "Translate the speech into {language}.",
        "Translate what is said into {language}.",
        "Give the {language} translation of the audio.",
        "Listen and write the {language} translation.",
    ),
}


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
