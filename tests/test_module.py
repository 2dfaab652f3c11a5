from dataclasses import replace
from unittest import mock

import pytest
import torch

from sparqle.checkpoints import CheckpointMismatch, checkpoint_names, trainable_names
from sparqle.data.manifest_datamodule import ManifestDataModule
from sparqle.lit_module import SparQLeModule
from tests.helpers import HostReads, make_cfg, make_module, one_step, save_checkpoint


@pytest.fixture(scope="module")
def batch(synth_data):
    dm = ManifestDataModule(train_manifest=str(synth_data / "train.jsonl"), batch_size=4)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


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


@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
def test_bf16_frozen_encoder_feeds_the_fp32_adapter(tiny_dir, synth_data, batch, stage):
    # the demo's setting on CPUs with bf16 maths: half-cost encoding, full-precision training
    module = make_module(tiny_dir, synth_data, f"stage={stage}", "encoder.dtype=bfloat16")
    assert next(module.model.encoder.parameters()).dtype == torch.bfloat16
    loss = module.model_step(batch)["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


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


def test_optimizer_eps_and_schedule_from_the_stage_config(tiny_dir, synth_data):
    import lightning as L

    module = make_module(
        tiny_dir,
        synth_data,
        "stage=instruct",
        "stage.optim.eps=1e-5",
        "stage.optim.schedule=constant",
        "stage.optim.lr=1e-4",
        "stage.optim.warmup_init_lr=1e-6",
        "stage.optim.warmup_steps=10",
    )
    trainer = L.Trainer(accelerator="cpu", max_steps=1000, logger=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    with mock.patch.object(
        L.Trainer, "estimated_stepping_batches", new_callable=mock.PropertyMock, return_value=1000
    ):
        opt = module.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    assert optimizer.defaults["eps"] == 1e-5
    lrs = []
    for _ in range(500):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-6)  # fairseq's --warmup-init-lr
    assert lrs[5] == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    assert lrs[10:] == [pytest.approx(1e-4)] * 490  # constant after warm-up


def _optimizer(module):
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", max_steps=100, logger=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    with mock.patch.object(
        L.Trainer, "estimated_stepping_batches", new_callable=mock.PropertyMock, return_value=100
    ):
        return module.configure_optimizers()["optimizer"]


def test_fresh_cross_attention_learns_at_its_own_rate(tiny_dir, synth_data, batch, tmp_path):
    scale = "stage.optim.new_cross_attention_lr_scale=10"
    pre = make_module(tiny_dir, synth_data, "stage=pretrain", "stage.optim.lr=1e-4", scale)
    names = {id(p): n for n, p in pre.named_parameters()}
    opt = _optimizer(pre)
    by_rate: dict[float, list[str]] = {}
    for g in opt.param_groups:
        by_rate.setdefault(g["initial_lr"], []).extend(names[id(p)] for p in g["params"])
    assert sorted(by_rate) == [pytest.approx(1e-4), pytest.approx(1e-3)]
    fast = by_rate[max(by_rate)]
    assert fast and all("crossattention" in n for n in fast)
    assert not any("crossattention" in n for n in by_rate[min(by_rate)])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable_names(pre))
    # from a stage-1 checkpoint the cross-attention is trained already: one rate again
    one_step(pre, batch)
    save_checkpoint(pre, tmp_path / "pre.ckpt")
    inst = make_module(
        tiny_dir,
        synth_data,
        "stage=instruct",
        "stage.optim.lr=1e-4",
        scale,
        f"stage.init_from={tmp_path / 'pre.ckpt'}",
    )
    assert [g["initial_lr"] for g in _optimizer(inst).param_groups] == [pytest.approx(1e-4)] * 2


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


def test_weight_decay_groups_and_temperature_clamp_follow_the_config(tiny_dir, synth_data):
    """The paper preset's grouping: fairseq's Adam decays every parameter (no_decay: []); and no
    clamp on the contrastive temperature (BLIP-2, the authors' stage 1)."""

    def groups(*overrides):
        module = make_module(tiny_dir, synth_data, "stage=pretrain", *overrides)
        opt = _optimizer(module)
        return module, [(g["weight_decay"], len(g["params"])) for g in opt.param_groups]

    _, ours = groups()
    assert any(wd == 0.0 for wd, _ in ours) and any(wd > 0 for wd, _ in ours)
    module, fairseq = groups("stage.optim.no_decay=[]")
    assert all(wd == 0.05 for wd, _ in fairseq)
    assert sum(n for _, n in fairseq) == len(trainable_names(module))
    module, _ = groups("stage.pretrain.temperature_clamp=null")
    with torch.no_grad():
        module.model.heads.temp.fill_(2.0)
    module.model.heads.clamp_temperature()
    assert float(module.model.heads.temp) == 2.0
    module, _ = groups()
    with torch.no_grad():
        module.model.heads.temp.fill_(2.0)
    module.model.heads.clamp_temperature()
    assert float(module.model.heads.temp) == 0.5
