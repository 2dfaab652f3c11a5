"""Trainable-only export for sharing: `adapter.safetensors` + the config that rebuilds the model.

    python -m sparqle.export --ckpt logs/.../checkpoints/last.ckpt --out exports/my-run [--dtype bfloat16]

The frozen encoder and LLM are not copied: `config.yaml` names them (hub name or path). What an
export holds, and how it loads: sparqle/checkpoints.py (`export`, `load_exported`).
"""

from __future__ import annotations

import argparse
import sys

from sparqle.checkpoints import export
from sparqle.cli import reports_user_errors


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, help="cast floating tensors, e.g. bfloat16")
    args = p.parse_args(argv)
    info = export(args.ckpt, args.out, args.dtype)
    print(
        f"{info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB -> {args.out}", file=sys.stderr
    )


if __name__ == "__main__":
    main()
