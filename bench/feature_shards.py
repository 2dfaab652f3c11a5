"""Training steps/s from feature shards vs raw audio, and feature bytes per audio hour.

    python bench/feature_shards.py                       # the demo's encoder, as `make demo` sets it
    python bench/feature_shards.py --overrides encoder.whisper_window_seconds=null data.max_seconds=30
    python bench/feature_shards.py --float32             # the arithmetic of a CPU without bf16

Needs the demo's audio shards (`make demo`, or its first two steps). Extracts the demo's train
and val features with the run's encoder config (timed), then runs `train.py experiment=demo`
for each stage twice, from audio shards with the encoder running every step
(encoder.cache_features=false) and from the feature shards, and prints the mean logged step
time after the first logged interval. Stage 2 starts from the fresh Q-Former
(stage.init_from=none): the step time does not depend on its weights. Then the disk a feature
shard takes per hour of audio for each conf/encoder config, from its shapes: frames/s x hidden
size x bytes of the dtype (+ the tar headers and JSON, measured on the demo's shards).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# hidden size and frames per second of each conf/encoder config's model (its published config;
# all of them emit 50 frames/s: a 320-sample conv stride, or Whisper's 2x-downsampled 100 Hz mel)
SHAPES = {
    "hubert_base": (768, 50.0),
    "hubert_large": (1024, 50.0),
    "wav2vec2_large": (1024, 50.0),
    "wavlm_large": (1024, 50.0),
    "whisper_medium": (1024, 50.0),
    "whisper_tiny_en": (384, 50.0),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def run(args: list[str], log: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    with log.open("w") as f:
        proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(args[:4])} ... failed: see {log}")


def step_time(run_dir: Path) -> float:
    rows = csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open())
    times = [float(r["throughput/step_time_s"]) for r in rows if r.get("throughput/step_time_s")]
    return statistics.mean(times[1:] if len(times) > 1 else times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--float32", action="store_true", help="force float32 (no bf16 anywhere)")
    p.add_argument("--overrides", nargs="*", default=[], help="more train.py overrides")
    args = p.parse_args()
    py = sys.executable
    precision = ["encoder.dtype=float32", "trainer.precision=32-true"] if args.float32 else []
    common = ["experiment=demo", *precision, *args.overrides]
    out = Path(tempfile.mkdtemp(prefix="feature-shards-"))
    feats = out / "features"
    # the encoder config a demo run uses, so the features match it
    from hydra import compose, initialize_config_dir

    from sparqle.config import register_resolvers

    register_resolvers()

    os.environ.setdefault("SPARQLE_ROOT", str(ROOT))
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=common)
    dtype = cfg.encoder.dtype
    window = cfg.encoder.get("whisper_window_seconds")
    window = "null" if window is None else window
    t = time.perf_counter()
    for split in ("train", "val"):
        run(
            [
                py,
                "-m",
                "data_prep.extract_features",
                "--shards",
                str(args.data / "shards" / f"{split}.json"),
                "--out",
                str(feats),
                "encoder=whisper_tiny_en",
                f"encoder.dtype={dtype}",
                f"encoder.layer={cfg.encoder.layer}",
                f"encoder.whisper_window_seconds={window}",
            ],
            out / f"extract-{split}.log",
        )
    extract_s = time.perf_counter() - t
    index = json.loads((feats / "train.json").read_text())
    seconds = index["hours"] * 3600 + json.loads((feats / "val.json").read_text())["hours"] * 3600
    feature_bytes = sum(f.stat().st_size for f in feats.glob("*.tar"))
    results = {}
    for stage in ("pretrain", "instruct"):
        init = ["stage.init_from=none"] if stage == "instruct" else []
        for source, data in (
            ("audio", ["data=shards", "encoder.cache_features=false"]),
            (
                "features",
                [
                    "data=feature_shards",
                    f"data.train.main.urls={feats / 'train.json'}",
                    f"data.val.urls={feats / 'val.json'}",
                ],
            ),
        ):
            run_dir = out / f"{stage}-{source}"
            run(
                [
                    py,
                    "train.py",
                    *common,
                    f"stage={stage}",
                    *init,
                    *data,
                    f"trainer.max_steps={args.steps}",
                    "val_every_n_steps=1000",
                    "trainer.limit_val_batches=0",
                    f"hydra.run.dir={run_dir}",
                ],
                out / f"{stage}-{source}.log",
            )
            results[(stage, source)] = step_time(run_dir)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    print(f"# {time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, encoder dtype {dtype}")
    print(f"# overrides: {' '.join(common)}")
    print(f"extraction (train + val, {seconds / 3600:.3f} h of audio): {extract_s:.0f} s")
    print("| stage | audio, encoder each step | feature shards | speed-up |")
    print("|---|---|---|---|")
    for stage in ("pretrain", "instruct"):
        a, f = results[(stage, "audio")], results[(stage, "features")]
        print(f"| {stage} | {1 / a:.2f} steps/s | {1 / f:.2f} steps/s | {a / f:.1f}x |")
    overhead = feature_bytes / seconds - SHAPES["whisper_tiny_en"][0] * 50 * DTYPE_BYTES[dtype]
    print(
        f"\ndemo feature shards: {feature_bytes / 1e6:.0f} MB for {seconds / 3600:.3f} h "
        f"({feature_bytes / seconds * 3600 / 1e9:.2f} GB/h; tar headers + JSON "
        f"{overhead * 3600 / 1e6:.1f} MB/h)"
    )
    print(
        "| encoder config | hidden | frames/s | GB per audio hour, bf16 | float32 | 960 h, bf16 |"
    )
    print("|---|---|---|---|---|---|")
    for name, (hidden, fps) in SHAPES.items():
        per_h = {d: (hidden * fps * b + overhead) * 3600 for d, b in DTYPE_BYTES.items()}
        print(
            f"| {name} | {hidden} | {fps:g} | {per_h['bfloat16'] / 1e9:.2f} | "
            f"{per_h['float32'] / 1e9:.2f} | {per_h['bfloat16'] * 960 / 1e9:.0f} GB |"
        )
    print(f"\n(runs and logs in {out})")


if __name__ == "__main__":
    main()
