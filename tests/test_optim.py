"""Parameter groups, learning-rate schedules and their checks (sparqle.optim)."""

from unittest import mock

import pytest
import torch

from sparqle.checkpoints import trainable_names
from sparqle.optim import build_scheduler, lr_factor
from tests.helpers import make_module, one_step, save_checkpoint


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


def test_schedules_after_warmup():
    kw = {"warmup_steps": 10, "total_steps": 110, "min_ratio": 0.1}
    for schedule in ("constant", "cosine", "linear"):
        assert lr_factor(0, schedule=schedule, **kw) == 0.0
        assert lr_factor(5, schedule=schedule, **kw) == pytest.approx(0.5)
        assert lr_factor(10, schedule=schedule, **kw) == pytest.approx(1.0)
    assert lr_factor(60, schedule="constant", **kw) == 1.0
    assert lr_factor(60, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_factor(85, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.25)
    assert lr_factor(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(500, schedule="linear", **kw) == pytest.approx(0.1)
    assert lr_factor(0, schedule="cosine", start_ratio=0.01, **kw) == pytest.approx(0.01)


def test_unknown_schedule_or_start_rate_is_one_line():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=r"^stage.optim.schedule=step: expected one of"):
        build_scheduler(opt, {"schedule": "step"}, 100)
    with pytest.raises(ValueError, match=r"^stage.optim.warmup_init_lr=0.1"):
        build_scheduler(opt, {"lr": 1e-4, "warmup_init_lr": 0.1}, 100)
