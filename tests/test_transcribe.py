import io
import subprocess
import sys

import numpy as np
import soundfile as sf

from sparqle.data.audio import load_audio, split_points
from tests.conftest import ROOT


def test_split_points_cut_at_pauses():
    sr = 1000
    speech = lambda s: np.random.default_rng(0).normal(0, 0.3, int(s * sr)).astype(np.float32)  # noqa: E731
    pause = np.zeros(int(0.4 * sr), np.float32)
    audio = np.concatenate([speech(8), pause, speech(8), pause, speech(8)])
    spans = split_points(audio, sr, max_seconds=10)
    assert spans[0][0] == 0 and spans[-1][1] == len(audio)
    assert all(b - a <= 10 * sr for a, b in spans) and len(spans) == 3
    assert all(
        abs(a - (8000 + k * 8400)) <= 400 for k, (a, _) in enumerate(spans[1:])
    )  # inside the pauses
    assert split_points(audio[:5000], sr, 10) == [(0, 5000)]


def test_transcribe_cli_handles_formats_and_bad_files(trained, synth_data, tmp_path):
    clip = load_audio(next(iter(sorted((synth_data / "audio").glob("*.flac")))), 16000)
    sf.write(tmp_path / "stereo44k.wav", np.stack([clip, clip], 1), 16000, subtype="PCM_16")
    sf.write(tmp_path / "clip.ogg", clip, 16000, format="OGG")
    long = np.concatenate([clip, np.zeros(8000, np.float32)] * 8)  # ~25 s with pauses
    sf.write(tmp_path / "long.flac", long, 16000)
    sf.write(tmp_path / "silence.wav", np.zeros(48000, np.float32), 16000)
    (tmp_path / "notes.txt").write_text("not audio")
    buf = io.BytesIO()
    sf.write(buf, np.zeros(0, np.float32), 16000, format="WAV")
    (tmp_path / "empty.wav").write_bytes(buf.getvalue())
    files = ["stereo44k.wav", "missing.flac", "clip.ogg", "notes.txt", "empty.wav", "long.flac"]
    files.append("silence.wav")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparqle.transcribe",
            "--ckpt",
            str(trained / "export"),
            "--max-seconds",
            "8",
            "--max-new-tokens",
            "4",
            *[str(tmp_path / f) for f in files],
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 1  # some files failed
    printed = [line.split("\t")[0] for line in proc.stdout.splitlines()]
    assert printed == [
        str(tmp_path / f) for f in ("stereo44k.wav", "clip.ogg", "long.flac", "silence.wav")
    ]
    assert proc.stdout.splitlines()[-1] == f"{tmp_path / 'silence.wav'}\t"  # nothing invented
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert any("missing.flac: no such file" in e for e in errors)
    assert any("notes.txt" in e and "cannot decode" in e for e in errors)
    assert any("empty.wav" in e and "empty audio" in e for e in errors)
    # quiet loading: one line per part, none of transformers' progress bars or key tables
    assert f"note: {tmp_path / 'silence.wav'}: no speech found" in proc.stderr.splitlines()
    said = [line for line in proc.stderr.splitlines() if not line.startswith(("error:", "note:"))]
    assert [line.split(":")[0] for line in said] == ["encoder", "adapter", "llm"], said
    assert all("M parameters (" in line for line in said), said


def test_transcribe_cli_needs_a_language_to_translate(trained, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparqle.transcribe",
            "--ckpt",
            str(trained / "export"),
            "--task",
            "translate",
            "x.wav",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "--task translate needs --lang" in proc.stderr
