"""A small web app: record or upload audio, pick transcribe or translate, read the text.

pip install .[demo]; python -m sparqle.app --ckpt exports/run1 [--port 7860]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np
import torch

from sparqle.cli import reports_user_errors
from sparqle.data.audio import resample, to_mono_float
from sparqle.prompts import LANGUAGE_NAMES, TRANSCRIBE, TRANSLATE, instruction

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
TASKS = {"Transcribe": TRANSCRIBE, "Translate": TRANSLATE}


NO_SPEECH = "(no speech found)"


def make_handler(
    module, max_seconds: float | None = None
) -> Callable[[tuple[int, np.ndarray] | None, str, str], str]:
    """(sample rate, samples) from the audio widget, task, language -> text. Long audio is cut
    at pauses into pieces of `max_seconds` (default: the longest clip the model trained on)."""
    from sparqle.inference import decode, piece_seconds

    sr = module.model.encoder.sample_rate
    pieces = piece_seconds(module, max_seconds)
    generation = {k: v for k, v in module.generation.items() if k != "max_new_tokens"}

    def handle(
        audio: tuple[int, np.ndarray] | None, task: str = "Transcribe", language: str = "German"
    ) -> str:
        if audio is None:
            return "No audio: record or upload a clip first."
        rate, samples = audio
        x = resample(to_mono_float(np.asarray(samples)), int(rate), sr)
        if x.size == 0 or not np.isfinite(x).all():
            return "The clip is empty or unreadable."
        prompt = instruction(TASKS[task], language if TASKS[task] == TRANSLATE else None)
        [d] = decode(
            module.model,
            [torch.from_numpy(x.copy())],
            [prompt],
            generation,
            max_piece_seconds=pieces,
        )
        return NO_SPEECH if d.no_speech else d.text

    return handle


def make_app(module, on_result: Callable[[str], None] | None = None):
    """`on_result` sees each text the page is sent (for tests and logging)."""
    import gradio as gr

    answer = make_handler(module)

    def handle(audio, task, language):  # the page's API name: /handle
        text = answer(audio, task, language)
        if on_result is not None:
            on_result(text)
        return text

    languages = sorted(set(LANGUAGE_NAMES.values()) - {"English"})
    return gr.Interface(
        fn=handle,
        inputs=[
            gr.Audio(sources=["microphone", "upload"], type="numpy", label="Speech"),
            gr.Radio(list(TASKS), value="Transcribe", label="Task"),
            gr.Dropdown(languages, value="German", label="Translate into"),
        ],
        outputs=gr.Textbox(label="Text"),
        title="SparQLe",
        description="Speech -> Q-Former -> LLM. Translation into languages never seen in training is zero-shot.",
        flagging_mode="never",
    )


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    from sparqle.export import load_model

    make_app(load_model(args.ckpt, "cuda" if torch.cuda.is_available() else "cpu")).launch(
        server_name=args.host, server_port=args.port
    )


if __name__ == "__main__":
    main()
