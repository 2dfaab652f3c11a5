"""How far apart a checkpoint's Q-Former queries are: the spread (per channel, the standard
deviation across one utterance's query outputs, averaged) on held-out clips, dropout off.

    python bench/query_spread.py --shards data/demo/shards/val.json CKPT [CKPT ...]

Near 0.01 (the floor of `query_spread`) the queries have collapsed into one vector repeated
Nq times: the LLM then reads one vector however many queries there are (docs/paper_recipe.md).
Works on stage-1 and stage-2 checkpoints alike.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparqle.data.shard_datamodule import ShardDataModule  # noqa: E402
from sparqle.evaluation import load_model  # noqa: E402
from sparqle.models.pretrain import query_spread  # noqa: E402
from sparqle.module import SparQLeModule  # noqa: E402

COLLAPSED = 0.05


@torch.no_grad()
def spread(module: SparQLeModule, batches: list[dict]) -> float:
    values = []
    for batch in batches:
        enc = module.model.encode(batch["audio"], batch["audio_lens"])
        values.append(query_spread(module.model.adapter.qformer(enc.features, enc.mask)).mean())
    return float(torch.stack(values).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--shards", required=True, help="a shard index .json of held-out clips")
    p.add_argument("--batches", type=int, default=2, help="batches of 16 clips")
    args = p.parse_args()
    dm = ShardDataModule(val={"urls": args.shards}, batch_size=16, num_workers=0)
    dm.setup("validate")
    batches = list(itertools.islice(dm.val_dataloader(), args.batches))
    if not batches:
        raise SystemExit(f"error: --shards {args.shards}: no clips to read")
    print(f"{'checkpoint':70s} {'stage':9s} query spread")
    for path in args.checkpoints:
        module = load_model(path, generates=False)
        s = spread(module, batches)
        flag = "  collapsed" if s < COLLAPSED else ""
        print(f"{str(path):70s} {module.stage:9s} {s:.3f}{flag}")


if __name__ == "__main__":
    main()
