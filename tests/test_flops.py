"""The step's FLOP formulas against torch's FlopCounterMode on the tiny models (eager attention,
so its matmuls are counted too)."""

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparqle import flops
from sparqle.data.manifest_datamodule import ManifestDataModule
from tests.helpers import make_module


def _counted(fn) -> int:
    """Forward FLOPs (autograd on: FlopCounterMode's module tracker needs it for the Q-Former)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _eager(model) -> None:
    model.config._attn_implementation = "eager"
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "eager"


@pytest.fixture(scope="module")
def module(tiny_dir, synth_data):
    m = make_module(tiny_dir, synth_data, "stage=instruct").eval()
    _eager(m.model.encoder.model)
    _eager(m.model.llm.model)
    return m


@pytest.mark.parametrize("seconds", [1.0, 2.5])
def test_speech_encoder_conv_front_end_and_attention(module, seconds):
    enc = module.model.encoder
    n = int(seconds * enc.sample_rate)
    counted = _counted(lambda: enc(torch.randn(1, n), torch.tensor([n])))
    assert flops.ssl_encoder(enc.model.config, n) == counted


def test_qformer_queries_cross_attending_to_frames(module):
    qf = module.model.adapter.qformer
    qf.qformer.config._attn_implementation = "eager"
    feats = torch.randn(1, 49, module.model.encoder.hidden_size)
    mask = torch.ones(1, 49, dtype=torch.bool)
    counted = _counted(lambda: qf(feats, mask))
    assert flops.qformer_pass(qf.config, qf.num_queries, 0, 49, feats.shape[-1]) == counted


def test_llm_rows_and_logits_at_scored_positions(module):
    llm = module.model.llm
    speech = torch.randn(2, 8, llm.hidden_size)
    inp = llm.build_inputs(
        speech, torch.ones(2, 8, dtype=torch.bool), ["Transcribe.", "Transcribe."], ["a b", "a"]
    )
    counted = _counted(lambda: llm(inp))
    width = inp.inputs_embeds.shape[1]
    keep = width - inp.scored_from
    expected = flops.llm_forward(llm.model.config, [width, width], [keep, keep])
    assert expected == counted


@pytest.fixture(scope="module")
def clips(synth_data):
    dm = ManifestDataModule(train_manifest=str(synth_data / "train.jsonl"), batch_size=4)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _module(tiny_dir, synth_data, stage):
    m = make_module(tiny_dir, synth_data, f"stage={stage}").eval()
    _eager(m.model.encoder.model)
    if m.model.llm is not None:
        _eager(m.model.llm.model)
    m.model.adapter.qformer.qformer.config._attn_implementation = "eager"
    return m


def test_stage_two_step_counts_encoder_once_adapter_thrice_llm_twice(tiny_dir, synth_data, clips):
    m = _module(tiny_dir, synth_data, "instruct")
    step = m.on_before_batch_transfer(replace(clips))
    speech = {}

    def encode():
        speech["enc"] = m.model.encode(step.audio, step.audio_lens)

    encoder = _counted(encode)
    enc = speech["enc"]
    adapter = _counted(lambda: speech.update(out=m.model.adapter(enc.features, enc.mask)))
    inputs = m.model.llm.build_inputs(
        *speech["out"], step.instruction, step.target, speech_lengths=step.speech_lengths
    )
    llm = _counted(lambda: m.model.llm(inputs))
    out = m.model_step(step)
    stats = {"flops": flops.step_work(m.model, step.host_lengths, out)}
    # real lengths, not padding: the padded batch computes a little more than is counted
    expected = encoder + 3 * adapter + 2 * llm
    assert 0.8 * expected < stats["flops"] <= expected


def test_stage_one_counts_every_pass_and_the_text(tiny_dir, synth_data, clips):
    m = _module(tiny_dir, synth_data, "pretrain")
    step = m.on_before_batch_transfer(replace(clips))
    enc = m.model.encode(step.audio, step.audio_lens)
    n = len(step.id)
    same = torch.ones(n, enc.mask.shape[1], dtype=torch.bool)  # unpadded: counts compare exactly
    counted = _counted(
        lambda: m.model.heads(m.model.adapter.qformer, enc.features, same, step.text)
    )
    out = m.model_step(step)
    frames = [enc.mask.shape[1]] * n
    ours = m.model.adapter.flops(frames, m.model.encoder.hidden_size, out["text_lengths"])
    # heads' own small matmuls (projections, similarities, ITM head) are left out; the padded
    # text width is counted by FlopCounterMode, real lengths by us
    assert 0.85 * counted < ours <= 1.02 * counted
