"""What a checkpoint holds, how a stage-2 run starts from stage 1, resuming on other devices."""

import pytest
import torch

from sparqle.checkpoints import CheckpointMismatch, checkpoint_names, trainable_names
from sparqle.lit_module import SparQLeModule
from tests.helpers import make_cfg, make_module, one_step, save_checkpoint


def test_checkpoint_holds_trainable_weights_and_restores_exactly(
    tiny_dir, synth_data, batch, tmp_path
):

    module = make_module(tiny_dir, synth_data, "stage=instruct")
    one_step(module, batch)
    save_checkpoint(module, tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    saved = set(ckpt["state_dict"])
    assert set(trainable_names(module)) <= saved
    assert not any(k.startswith(("model.encoder.model.", "model.llm.model.")) for k in saved)
    assert all(k.startswith("model.adapter.") for k in saved)
    assert ckpt["hyper_parameters"]["llm"]["name_or_path"].startswith(str(tiny_dir))
    restored = SparQLeModule.load_from_checkpoint(tmp_path / "m.ckpt")
    assert set(checkpoint_names(module)) == saved  # trained tensors; frozen ones are not saved
    for k in saved:
        assert torch.equal(module.state_dict()[k], restored.state_dict()[k]), k

    # a checkpoint from another adapter is refused with a message naming the mismatch
    other = make_module(tiny_dir, synth_data, "stage=instruct", "adapter.num_queries=3")
    with pytest.raises(CheckpointMismatch, match="wrongly shaped.*query_tokens"):
        other.on_load_checkpoint(ckpt)


def test_instruct_initialises_adapter_from_pretrain_checkpoint(
    tiny_dir, synth_data, batch, tmp_path
):

    pre = make_module(tiny_dir, synth_data, "stage=pretrain")
    one_step(pre, batch)
    save_checkpoint(pre, tmp_path / "pre.ckpt")
    inst = make_module(
        tiny_dir, synth_data, "stage=instruct", f"stage.init_from={tmp_path / 'pre.ckpt'}"
    )
    q_pre = pre.model.adapter.qformer.state_dict()
    q_inst = inst.model.adapter.qformer.state_dict()
    assert all(torch.equal(q_pre[k], q_inst[k]) for k in q_pre)

    # stage 1 never trains the projection into the LLM, so a stage-1 checkpoint made with an LLM
    # of another width still initialises stage 2; a trained tensor of the wrong shape does not
    ckpt = torch.load(tmp_path / "pre.ckpt", weights_only=True)
    assert "model.adapter.proj.weight" not in ckpt["sparqle_trainable"]
    ckpt["state_dict"]["model.adapter.proj.weight"] = torch.zeros(7, 5)
    torch.save(ckpt, tmp_path / "other_llm.ckpt")
    inst = make_module(
        tiny_dir, synth_data, "stage=instruct", f"stage.init_from={tmp_path / 'other_llm.ckpt'}"
    )
    assert torch.equal(
        inst.model.adapter.qformer.query_tokens, pre.model.adapter.qformer.query_tokens
    )
    ckpt["state_dict"]["model.adapter.qformer.query_tokens"] = torch.zeros(1, 3, 5)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointMismatch, match="query_tokens"):
        make_module(
            tiny_dir, synth_data, "stage=instruct", f"stage.init_from={tmp_path / 'bad.ckpt'}"
        )


def test_init_from_none_is_said_and_missing_one_warns_or_stops(tiny_dir, synth_data, caplog):
    from sparqle.config_check import check_init_from

    cfg = make_cfg(tiny_dir, synth_data, "stage=instruct")
    with caplog.at_level("WARNING", logger="sparqle.train"):
        check_init_from(cfg)
    assert "starts from BERT" in caplog.text
    strict = make_cfg(tiny_dir, synth_data, "stage=instruct", "stage.require_init_from=true")
    with pytest.raises(ValueError, match=r"^stage=instruct without stage.init_from"):
        check_init_from(strict)
    said = make_cfg(
        tiny_dir,
        synth_data,
        "stage=instruct",
        "stage.require_init_from=true",
        "stage.init_from=none",
    )
    check_init_from(said)  # `none` is an answer
    SparQLeModule.from_config(said)  # and loads nothing
    check_init_from(make_cfg(tiny_dir, synth_data, "stage=pretrain"))
    check_init_from(make_cfg(tiny_dir, synth_data, "stage=instruct", "adapter=linear"))


@pytest.mark.parametrize("visible", [2, 8, 16])
def test_cuda_random_states_restore_on_another_device_count(monkeypatch, caplog, visible):
    """A run saved on 8 GPUs a rank resumes on an allocation with 2 (or 16): the devices both
    have get their states back, with one warning; no IndexError."""
    from sparqle.checkpoints import rng_state as _rng_state
    from sparqle.checkpoints import set_rng_state as _set_rng_state

    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(
        torch.cuda, "get_rng_state_all", lambda: [torch.tensor([d]) for d in range(8)]
    )
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.__setitem__(d, int(s)))
    saved = _rng_state()
    with caplog.at_level("WARNING"):
        _set_rng_state(saved)
    assert restored == {d: d for d in range(min(8, visible))}
    warned = [r for r in caplog.records if "CUDA random states" in r.getMessage()]
    assert len(warned) == (visible != 8)
