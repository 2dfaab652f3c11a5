import os
import socket

import numpy as np
import pytest

from sparqle.data.audio import load_audio
from sparqle.evaluation import load_model

gr = pytest.importorskip("gradio", reason="the demo extra: pip install .[demo]")


@pytest.fixture(scope="module")
def module(trained):
    return load_model(trained / "export")


def test_handler_transcribes_and_translates(module, synth_data):
    from sparqle.app import NO_SPEECH, make_handler

    handle = make_handler(module, max_seconds=2.0)
    clip = load_audio(next(iter(sorted((synth_data / "audio").glob("*.flac")))), 16000)
    stereo_int16 = (np.stack([clip, clip], 1) * 32767).astype(np.int16)
    for task in ("Transcribe", "Translate"):
        text = handle((44100, stereo_int16), task, "French")
        assert isinstance(text, str)
    assert handle(None, "Transcribe", "German").startswith("No audio")
    assert "empty" in handle((16000, np.zeros(0, np.int16)), "Transcribe", "German")
    assert handle((16000, np.zeros(32000, np.int16)), "Transcribe", "German") == NO_SPEECH


def test_app_serves_on_localhost(module, synth_data, tmp_path):
    from gradio_client import Client, handle_file

    from sparqle.app import make_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = make_app(module)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    app.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
    )
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        import soundfile as sf

        # gradio decodes uploads other than WAV with ffmpeg, which this machine need not have
        clip = load_audio(next(iter(sorted((synth_data / "audio").glob("*.flac")))), 16000)
        sf.write(tmp_path / "clip.wav", clip, 16000)
        text = client.predict(
            handle_file(str(tmp_path / "clip.wav")), "Transcribe", "German", api_name="/handle"
        )
        assert isinstance(text, str)
    finally:
        app.close()
