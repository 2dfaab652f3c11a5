"""Data-path throughput: bare FLAC decoding (the ceiling) vs the full shard pipeline, per worker,
over the same shards; and padding with duration bucketing vs random batching.

    python bench/data_throughput.py [--shards DIR/train.json] [--n 600] [--repeats 3] [--profile]

Without --shards it synthesises --n espeak-ng clips of ~12 s and shards them first (cached).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparqle.data.bucketing import bucket_batches, padded_fraction  # noqa: E402
from sparqle.data.shard_datamodule import ShardDataModule  # noqa: E402
from sparqle.data.shards import expand_urls  # noqa: E402


def ensure_shards(n: int) -> Path:
    from data_prep.make_shards import make_shards
    from data_prep.synth_speech import synthesise
    from sparqle.data.manifest import write_manifest

    cache = ROOT / ".cache" / f"bench-data-{n}"
    index = cache / "shards" / "train.json"
    if not index.is_file():  # 5 sentences a clip: ~12-s clips, LibriSpeech's typical length
        write_manifest(
            cache / "corpus" / "manifest.jsonl",
            synthesise(cache / "corpus", n, seed=0, sentences_per_clip=5),
        )
        make_shards(
            cache / "corpus" / "manifest.jsonl",
            cache / "shards",
            "train",
            workers=2,
            shard_size_mb=2,
        )
    return index


def bare_decode(urls: list[str]) -> tuple[float, float]:
    """Audio seconds decoded and wall seconds, reading the tars and decoding every FLAC."""
    audio_s, start = 0.0, time.perf_counter()
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith(".flac"):
                    data, sr = sf.read(io.BytesIO(tar.extractfile(member).read()), dtype="float32")
                    audio_s += len(data) / sr
    return audio_s, time.perf_counter() - start


def full_pipeline(index: Path) -> tuple[float, float, list[list[int]]]:
    dm = ShardDataModule(
        train={"main": {"urls": str(index)}}, num_workers=0, max_seconds_per_batch=240
    )
    audio_s, lens, start = 0.0, [], time.perf_counter()
    for batch in dm.train_dataloader():
        audio_s += float(batch.audio_lens.sum()) / 16000
        lens.append(batch.audio_lens.tolist())
    return audio_s, time.perf_counter() - start, lens


def librispeech_like_padding(n: int = 20000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    seconds = np.concatenate(
        [
            np.clip(rng.normal(14.0, 2.5, int(n * 0.85)), 2, 35),
            rng.uniform(1, 10, n - int(n * 0.85)),
        ]
    )
    samples = [{"seconds": float(s), "target": "x" * 200} for s in seconds]
    random.Random(seed).shuffle(samples)
    batches = [[s["seconds"] for s in b] for b in bucket_batches(samples, max_seconds=240)]
    flat = [s["seconds"] for s in samples]
    bs = max(1, len(flat) // len(batches))
    return padded_fraction(batches), padded_fraction(
        [flat[i : i + bs] for i in range(0, len(flat), bs)]
    )


STAGES = {  # (file suffix, function) whose cumulative time is one stage of the full pipeline
    "FLAC decode (libsndfile)": ("soundfile.py", "read"),
    "tar stream + sample grouping (webdataset)": ("tariterators.py", "group_by_keys"),
    "padded batch copy (collate)": ("collate.py", "collate"),
}


def profile(index: Path) -> None:
    """Where the full pipeline's time goes beyond the bare decode, per stage, under cProfile."""
    prof = cProfile.Profile()
    prof.runcall(full_pipeline, index)
    stats = pstats.Stats(prof).stats  # {(file, line, fn): (cc, nc, tottime, cumtime, callers)}
    total = max(v[3] for k, v in stats.items() if k[2] == "full_pipeline")
    print(f"profile of one full-pipeline pass: {total:.3f} s under cProfile")
    accounted = 0.0
    for name, (suffix, fn) in STAGES.items():
        cum = max(
            (v[3] for k, v in stats.items() if k[0].endswith(suffix) and k[2] == fn), default=0.0
        )
        accounted += cum
        print(f"  {name:44s} {cum:7.3f} s  {cum / total:6.1%}")
    rest = total - accounted
    print(
        f"  {'the rest (shuffle, bucketing, task choice, loader)':44s} {rest:7.3f} s  {rest / total:6.1%}"
    )
    prof = cProfile.Profile()
    prof.runcall(bare_decode, expand_urls(str(index)))
    stats = pstats.Stats(prof).stats
    bare = max(v[3] for k, v in stats.items() if k[2] == "bare_decode")
    dec = max(v[3] for k, v in stats.items() if k[0].endswith("soundfile.py") and k[2] == "read")
    print(
        f"bare decode under cProfile: {bare:.3f} s, of which FLAC decode {dec:.3f} s, tarfile {bare - dec:.3f} s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, default=None, help="a shard index .json")
    p.add_argument("--n", type=int, default=300, help="clips to synthesise without --shards")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also print where the time goes")
    args = p.parse_args()
    index = args.shards or ensure_shards(args.n)
    urls = expand_urls(str(index))
    info = json.loads(index.read_text())
    print(
        f"shards: {index} ({len(urls)} shards, {info['num_samples']} clips, {info['hours'] * 60:.1f} min of audio)"
    )
    bare_decode(urls)  # warm the page cache
    bare, full = [], []
    for _ in range(args.repeats):  # interleaved, so background load hits both alike
        bare.append(bare_decode(urls))
        full.append(full_pipeline(index))
    bare_rate = max(a / t for a, t in bare)
    full_rate = max(a / t for a, t, _ in full)
    print(f"bare FLAC decode     : {bare_rate:10.0f} audio s/s per worker (best of {args.repeats})")
    print(f"full shard pipeline  : {full_rate:10.0f} audio s/s per worker (best of {args.repeats})")
    print(f"ratio                : {full_rate / bare_rate:10.2f}")
    lens = full[0][2]
    flat = [x for b in lens for x in b]
    random.Random(0).shuffle(flat)
    bs = max(1, len(flat) // len(lens))
    print(
        f"padding, these shards      : bucketed {padded_fraction(lens):.1%}  random {padded_fraction([flat[i : i + bs] for i in range(0, len(flat), bs)]):.1%}"
    )
    if args.profile:
        profile(index)
    bucketed, rand = librispeech_like_padding()
    print(
        f"padding, LibriSpeech-like  : bucketed {bucketed:.1%}  random {rand:.1%}  (20k lengths, 240 s batches)"
    )


if __name__ == "__main__":
    main()
