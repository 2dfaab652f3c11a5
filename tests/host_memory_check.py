"""Each rank builds the frozen LLM wrapper from LLM_DIR in DTYPE and touches every weight; rank 0
writes the node's total (the ranks' proportional set sizes, shared pages split between them)
grown by the build, in MB, to OUT.

    torchrun --nproc-per-node 2 tests/host_memory_check.py LLM_DIR DTYPE OUT
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def pss_mb() -> float:
    text = Path("/proc/self/smaps_rollup").read_text()
    return (
        next(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:")) / 1024
    )


def main() -> None:
    llm_dir, dtype, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    from sparqle.models.llm import LLM

    dist.barrier()
    before = pss_mb()
    llm = LLM(llm_dir, dtype=dtype, frozen=True)
    with torch.no_grad():
        touched = sum(float(p.float().sum()) for p in llm.parameters())  # every page read
    dist.barrier()
    grown = torch.tensor([pss_mb() - before])
    dist.all_reduce(grown)
    weights_mb = sum(p.numel() * p.element_size() for p in llm.parameters()) / 2**20
    if dist.get_rank() == 0:
        Path(out).write_text(f"{float(grown):.1f} {weights_mb:.1f} {touched != 0}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
