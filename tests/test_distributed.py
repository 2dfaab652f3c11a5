import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparqle.distributed import gather_objects, gather_rows


def test_one_process_gathers_itself():
    x = torch.randn(3, 4, requires_grad=True)
    y, offset = gather_rows(x)
    assert y is x and offset == 0 and gather_objects("a") == ["a"]


def _gather_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # ranks hold 2 and 3 rows, of 2 and 3 columns: rows are padded to the widest
    x = torch.full((rank + 2, rank + 2), float(rank + 1), requires_grad=True)
    y, offset = gather_rows(x, pad_value=-1)
    # every rank computes the same loss over the gathered rows (as ITC does over its columns)
    (y * torch.arange(1, y.shape[0] + 1)[:, None]).sum().backward()
    torch.save(
        {"offset": offset, "rows": y.detach(), "grad": x.grad, "objects": gather_objects(rank)},
        f"{out}.{rank}",
    )
    dist.destroy_process_group()


def test_rows_gathered_across_ranks_with_every_ranks_gradient(tmp_path):
    mp.spawn(
        _gather_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True
    )
    r0, r1 = (torch.load(tmp_path / f"out.{r}", weights_only=True) for r in (0, 1))
    assert (r0["offset"], r1["offset"]) == (0, 2) and r0["objects"] == r1["objects"] == [0, 1]
    assert torch.equal(r0["rows"], r1["rows"]) and r0["rows"].shape == (5, 3)
    assert r0["rows"][:2, :2].eq(1).all() and r0["rows"][:2, 2].eq(-1).all()
    assert r0["rows"][2:].eq(2).all()
    # each rank's rows get both ranks' gradients (2 x the row weight): averaged over the two
    # ranks, as DDP does, that is the gradient of one process holding all five rows
    assert torch.equal(r0["grad"], 2 * torch.tensor([[1.0] * 2, [2.0] * 2]))
    assert torch.equal(r1["grad"], 2 * torch.tensor([[3.0] * 3, [4.0] * 3, [5.0] * 3]))


def _node_worker(rank: int, init_file: str, out: str) -> None:
    import os

    os.environ["LOCAL_WORLD_SIZE"] = "1"  # two "nodes" of one rank each
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from sparqle.distributed import exchange_sizes, node_group

    sizes = exchange_sizes([rank + 2, 7])
    group, members = node_group()
    x = torch.full((rank + 2, 3), float(rank))
    mine, offset = gather_rows(x, rows=[sizes[r][0] for r in members], group=group)
    everyone, _ = gather_rows(x, rows=[s[0] for s in sizes])
    torch.save(
        {"sizes": sizes, "members": members, "mine": mine, "offset": offset, "all": everyone},
        f"{out}.{rank}",
    )
    dist.destroy_process_group()


def test_one_exchange_of_sizes_then_gathers_over_a_node_or_everyone(tmp_path):
    """What stage 1's ITM gathers: with a node of one rank, only that rank's rows; the shapes come
    from one exchange a step."""
    mp.spawn(
        _node_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True
    )
    r0, r1 = (torch.load(tmp_path / f"out.{r}", weights_only=True) for r in (0, 1))
    assert r0["sizes"] == r1["sizes"] == [[2, 7], [3, 7]]
    assert (r0["members"], r1["members"]) == ([0], [1])
    assert r0["mine"].shape == (2, 3) and r1["mine"].shape == (3, 3) and r1["offset"] == 0
    assert torch.equal(r0["all"], r1["all"]) and r0["all"].shape == (5, 3)
