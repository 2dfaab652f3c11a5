"""How training runs on the hardware: FSDP2 over the model's blocks, bf16 on CPUs that have it.

`trainer=fsdp` is `FSDP2Strategy`: Lightning's ModelParallelStrategy (which runs torch's
`fully_shard` on CPU processes over gloo as well as on GPUs over NCCL) with SparQLe's sharding
plan and checkpoints that hold only what is trained, in the same single-file layout as a
one-device or DDP run, so every checkpoint resumes on any number of ranks and exports alike.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import HalfPrecision
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn

from sparqle.checkpoints import checkpoint_names
from sparqle.models.blocks import block_classes, checkpoint_blocks

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from sparqle.models.sparqle import SparQLe

SHARDINGS = ("auto", "full", "hybrid")


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def shard_model(
    model: SparQLe,
    mesh: DeviceMesh,
    compute_dtype: torch.dtype = torch.bfloat16,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
) -> list[str]:
    """Apply FSDP2 bottom-up; returns the names of the units, root last.

    Units: every transformer block (encoder, Q-Former, LLM); the LLM's input and output
    embeddings (one unit when tied); each frozen base model's remaining weights (the encoder's
    conv front end, the LLM's final norm); the stage-1 heads; and the root, which holds the
    adapter's remaining weights. Frozen units keep their stored dtype (bf16 for the paper) and
    never enter the optimizer; units that train keep fp32 master weights and compute in
    `compute_dtype`, reducing gradients in fp32. The LLM's tail (norm, head) stays gathered
    from forward to backward, as transformers' own FSDP plan does.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # the units, bottom-up: (modules, kept gathered after forward, compute dtype or None)
    plan: list[tuple[list[nn.Module], bool, torch.dtype | None]] = []
    blocks = tuple(block_classes(model))
    plan += [([m], False, None) for m in model.modules() if isinstance(m, blocks)]
    if model.llm is not None:
        lm = model.llm.model
        embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
        if head is not None and head.weight is embed.weight:
            plan.append(([embed, head], True, None))
        else:
            plan.append(([embed], False, None))
            if head is not None:
                plan.append(([head], True, None))
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        plan.append(([base.base_model], True, None))
    if hasattr(model.encoder, "model"):  # none from feature shards
        plan.append(([model.encoder.model], False, None))
    if model.heads is not None:  # ITC/ITM/ITG compute in fp32 (temperature-scaled similarities)
        plan.append(([model.heads], False, torch.float32))
    plan.append(([model], False, None))

    if activation_checkpointing:  # before sharding: a recomputed block is then one unit
        checkpoint_blocks(model, keep=lambda block: _trains_through(block, model))
    names = {m: n for n, m in model.named_modules()}
    taken: set[int] = set()
    policies = []
    for parts, _, dtype in plan:  # each parameter belongs to the lowest unit holding it
        own = [p for m in parts for p in m.parameters() if id(p) not in taken]
        taken.update(id(p) for p in own)
        policies.append(_policy(own, dtype or compute_dtype))
    units = []
    for (parts, keep, _), policy in zip(plan, policies, strict=True):
        fully_shard(
            parts if len(parts) > 1 else parts[0],
            mesh=mesh,
            mp_policy=policy,
            reshard_after_forward=reshard_after_forward and not keep,
        )
        units.append("+".join(names[m] or "<root>" for m in parts))
    for method in ("pretrain", "generate"):
        register_fsdp_forward_method(model, method)
    return units


def _policy(params: list[nn.Parameter], compute_dtype: torch.dtype):
    """Frozen units as stored; units that train compute in compute_dtype, or lower where they
    hold frozen weights of lower precision (LoRA in a bf16 LLM block, as peft computes it), so
    what they hand on matches the frozen units around them. Gradients reduce in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not any(p.requires_grad for p in params):
        return MixedPrecisionPolicy()
    frozen = {p.dtype for p in params if not p.requires_grad and p.is_floating_point()}
    dtype = min(frozen | {compute_dtype}, key=lambda d: torch.finfo(d).bits)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def _trains_through(module: nn.Module, root: SparQLe) -> bool:
    """Whether backward runs through `module`: it trains, or sits after the adapter (the LLM)."""
    return _trains(module) or (root.llm is not None and module in set(root.llm.modules()))


def _optimizer_state_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """torch.distributed's name-keyed optimizer state -> the index-keyed layout of
    `Optimizer.state_dict()` (indices run over the param groups in order)."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {
        "state": {index[n]: v for n, v in state["state"].items()},
        "param_groups": groups,
    }


def _optimizer_state_by_name(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, module: nn.Module
) -> dict[str, Any]:
    """The inverse, for this optimizer over this module."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    order = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def resolve_sharding(sharding: str, num_nodes: int) -> str:
    """`auto`: shard over every rank on one node, inside each node (HSDP) on several."""
    if sharding == "auto":
        return "hybrid" if num_nodes > 1 else "full"
    return sharding


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (`fully_shard`) with SparQLe's plan; `sharding=hybrid` shards within a node and
    replicates across nodes (HSDP, a 2-D mesh); `auto` (the default) is `full` on one node and
    `hybrid` on several, so the frozen LLM's weights are gathered over NVLink inside a node and
    never cross the slower network between nodes each micro-batch."""

    def __init__(
        self,
        sharding: str = "auto",
        compute_dtype: str = "bfloat16",
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if sharding not in SHARDINGS:
            raise ValueError(
                f"trainer.strategy.sharding={sharding!r}: expected one of {', '.join(SHARDINGS)}"
            )
        super().__init__(
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.sharding = sharding
        self.compute_dtype = getattr(torch, compute_dtype)
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing
        self.units: list[str] = []

    # ------------------------------------------------------------------ mesh and wrapping
    def setup_environment(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self._setup_distributed()
        self.sharding = resolve_sharding(self.sharding, self.num_nodes)
        if self.sharding == "hybrid":
            shape, dims = (self.num_nodes, self.num_processes), ("replicate", "shard")
        else:
            shape, dims = (self.world_size,), ("shard",)
        self._device_mesh = init_device_mesh(self.root_device.type, shape, mesh_dim_names=dims)
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def shard(self, model: SparQLe) -> None:
        self.units = shard_model(
            model,
            self.device_mesh,
            self.compute_dtype,
            self.reshard_after_forward,
            self.activation_checkpointing,
        )

    def setup(self, trainer) -> None:
        if isinstance(self.precision_plugin, HalfPrecision):
            raise ValueError(
                f"trainer.precision={trainer.precision} with trainer=fsdp would cast the trained "
                "weights too: use bf16-mixed (hold frozen parts in bf16 with encoder.dtype/llm.dtype)"
            )
        super().setup(trainer)

    # ------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The tensors the module checkpoints, gathered in full on rank 0; the frozen weights
        are neither gathered nor saved."""
        from torch.distributed.tensor import DTensor

        module = self.lightning_module
        keep = set(checkpoint_names(module))
        out = {}
        for name, value in module.state_dict().items():  # sharded views: no communication
            if name not in keep:
                continue
            if isinstance(value, DTensor):
                value = value.full_tensor()
            if self.is_global_zero:
                out[name] = value.detach().cpu()
        return out

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        state = get_optimizer_state_dict(
            self.lightning_module,
            optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        return _optimizer_state_by_index(state) if self.is_global_zero else {}

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(
            self.lightning_module,
            dict(checkpoint["state_dict"]),
            options=StateDictOptions(full_state_dict=True, strict=False),
        )

    def load_optimizer_state_dict(self, checkpoint) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            set_optimizer_state_dict(
                self.lightning_module,
                optimizer,
                optim_state_dict=_optimizer_state_by_name(state, optimizer, self.lightning_module),
                options=StateDictOptions(full_state_dict=True, strict=False),
            )


BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 / AMX, Arm FEAT_BF16


class TrainableOnlyDDPStrategy(DDPStrategy):
    """DDP that synchronises only what is trained. Frozen parameters and every buffer are left
    out of DDP's start-up broadcast (16 GB of Llama-3-8B + HuBERT-large weights each rank
    already loaded from the same files) and buffers are not re-broadcast at each forward;
    gradients live in DDP's buckets (`gradient_as_bucket_view`), not in a second copy."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("broadcast_buffers", False)
        kwargs.setdefault("gradient_as_bucket_view", True)
        super().__init__(**kwargs)

    def _setup_model(self, model: nn.Module):
        from torch.nn.parallel import DistributedDataParallel

        ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
        ignore += [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        return super()._setup_model(model)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU does bf16 matrix maths in hardware (there bf16 is ~2x faster than fp32;
    elsewhere it is emulated and slower). Reads /proc/cpuinfo; False where it cannot tell."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    lines = re.findall(r"^(?:flags|Features)\s*:(.*)$", cpuinfo, re.MULTILINE)
    return bool(lines) and bool(BF16_CPU_FLAGS & set(lines[0].split()))


def load_device(accelerator: str, devices) -> str | None:
    """This rank's GPU, where frozen weights are loaded straight to (None: load on the host, as
    on a CPU). The launcher's local rank picks it (torchrun's LOCAL_RANK, SLURM's SLURM_LOCALID,
    the ranks Lightning starts itself), from `trainer.devices` where that lists device ids."""
    import os

    if str(accelerator) not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
        return None
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    ids = None if devices is None or isinstance(devices, int | str) else list(devices)
    return f"cuda:{ids[local] if ids and local < len(ids) else local}"
