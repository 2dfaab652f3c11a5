"""Scenarios the distributed tests run on 1 process or under `torchrun --nproc-per-node 2`.

    python tests/distributed_checks.py faults OUT --strategy ddp|fsdp|hsdp OVERRIDES...
    python tests/distributed_checks.py validate OUT --batches 1,4 --shards DIR OVERRIDES...
    python tests/distributed_checks.py host_reads OUT OVERRIDES...

Each rank writes OUT.rank<r>.pt with what the test asserts on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SPARQLE_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from sparqle.data.collate import collate  # noqa: E402
from sparqle.lit_module import SparQLeModule  # noqa: E402
from sparqle.strategies import FSDP2Strategy, TrainableOnlyDDPStrategy  # noqa: E402

RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))


def config(overrides: list[str]):
    from sparqle.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["experiment=tiny", "paths.output_dir=/tmp", *overrides])


def trainer(strategy: str, **kwargs) -> L.Trainer:
    """`hsdp`: FSDP2 on a 2-D (replicate x shard) mesh, with activation checkpointing."""
    if WORLD == 1:
        strategy_obj = "auto"
    elif strategy == "fsdp":
        strategy_obj = FSDP2Strategy(compute_dtype="float32")
    elif strategy == "hsdp":
        strategy_obj = FSDP2Strategy(
            sharding="hybrid", activation_checkpointing=True, compute_dtype="float32"
        )
    else:
        strategy_obj = TrainableOnlyDDPStrategy()
    return L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy_obj,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        **kwargs,
    )


class Weights(L.Callback):
    """The adapter's weights (gathered in full) after every training step."""

    def __init__(self) -> None:
        self.after: list[torch.Tensor] = []
        self.ddp_ignored: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.ddp_ignored = sorted(getattr(trainer.strategy.model, "parameters_to_ignore", []))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        from torch.distributed.tensor import DTensor

        w = pl_module.model.adapter.qformer.query_tokens.detach()  # trained in both stages
        self.after.append((w.full_tensor() if isinstance(w, DTensor) else w).clone())


def faults(out: str, strategy: str, overrides: list[str]) -> None:
    """Rank 1's second batch is empty (every clip skipped); rank 0's fourth loss is NaN."""
    cfg = config(overrides)
    L.seed_everything(cfg.seed)
    module = SparQLeModule.from_config(cfg)
    datamodule = instantiate(cfg.data)
    real_loader = datamodule.train_dataloader

    def loader():
        for i, batch in enumerate(real_loader()):
            if RANK == 1 and i == 1:
                batch = collate([None] * len(batch.id))  # what the pipeline yields then
            yield batch

    class Loader:  # an iterable of batches (a list would read as a list of dataloaders)
        def __iter__(self):
            return loader()

    datamodule.train_dataloader = Loader
    real_losses, calls = module.model_step, {"n": 0}

    def losses(batch):
        out = real_losses(batch)
        calls["n"] += 1
        if RANK == 0 and calls["n"] == 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    module.model_step = losses
    weights = Weights()
    run = trainer(strategy, max_steps=6, limit_val_batches=0, callbacks=[weights])
    run.fit(module, datamodule=datamodule)
    w = weights.after
    llm = module.model.llm
    torch.save(
        {
            "moved": [not torch.equal(w[i], w[i - 1]) for i in range(1, len(w))],
            "final": w[-1],
            "skipped": int(module.skips.total),
            "buffers": {} if llm is None else {n: b.dtype for n, b in llm.named_buffers()},
            "ddp_ignored": weights.ddp_ignored,
            "frozen": sorted(n for n, p in module.named_parameters() if not p.requires_grad),
            "mesh": None
            if run.strategy.__class__.__name__ != "FSDP2Strategy"
            else run.strategy.device_mesh.mesh_dim_names,
        },
        f"{out}.rank{RANK}.pt",
    )


def partial_references(module: SparQLeModule) -> None:
    """Hypotheses that are each reference cut to a length of its own, so corpus BLEU is neither
    0 nor 100 and differs from any average of per-rank scores (a random tiny LLM's German
    shares no n-gram with the references)."""
    real_step, targets = module.validation_step, []

    def step(batch, batch_idx):
        targets[:] = batch.target
        return real_step(batch, batch_idx)

    def generate(audio, audio_lens, instructions, **kwargs):
        return [" ".join(t.split()[: 1 + len(t) % 4]) for t in targets][: len(instructions)]

    module.validation_step = step
    module.model.generate = generate


def validate(out: str, overrides: list[str], batches: list[int], shards: str) -> None:
    """Validation figures over the whole validation set, for every (data module, per-rank batch
    size, model): stage 1 (ITC/ITM/ITG/R@1), stage 2 on ASR (loss, WER) and on translation
    (loss, BLEU). `shards`: a folder with val.json, the validation clips as shards."""
    results = {}
    data = {
        "manifest": lambda b, task: [
            "data=manifest",
            f"data.val_batch_size={b}",
            f"data.val_tasks={{{task}: 1.0}}",
        ],
        "shards": lambda b, task: [
            "data=shards",
            f"data.train.main.urls={shards}/val.json",
            f"data.val.urls={shards}/val.json",
            f"data.batch_size={b}",
            "data.num_workers=0",
            # evaluation gives every clip the task of highest weight
            *([f"+data.val.tasks.{task}=2.0"] if task != "transcribe" else []),
        ],
    }
    for kind, data_overrides in data.items():
        for b in batches:
            for stage, task in (
                ("pretrain", "transcribe"),
                ("instruct", "transcribe"),
                ("instruct", "translate_de"),
            ):
                # the manifests' paths are data=manifest's keys only
                common = [o for o in overrides if kind == "manifest" or "_manifest=" not in o]
                cfg = config([*data_overrides(b, task), *common, f"stage={stage}"])
                L.seed_everything(cfg.seed)
                module = SparQLeModule.from_config(cfg)
                if stage == "instruct":
                    partial_references(module)
                run = trainer("ddp")
                run.validate(module, datamodule=instantiate(cfg.data), verbose=False)
                key = f"{kind}/b{b}/{stage}/{task}"
                results[key] = {k: float(v) for k, v in run.callback_metrics.items()}
    torch.save(results, f"{out}.rank{RANK}.pt")


class _LateOnRank1:
    """A training loader whose batches come `delay` s late on rank 1 only: one starved rank."""

    def __init__(self, loader, delay: float) -> None:
        self.loader, self.delay = loader, delay

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if RANK == 1:
                time.sleep(self.delay)
            yield batch


def host_reads(out: str, overrides: list[str]) -> None:
    """Every host read of the whole training loop (Lightning's and the throughput callback's
    included), per step: the reads between one batch's start and the next's (the step, its hooks,
    the loop's own checks); rank 1's loader is late, and rank 0 records the data wait it logs."""
    from sparqle.callbacks import SpeechThroughput
    from sparqle.lifecycle import StopOnSignal
    from tests.helpers import HostReads

    cfg = config(overrides)
    L.seed_everything(cfg.seed)
    module = SparQLeModule.from_config(cfg)
    datamodule = instantiate(cfg.data)
    loader = datamodule.train_dataloader
    datamodule.train_dataloader = lambda: _LateOnRank1(loader(), delay=0.2)
    counter = HostReads()
    # host tensors, no device is read: lengths and FLOP counts built from host lists before the
    # copy, and the sampler's permutation as a new epoch's loader starts
    host_side = ("on_before_batch_transfer", "collate", "step_work", "combined_loader.py")

    class PerStep(L.Callback):
        def __init__(self) -> None:
            self.seen, self.steps = None, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.seen is not None:  # every batch but the first, across epochs
                self.steps.append(counter.reads[self.seen :])
            self.seen = len(counter.reads)

    per_step = PerStep()
    stop = StopOnSignal(checkpoint_dir=f"{out}.ckpts", check_every_n_steps=3)
    throughput = SpeechThroughput(window=3)
    run = trainer(
        "ddp",
        max_steps=10,
        limit_val_batches=0,
        log_every_n_steps=3,
        callbacks=[stop, per_step, throughput],
    )
    with counter:
        run.fit(module, datamodule=datamodule)
    steps = [[r for r in reads if not any(h in r for h in host_side)] for reads in per_step.steps]
    wait = float(run.callback_metrics.get("train/data_wait", -1.0))
    torch.save({"steps": steps, "data_wait": wait}, f"{out}.rank{RANK}.pt")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["faults", "validate", "host_reads"])
    p.add_argument("out")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "hsdp"])
    p.add_argument("--batches", default="1,4", help="validate: per-rank batch sizes")
    p.add_argument("--shards", default="", help="validate: the folder of the tiny shards")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    if args.scenario == "faults":
        faults(args.out, args.strategy, args.overrides)
    elif args.scenario == "host_reads":
        host_reads(args.out, args.overrides)
    else:
        validate(args.out, args.overrides, [int(b) for b in args.batches.split(",")], args.shards)
