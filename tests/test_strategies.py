import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerLayer

from sparqle.models.pretrain import gather_with_grad
from sparqle.strategies import block_classes, cpu_has_native_bf16
from tests.conftest import ROOT
from tests.test_module import make_cfg, make_module


def test_fsdp_wraps_exactly_the_transformer_blocks(tiny_dir, synth_data):
    module = make_module(tiny_dir, synth_data, "stage=instruct")
    blocks = block_classes(module)
    names = {c.__name__ for c in blocks}
    assert names == {"LlamaDecoderLayer", "HubertEncoderLayerStableLayerNorm", "Blip2QFormerLayer"}
    wrapped = [m for m in module.modules() if isinstance(m, tuple(blocks))]
    llm_layers = module.model.llm.model.config.num_hidden_layers
    enc_layers = module.model.encoder.model.config.num_hidden_layers
    q_layers = sum(isinstance(m, Blip2QFormerLayer) for m in module.modules())
    assert len(wrapped) == llm_layers + enc_layers + q_layers == 2 + 2 + 2
    # the conv front end is not a unit
    assert not any("Conv" in n for n in names)

    cfg = make_cfg(
        tiny_dir,
        synth_data,
        "stage=instruct",
        "trainer=fsdp",
        "trainer.strategy.activation_checkpointing=true",
    )
    assert cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.trainer.strategy)(module)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    assert set(policy._module_classes) == blocks


def _gather_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x = torch.full((rank + 2, 3), float(rank + 1), requires_grad=True)  # ranks hold 2 and 3 rows
    y, offset = gather_with_grad(x)
    (y * torch.arange(1, y.shape[0] + 1)[:, None]).sum().backward()
    torch.save(
        {"shape": tuple(y.shape), "offset": offset, "rows": y.detach(), "grad": x.grad},
        f"{out}.{rank}",
    )
    dist.destroy_process_group()


def test_contrastive_negatives_gathered_across_ranks(tmp_path):
    mp.spawn(
        _gather_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True
    )
    r0, r1 = (torch.load(tmp_path / f"out.{r}", weights_only=True) for r in (0, 1))
    assert r0["shape"] == r1["shape"] == (5, 3)
    assert (r0["offset"], r1["offset"]) == (0, 2)
    assert (
        torch.equal(r0["rows"], r1["rows"])
        and r0["rows"][:2].eq(1).all()
        and r0["rows"][2:].eq(2).all()
    )
    # gradient reaches each rank's own rows only, with those rows' weights
    assert torch.equal(r0["grad"], torch.tensor([[1.0] * 3, [2.0] * 3]))
    assert torch.equal(r1["grad"], torch.tensor([[3.0] * 3, [4.0] * 3, [5.0] * 3]))


@pytest.mark.slow
def test_ddp_two_processes_over_gloo_one_run_directory(tiny_dir, synth_data, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "experiment=tiny",
            "stage=pretrain",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            f"paths.cache_dir={tiny_dir}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"data.train_manifest={synth_data / 'train.jsonl'}",
            f"data.val_manifest={synth_data / 'val.jsonl'}",
            "callbacks.progress_bar=null",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "logs" / "tiny" / "runs").iterdir())
    assert len(runs) == 1, runs  # one directory per job, not per rank
    ckpt = torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    assert 'world_size": 2' in (runs[0] / "run_info.json").read_text()


@pytest.mark.parametrize(
    "cpuinfo, native",
    [
        ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse avx2 fma avx512f avx512_vnni\n", False),
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd crc32 atomics\n", False),
        ("", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    assert cpu_has_native_bf16(cpuinfo) is native
