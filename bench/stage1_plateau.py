"""When does stage 1's contrastive loss leave its plateau at ln(batch)? Seeds x `make demo`'s stage 1.

    python bench/stage1_plateau.py --seeds 0 1 2 --steps 250          # this checkout
    python bench/stage1_plateau.py --repo ../older-checkout --seeds 0 1 2

Needs the demo's shards (`make demo`, or its first two steps). Runs `train.py experiment=demo
stage=pretrain` from `--repo` for each seed and reads the logged `train/itc` (every 10 steps):
the escape step is the first logged step at which ITC falls below ln(16) - 0.25 (16 = the demo's
batch) and stays there for the rest of the run. Prints one line per seed and the mean.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def escape_step(metrics_csv: Path, batch: int = 16, margin: float = 0.25) -> int | None:
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get("train/itc")]
    points = [(int(r["step"]), float(r["train/itc"])) for r in rows]
    bound = math.log(batch) - margin
    for i, (step, _) in enumerate(points):
        if all(v < bound for _, v in points[i:]):
            return step
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout whose train.py runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--out", type=Path, default=ROOT / "logs" / "stage1_plateau")
    p.add_argument("overrides", nargs="*", help="more Hydra overrides")
    args = p.parse_args()
    repo = args.repo.resolve()
    found = []
    for seed in args.seeds:
        run = args.out / f"{repo.name}-seed{seed}"
        cmd = [
            sys.executable,
            str(repo / "train.py"),
            "experiment=demo",
            "stage=pretrain",
            f"seed={seed}",
            f"trainer.max_steps={args.steps}",
            "val_every_n_steps=1000000",
            "trainer.limit_val_batches=0",
            f"paths.data_dir={ROOT / 'data' / 'demo'}",
            f"paths.cache_dir={ROOT / '.cache'}",
            f"hydra.run.dir={run}",
            "callbacks.progress_bar=null",
            *args.overrides,
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"seed {seed}: train.py failed:\n{proc.stderr[-2000:]}")
        step = escape_step(next(run.glob("csv/version_*/metrics.csv")))
        found.append(step)
        print(
            f"seed {seed}: leaves ln(16) at step {step if step is not None else f'> {args.steps}'}"
        )
    reached = [s for s in found if s is not None]
    if reached:
        print(
            f"mean {statistics.mean(reached):.0f} (min {min(reached)}, max {max(reached)}) over "
            f"{len(reached)} of {len(found)} seeds; repo {repo}"
        )


if __name__ == "__main__":
    main()
