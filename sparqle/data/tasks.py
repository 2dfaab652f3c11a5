"""Which task each utterance trains on: transcribe, or translate where a translation exists."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparqle.data.manifest import Utterance
from sparqle.prompts import TRANSCRIBE, TRANSLATE, instruction, parse_task

TEXT_CASES = (None, "lower")


def cased(text: str, text_case: str | None) -> str:
    """The text as the run trains on it: as written, or lowercased (`data.text_case=lower`, as
    the SparQLe authors' dataset does with every target)."""
    return text.lower() if text_case == "lower" else text


@dataclass
class TaskChoice:
    task: str  # "transcribe" | "translate"
    lang: str  # language of the target text
    instruction: str
    target: str
    text: str = ""  # the transcript (stage 1 pairs it with the speech), cased as the target

    def sample(self, utt: Utterance, audio: np.ndarray) -> dict[str, Any]:
        """The dict every DataModule yields per utterance, which `collate` batches."""
        return {"id": utt.id, "audio": audio, **self._texts(utt)}

    def feature_sample(self, utt: Utterance, features: Any, audio_samples: int) -> dict[str, Any]:
        """The same from a feature shard: the encoder's output instead of the audio."""
        return {
            "id": utt.id,
            "features": features,
            "audio_samples": audio_samples,
            **self._texts(utt),
        }

    def _texts(self, utt: Utterance) -> dict[str, Any]:
        return {
            "text": self.text,
            "task": self.task,
            "lang": self.lang,
            "instruction": self.instruction,
            "target": self.target,
        }


class TaskSampler:
    """Weights over task specs, e.g. {"transcribe": 1.0, "translate_de": 0.5}.

    For each utterance the specs it can serve (a translation must exist) are drawn by weight;
    with `rng=None` the highest-weight spec is taken (evaluation). An utterance whose manifest
    names a `task` trains on that one, as the reference's manifests decide.
    """

    def __init__(self, weights: Mapping[str, float], text_case: str | None = None) -> None:
        if not weights:
            raise ValueError("data.tasks is empty: give at least {transcribe: 1.0}")
        if text_case not in TEXT_CASES:
            raise ValueError(f"data.text_case={text_case!r}: expected lower or null")
        self.specs = [(parse_task(k), float(v)) for k, v in weights.items() if float(v) > 0]
        self.text_case = text_case

    def choose(self, utt: Utterance, rng: random.Random | None) -> TaskChoice | None:
        if utt.task is not None and rng is not None:  # the manifest names its training task
            task, lang = parse_task(utt.task)
            return self._choice(utt, task, lang, rng)
        options = [
            ((task, lang), w)
            for (task, lang), w in self.specs
            if task == TRANSCRIBE or (lang in utt.translation and utt.translation[lang].strip())
        ]
        if not options:
            return None
        if rng is None:
            (task, lang), _ = max(options, key=lambda o: o[1])
        else:
            (task, lang), _ = rng.choices(options, weights=[w for _, w in options])[0]
        return self._choice(utt, task, lang, rng)

    def _choice(
        self, utt: Utterance, task: str, lang: str | None, rng: random.Random | None
    ) -> TaskChoice | None:
        text = cased(utt.text, self.text_case)
        if task == TRANSCRIBE:
            return TaskChoice(TRANSCRIBE, utt.lang, instruction(TRANSCRIBE, rng=rng), text, text)
        if not (utt.translation.get(lang) or "").strip():
            return None
        target = cased(utt.translation[lang], self.text_case)
        return TaskChoice(TRANSLATE, lang, instruction(TRANSLATE, lang, rng=rng), target, text)
