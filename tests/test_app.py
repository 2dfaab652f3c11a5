import os
import socket

import numpy as np
import pytest

from sparqle.data.audio import load_audio
from sparqle.export import load_model

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


def test_a_person_uploads_a_clip_in_chromium_and_reads_the_text(module, synth_data, tmp_path):
    """Headless Chromium (Debian's package, via Selenium) as a person uses the page: open it,
    upload a held-out clip, press Submit, read the text; a screenshot is kept for the record."""
    import shutil

    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.fail("chromium and chromium-driver are missing: `make setup` installs them")
    import soundfile as sf
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from sparqle.app import make_app

    handled = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = make_app(module, on_result=handled.append)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    from sparqle.data.manifest import read_manifest

    held_out = read_manifest(synth_data / "val.jsonl")[0].audio
    clip = load_audio(held_out if os.path.isabs(held_out) else synth_data / held_out, 16000)
    sf.write(tmp_path / "held-out.wav", clip, 16000)
    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
    ):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60)
        source = "button[aria-label='Upload file']"  # the widget opens on its microphone
        wait.until(
            ec.element_to_be_clickable((By.CSS_SELECTOR, source)), "no upload source"
        ).click()
        upload = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")), "no file input"
        )
        upload.send_keys(str(tmp_path / "held-out.wav"))
        wait.until(
            ec.presence_of_element_located(
                (By.CSS_SELECTOR, "audio, waveform, .waveform-container")
            )
        )
        submit = wait.until(
            ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Submit']")),
            "no Submit button",
        )
        submit.click()
        wait.until(lambda _: handled, "the page's request never reached the model")
        text = handled[0]
        assert not text.startswith("No audio") and text != "The clip is empty or unreadable."
        box = browser.find_element(By.CSS_SELECTOR, "textarea[data-testid='textbox']")
        words = " ".join(text.split())  # the page may normalise whitespace
        wait.until(
            lambda _: " ".join((box.get_attribute("value") or "").split()) == words,
            f"the page never showed {words!r}",
        )
        browser.save_screenshot(str(tmp_path / "app.png"))
        assert (tmp_path / "app.png").stat().st_size > 10_000
    finally:
        browser.quit()
        app.close()
