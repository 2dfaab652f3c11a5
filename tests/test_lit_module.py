"""The training step: what a stage trains, what a step reads back, what validation leaves."""

from dataclasses import replace

import pytest
import torch

from sparqle.checkpoints import trainable_names
from tests.helpers import HostReads, make_module, one_step


@pytest.mark.parametrize(
    "stage, trainable_prefixes",
    [
        ("pretrain", ("model.adapter.qformer.", "model.heads.")),
        ("instruct", ("model.adapter.",)),
    ],
)
def test_a_step_changes_only_the_stage_trainable_weights(
    tiny_dir, synth_data, batch, stage, trainable_prefixes
):
    module = make_module(tiny_dir, synth_data, f"stage={stage}")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainable = set(trainable_names(module))
    assert trainable and all(k.startswith(trainable_prefixes) for k in trainable)
    one_step(module, batch)
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable
    frozen = [k for k in before if k.startswith(("model.encoder.", "model.llm."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    if stage == "pretrain":
        assert not any(k.startswith("model.adapter.proj") for k in trainable)
    else:
        assert any(k.startswith("model.adapter.proj") for k in changed)
        assert not any(
            ".embeddings." in k for k in trainable
        )  # Q-Former text parts idle in stage 2


def test_lora_adds_exactly_its_parameters(tiny_dir, synth_data):
    plain = make_module(tiny_dir, synth_data, "stage=instruct")
    lora = make_module(
        tiny_dir,
        synth_data,
        "stage=instruct",
        "llm.lora={r: 2, lora_alpha: 4, target_modules: [q_proj, v_proj]}",
    )
    extra = set(trainable_names(lora)) - {
        k.replace("model.llm.model.", "model.llm.model.base_model.model.")
        for k in trainable_names(plain)
    }
    assert extra and all("lora_" in k for k in extra)
    assert len(trainable_names(lora)) == len(trainable_names(plain)) + len(extra)


@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
def test_bf16_frozen_encoder_feeds_the_fp32_adapter(tiny_dir, synth_data, batch, stage):
    # the demo's setting on CPUs with bf16 maths: half-cost encoding, full-precision training
    module = make_module(tiny_dir, synth_data, f"stage={stage}", "encoder.dtype=bfloat16")
    assert next(module.model.encoder.parameters()).dtype == torch.bfloat16
    loss = module.model_step(batch)["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def test_validation_leaves_every_generator_as_it_found_it(tiny_dir, synth_data, monkeypatch):
    """On GPU dropout and ITM negatives draw from the CUDA generators: they are restored too."""
    import random

    import numpy as np

    cuda = {"state": [torch.tensor([1], dtype=torch.uint8)]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(cuda["state"]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: cuda["state"].__setitem__(d, s))
    module = make_module(tiny_dir, synth_data, "stage=pretrain")

    def seed():
        torch.manual_seed(0), np.random.seed(0), random.seed(0)

    seed()
    expected = (torch.rand(3), np.random.rand(), random.random())
    seed()
    module.on_validation_start()
    torch.rand(5), np.random.rand(2), random.random()  # validation draws from every generator
    cuda["state"] = [torch.tensor([9], dtype=torch.uint8)]
    module.on_validation_end()
    assert cuda["state"][0].item() == 1
    after = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]


@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
def test_a_training_step_reads_nothing_back_to_the_host(tiny_dir, synth_data, batch, stage):
    """Every host read stalls a GPU's queue: the layout comes from the host's audio_lens before
    the batch moves, splicing is index arithmetic, masks go in as 4-D (transformers reads a 2-D
    one back to decide whether to skip it) and the skip decision stays on the device."""
    module = make_module(tiny_dir, synth_data, f"stage={stage}")
    step = module.on_before_batch_transfer(replace(batch))
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)  # as configure_optimizers makes it
    with HostReads() as counter:
        out = module.model_step(step)
        bad = ~torch.isfinite(out["loss"].detach())
        module.skips.note(bad)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    # the one left: the frozen speech encoder's padding mask, checked by transformers' HuBERT
    # itself at the first layer (before the step's work is queued, so little waits on it)
    assert all("modeling_hubert" in r or "masking_utils" in r for r in counter.reads), counter.reads
    assert len(counter.reads) <= 1, counter.reads
