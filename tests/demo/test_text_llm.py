"""The demo's text-only LLM build: a killed build leaves nothing a later run would mistake for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from demo import text_llm


def test_build_moves_the_model_into_place_only_when_trained(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "demo-text-llm"
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def killed_on_second_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what Ctrl-C or a scheduler's kill looks like mid-training
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", killed_on_second_step)
    with pytest.raises(KeyboardInterrupt):
        text_llm.build(out, steps=5, exclude=set(), batch=4)
    assert not out.exists()  # no random-init LLM where training looks for a taught one

    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    result = text_llm.build(out, steps=2, exclude=set(), batch=4)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    assert 0.0 <= result["exact_match"] <= 1.0
