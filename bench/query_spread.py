"""How far apart a checkpoint's Q-Former queries are: the spread (per channel, the standard
deviation across one utterance's query outputs, averaged) on held-out clips, dropout off.

    python bench/query_spread.py --shards data/demo/shards/val.json CKPT [CKPT ...]
    python bench/query_spread.py --shards data/demo/shards/val.json --layers CKPT

Near 0.01 (the floor of `query_spread`) the queries have collapsed into one vector repeated
Nq times: the LLM then reads one vector however many queries there are (docs/paper_recipe.md).
`--layers` adds the spread after each Q-Former layer: where the collapse starts.
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
from sparqle.export import load_model  # noqa: E402
from sparqle.lit_module import SparQLeModule  # noqa: E402
from sparqle.models.pretrain import query_spread  # noqa: E402

COLLAPSED = 0.05


@torch.no_grad()
def spread(module: SparQLeModule, batches: list) -> list[float]:
    """[after layer 1, ..., after the last layer] (the last is the output the LLM reads)."""
    qformer = module.model.adapter.qformer
    outs: list[torch.Tensor] = []

    def keep(_module, _inputs, output) -> None:
        outs.append(output[0] if isinstance(output, tuple) else output)

    hooks = [layer.register_forward_hook(keep) for layer in qformer.qformer.encoder.layer]
    per_batch = []
    try:
        for batch in batches:
            outs.clear()
            enc = module.model.encode(batch.audio, batch.audio_lens)
            qformer(enc.features, enc.mask)
            per_batch.append(
                [float(query_spread(o[:, : qformer.num_queries]).mean()) for o in outs]
            )
    finally:
        for h in hooks:
            h.remove()
    return [sum(v) / len(v) for v in zip(*per_batch, strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--shards", required=True, help="a shard index .json of held-out clips")
    p.add_argument("--batches", type=int, default=2, help="batches of 16 clips")
    p.add_argument("--layers", action="store_true", help="also the spread after each layer")
    args = p.parse_args()
    dm = ShardDataModule(val={"urls": args.shards}, batch_size=16, num_workers=0)
    dm.setup("validate")
    batches = list(itertools.islice(dm.val_dataloader(), args.batches))
    if not batches:
        raise SystemExit(f"error: --shards {args.shards}: no clips to read")
    print(f"{'checkpoint':70s} {'stage':9s} query spread")
    for path in args.checkpoints:
        module = load_model(path, generates=False)
        by_layer = spread(module, batches)
        s = by_layer[-1]
        flag = "  collapsed" if s < COLLAPSED else ""
        print(f"{str(path):70s} {module.stage:9s} {s:.3f}{flag}")
        if args.layers:
            print("  after layer " + "  ".join(f"{i}: {v:.3f}" for i, v in enumerate(by_layer, 1)))


if __name__ == "__main__":
    main()
