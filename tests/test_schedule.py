import pytest
import torch

from sparqle.optim import build_scheduler, lr_factor


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
