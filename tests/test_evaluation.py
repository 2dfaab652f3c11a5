import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from sparqle.data.batch import Batch
from sparqle.evaluation import generate_rows, score
from sparqle.export import load_model
from sparqle.inference import inference_autocast, inference_bf16, length_cap
from sparqle.models.llm import check_generation
from tests.conftest import ROOT
from tests.helpers import make_module, save_checkpoint


def test_batched_generation_equals_one_at_a_time(trained, synth_data):
    from sparqle.data.manifest_datamodule import ManifestDataModule

    module = load_model(trained / "model.ckpt")
    dm = ManifestDataModule(val_manifest=str(synth_data / "val.jsonl"))
    batch = next(iter(dm.eval_dataloader("transcribe", batch_size=6)))
    together = module.model.generate(
        batch.audio, batch.audio_lens, batch.instruction, max_new_tokens=6
    )
    alone = [
        module.model.generate(
            batch.audio[i : i + 1, : batch.audio_lens[i]],
            batch.audio_lens[i : i + 1],
            batch.instruction[i : i + 1],
            max_new_tokens=6,
        )[0]
        for i in range(len(batch.id))
    ]
    assert together == alone


def test_length_cap_follows_audio_duration():
    assert length_cap(10.0) == 96
    assert length_cap(10.0, base=4, per_second=1) == 14


def test_inference_runs_bf16_autocast_on_gpus_only_unless_asked():
    assert inference_bf16("cuda", "auto") and not inference_bf16("cpu", "auto")
    assert inference_bf16("cpu", "bf16") and not inference_bf16("cuda", "32")
    with pytest.raises(ValueError, match="^precision=fp8"):
        inference_bf16("cpu", "fp8")
    assert inference_autocast("cpu", "bf16").fast_dtype == torch.bfloat16


def test_decoding_settings_pass_through_and_unknown_keys_fail():
    settings = {"num_beams": 5, "no_repeat_ngram_size": 2, "early_stopping": True}
    assert check_generation({**settings, "length_penalty": 1.0}) == {
        **settings,
        "length_penalty": 1.0,
    }
    with pytest.raises(ValueError, match=r"^generation\.beam_size: not a decoding setting"):
        check_generation({"beam_size": 5})
    with pytest.raises(ValueError, match="generation.eos_token_id"):
        check_generation({"eos_token_id": 3})


def test_generate_rows_passes_every_setting_to_generate(monkeypatch):
    """no_repeat_ngram_size, early_stopping, length_penalty reach `generate` (they were dropped)."""
    seen = {}

    class Model:
        class encoder:  # noqa: N801
            sample_rate = 16000

        def generate(self, audio, lens, instructions, **kwargs):
            seen.update(kwargs)
            return ["hello"] * len(instructions)

    module = type("M", (), {"model": Model(), "device": torch.device("cpu")})()
    batch = Batch(
        id=["a"],
        text=["hello"],
        task=["transcribe"],
        lang=["en"],
        instruction=["Transcribe."],
        target=["hello"],
        audio=torch.zeros(1, 16000),
        audio_lens=torch.tensor([16000]),
    )
    settings = {"num_beams": 3, "no_repeat_ngram_size": 2, "early_stopping": True}
    rows, _ = generate_rows(module, [batch], "transcribe", {**settings, "length_penalty": 0.5})
    assert seen == {**settings, "length_penalty": 0.5, "max_new_tokens": length_cap(1.0)}
    generate_rows(module, [batch], "transcribe", {"max_new_tokens": 7})
    assert seen["max_new_tokens"] == 7
    with pytest.raises(ValueError, match="generation.beam_size"):
        generate_rows(module, [batch], "transcribe", {"beam_size": 3})


def test_no_speech_is_flagged_and_long_clips_are_decoded_in_pieces(synth_data):
    """With the VAD on: silence gets an empty, flagged hypothesis (nothing invented), a clip
    longer than the trained length goes to the model as pieces cut at its pauses, joined."""
    from sparqle.data.audio import load_audio

    given = []

    class Model:
        class encoder:  # noqa: N801
            sample_rate = 16000

        def generate(self, audio, lens, instructions, **kwargs):
            given.extend(lens.tolist())
            return [f"w{n}" for n in lens.tolist()]

    module = type("M", (), {"model": Model(), "device": torch.device("cpu")})()
    speech = [load_audio(p, 16000) for p in sorted((synth_data / "audio").glob("*.flac"))[:4]]
    pause = np.zeros(8000, np.float32)
    long = np.concatenate([x for c in speech for x in (c, pause)])
    clips = [speech[0], np.zeros(32000, np.float32), long]
    lens = torch.tensor([len(c) for c in clips])
    audio = torch.zeros(3, int(lens.max()))
    for i, c in enumerate(clips):
        audio[i, : len(c)] = torch.from_numpy(c)
    batch = Batch(
        id=["speech", "silence", "long"],
        text=["a b"] * 3,
        task=["transcribe"] * 3,
        lang=["en"] * 3,
        instruction=["Transcribe."] * 3,
        target=["a b", "a b", "a b"],
        audio=audio,
        audio_lens=lens,
    )
    limit = max(len(c) for c in speech) / 16000 + 0.3
    rows, _ = generate_rows(module, [batch], "transcribe", {}, max_piece_seconds=limit)
    assert [r.no_speech for r in rows] == [False, True, False]
    assert rows[0].hypothesis == f"w{len(speech[0])}"  # a short clip goes whole
    assert rows[1].hypothesis == ""
    assert len(given) >= 1 + len(speech) and max(given) <= limit * 16000
    assert len(rows[2].hypothesis.split()) == len(given) - 1  # every piece's text, joined
    assert score(rows, "transcribe", 0, ["transcribe"])["no_speech"] == 1
    given.clear()  # VAD off: every clip whole, as before
    rows, _ = generate_rows(module, [batch], "transcribe", {})
    assert given == lens.tolist() and not any(r.no_speech for r in rows)


@pytest.mark.slow
def test_eval_cli_compares_checkpoint_and_export(trained, tiny_dir, synth_data, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            f"ckpt=[{trained / 'model.ckpt'},{trained / 'export'}]",
            f"data.test_manifest={synth_data / 'val.jsonl'}",
            "tasks=[asr,translate_de]",
            f"out={tmp_path}",
            f"paths.cache_dir={tiny_dir}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            "generation.max_new_tokens=6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["models"]) == ["model", "export"]
    a, b = (report["models"][k]["tasks"] for k in ("model", "export"))
    assert a["transcribe"]["utterances"] == 6 and a["translate_de"]["utterances"] == 6
    assert (
        a["transcribe"]["wer"] == b["transcribe"]["wer"]
        and a["translate_de"]["bleu"] == b["translate_de"]["bleu"]
    )
    assert a["translate_de"]["zero_shot"] is True  # the tiny run trained on transcription only
    assert "tok:13a" in a["translate_de"]["bleu_signature"]
    md = (tmp_path / "report.md").read_text()
    assert "## Zero-shot directions" in md and "| model | transcribe WER | transcribe CER |" in md
    rows = (tmp_path / "model.tsv").read_text().splitlines()
    assert (
        rows[0].split("\t")[:5] == ["id", "task", "lang", "reference", "hypothesis"]
        and len(rows) == 13
    )
    # the export's model card carries these scores: the hub's model-index and a table
    from sparqle.export import export

    export(trained / "model.ckpt", tmp_path / "card", report=tmp_path / "report.json")
    card = (tmp_path / "card" / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    results = {r["task"]["name"]: r for r in header["model-index"][0]["results"]}
    wer = next(m for m in results["transcribe"]["metrics"] if m["type"] == "wer")["value"]
    bleu = next(m for m in results["translate_de"]["metrics"] if m["type"] == "bleu")["value"]
    assert wer == round(100 * a["transcribe"]["wer"], 2)
    assert bleu == round(a["translate_de"]["bleu"], 2)
    assert results["transcribe"]["dataset"]["name"] == "val"
    assert f"| transcribe | WER | {100 * a['transcribe']['wer']:.1f} | 6 |" in card


def test_eval_refuses_a_stage_one_model(tiny_dir, synth_data, tmp_path):
    module = make_module(tiny_dir, synth_data, "stage=pretrain")
    save_checkpoint(module, tmp_path / "pre.ckpt")
    with pytest.raises(ValueError, match="stage-pretrain model cannot generate"):
        load_model(tmp_path / "pre.ckpt")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        load_model(tmp_path / "nothing")
    assert (
        torch.load(tmp_path / "pre.ckpt", weights_only=True)["hyper_parameters"]["stage"]["name"]
        == "pretrain"
    )
