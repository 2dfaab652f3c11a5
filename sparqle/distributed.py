"""Collectives the model and the metrics need across data-parallel ranks.

Every function is a no-op on one process, so single-device code calls them unconditionally.
Shapes are exchanged over a CPU (gloo) group: they are known on the host, and reading them back
from a GPU collective would stall the device queue every step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

_HOST_GROUP: Any = None


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_world(trainer: Any = None) -> tuple[int, int]:
    """(rank, world size) from a Lightning trainer where one runs the show (its ranks exist
    before the process group), else from the process group."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    return world()


def host_group():
    """A gloo group for host-side values: the default group where it is gloo already."""
    global _HOST_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def gather_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every rank's shape (same number of dims), exchanged on the host."""
    rank, size = world()
    if size == 1:
        return [tuple(shape)]
    mine = torch.tensor(shape, dtype=torch.long)
    parts = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine, group=host_group())
    return [tuple(int(v) for v in p) for p in parts]


class _GatherRows(torch.autograd.Function):
    """All ranks' rows (padded alike); backward sums every rank's gradient for this rank's rows.

    With the sum, a loss over gathered rows, averaged over ranks by DDP/FSDP, has the gradient one
    process holding the whole batch would compute (BLIP-2's GatherLayer does the same).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: list[int], rank: int, group) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in rows]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rows, ctx.rank, ctx.group = rows, rank, group
        return torch.cat([p[:n] for p, n in zip(parts, rows, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.rows[: ctx.rank])
        local = grad[start : start + ctx.rows[ctx.rank]]
        pad = max(ctx.rows) - ctx.rows[ctx.rank]
        return F.pad(local, (0, 0) * (grad.dim() - 1) + (0, pad)), None, None, None


def exchange_sizes(sizes: list[int]) -> list[list[int]]:
    """Every rank's `sizes` (the same count on each), in one exchange on the host: what a step's
    gathers need to know of the other ranks' shapes, asked once instead of per tensor."""
    _, size = world()
    if size == 1:
        return [list(sizes)]
    return [list(s) for s in gather_shapes(tuple(sizes))]


def gather_rows(
    x: torch.Tensor,
    pad_value: float = 0,
    rows: list[int] | None = None,
    group: Any = None,
) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's `x` along dim 0 and return it with this rank's first row;
    gradients reach each rank's own rows in full. `rows`: every rank's row count where known
    (from `exchange_sizes`; then the other dims must already be alike on every rank), else
    the shapes are exchanged here and the other dims padded to the largest. `group`: the ranks
    to gather over (`rows` then lists theirs); None: all."""
    if world()[1] == 1:
        return x, 0
    rank = dist.get_rank(group) if group is not None else world()[0]
    if rows is None:
        shapes = gather_shapes(tuple(x.shape))
        x = pad_to(x, [max(s[d] for s in shapes) for d in range(x.dim())], pad_value)
        rows = [s[0] for s in shapes]
    padded = pad_to(x, [max(rows), *x.shape[1:]], pad_value)
    if x.requires_grad:
        out = _GatherRows.apply(padded, rows, rank, group)
    else:
        parts = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(parts, padded.contiguous(), group=group)
        out = torch.cat([p[:n] for p, n in zip(parts, rows, strict=True)])
    return out, sum(rows[:rank])


_NODE_GROUPS: dict[int, Any] = {}


def node_group() -> tuple[Any, list[int]]:
    """The ranks of this node (consecutive ranks, LOCAL_WORLD_SIZE or SLURM_NTASKS_PER_NODE of
    them) as a process group, and their global ranks; (None, all ranks) on one node. Every rank
    must call it the first time (it creates the groups)."""
    import os

    rank, size = world()
    local = int(
        os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or size
    )
    if local >= size or size % local:
        return None, list(range(size))
    if local not in _NODE_GROUPS:
        _NODE_GROUPS[local], _ = dist.new_subgroups(group_size=local)
    first = rank - rank % local
    return _NODE_GROUPS[local], list(range(first, first + local))


def pad_to(x: torch.Tensor, sizes: list[int], value: float = 0) -> torch.Tensor:
    """Pad every dim of `x` at its end to `sizes`."""
    pad: list[int] = []
    for d in reversed(range(x.dim())):
        pad += [0, sizes[d] - x.shape[d]]
    return F.pad(x, pad, value=value)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a device collective: no host read)."""
    if world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order (on the host group)."""
    _, size = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj, group=host_group())
    return out
