"""A node's host memory for the frozen weights: ranks map the stored safetensors and share one
copy; only a dtype conversion gives every rank a private copy."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from tests.helpers import ROOT, torchrun


@pytest.fixture(scope="module")
def mid_llm(tiny, tmp_path_factory):
    """A ~120 MB bf16 Llama (big enough to see in host memory) with the tiny LLM's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("mid-llm")
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    for f in os.listdir(tiny["llm"]):
        if "token" in f or f.endswith(".jinja"):
            shutil.copy(os.path.join(tiny["llm"], f), out / f)
    return out


def _node_mb(llm, dtype, out):
    subprocess.run(
        torchrun(2) + [str(ROOT / "tests" / "host_memory_check.py"), str(llm), dtype, str(out)],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=180,
    )
    grown, weights, touched = out.read_text().split()
    return float(grown), float(weights), touched == "True"


@pytest.mark.slow
def test_two_ranks_hold_one_copy_of_weights_stored_in_their_dtype(mid_llm, tmp_path):
    shared, size, ok = _node_mb(mid_llm, "bfloat16", tmp_path / "stored")
    converted, size32, ok32 = _node_mb(mid_llm, "float32", tmp_path / "converted")
    assert ok and ok32
    # as stored: one copy for the node (the ranks' shares of the same pages), plus a little
    assert shared < 1.4 * size, (shared, size)
    # converted on load: a private copy per rank
    assert converted > 1.7 * size32, (converted, size32)
