"""Manifest -> webdataset tar shards + index.

    python -m data_prep.make_shards --manifest M.jsonl --out DIR --split NAME \
        [--workers N] [--shard-size-mb S] [--seed S]

Writes DIR/NAME-000000.tar ... and DIR/NAME.json. Each shard is written under a temporary
name and renamed when complete, with its statistics beside it (NAME-000000.tar.stats.json), so
a killed run leaves no half shard and a rerun skips the finished ones. The sample order is a
seeded shuffle of the manifest, so the output is the same for the same inputs and seed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import webdataset as wds
from rich.progress import Progress

from sparqle.cli import reports_user_errors
from sparqle.data.audio import AudioError, encode_flac, load_audio
from sparqle.data.manifest import Utterance, read_manifest
from sparqle.data.shards import (
    SHARD_PATTERN,
    ShardStats,
    sample_metadata,
    stats_from_json,
    stats_to_json,
    write_index,
)

SAMPLE_RATE = 16000
FLAC_BYTES_PER_SECOND = 20_000  # 16 kHz 16-bit speech compresses to ~15-25 kB/s


def _key(utt: Utterance) -> str:
    # webdataset splits keys at the first dot of the file name
    return utt.id.replace(".", "_").replace("/", "_")


def write_shard(path: Path, utterances: list[Utterance]) -> ShardStats:
    """Encode one shard to path (atomically); unusable inputs are counted by reason."""
    stats = ShardStats(url=path.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with wds.TarWriter(str(tmp), mtime=0.0) as sink:  # fixed mtime: same inputs, same bytes
        for utt in utterances:
            if not utt.text.strip():
                stats.skipped["no text"] = stats.skipped.get("no text", 0) + 1
                continue
            try:
                audio = load_audio(utt.audio, SAMPLE_RATE, name=utt.id)
            except AudioError as exc:
                reason = (
                    "empty audio"
                    if "empty" in str(exc)
                    else "NaN audio"
                    if "NaN" in str(exc)
                    else "unreadable audio"
                )
                stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
                print(f"skipping {exc}", file=sys.stderr)
                continue
            duration = len(audio) / SAMPLE_RATE
            sink.write(
                {
                    "__key__": _key(utt),
                    "flac": encode_flac(audio, SAMPLE_RATE),
                    "json": sample_metadata(utt, duration),
                }
            )
            stats.samples += 1
            stats.seconds += duration
            stats.durations.append(round(duration, 3))
    stats_path = path.with_name(path.name + ".stats.json")
    tmp_stats = stats_path.with_name(f".{stats_path.name}.tmp")
    tmp_stats.write_text(stats_to_json(stats))
    tmp.replace(path)
    tmp_stats.replace(stats_path)
    return stats


def plan_shards(
    utterances: list[Utterance], shard_size_mb: float, seed: int
) -> list[list[Utterance]]:
    """Seeded shuffle, then consecutive groups of about shard_size_mb of FLAC each."""
    order = list(utterances)
    random.Random(seed).shuffle(order)
    groups, current, size = [], [], 0.0
    budget = shard_size_mb * 1e6
    for utt in order:
        est = (utt.duration or 10.0) * FLAC_BYTES_PER_SECOND
        if current and size + est > budget:
            groups.append(current)
            current, size = [], 0.0
        current.append(utt)
        size += est
    if current:
        groups.append(current)
    return groups


def make_shards(
    manifest: Path,
    out: Path,
    split: str,
    workers: int = 1,
    shard_size_mb: float = 200.0,
    seed: int = 0,
) -> dict:
    utterances = read_manifest(manifest)
    missing_duration = [u for u in utterances if u.duration is None]
    if missing_duration:
        # Durations size the shards; read them from the file headers (cheap, no decode).
        import soundfile as sf

        for u in missing_duration:
            try:
                u.duration = sf.info(u.audio).duration
            except Exception:  # unreadable: counted when the shard is written
                u.duration = 0.0
    out.mkdir(parents=True, exist_ok=True)
    groups = plan_shards(utterances, shard_size_mb, seed)
    paths = [out / SHARD_PATTERN.format(split=split, index=i) for i in range(len(groups))]
    stats: dict[int, ShardStats] = {}
    todo = []
    for i, path in enumerate(paths):
        stats_path = path.with_name(path.name + ".stats.json")
        if path.is_file() and stats_path.is_file():
            stats[i] = stats_from_json(stats_path.read_text())
        else:
            todo.append(i)
    with Progress(transient=not sys.stderr.isatty()) as progress:
        task = progress.add_task(
            f"{split}: shards", total=len(groups), completed=len(groups) - len(todo)
        )
        if workers <= 1:
            for i in todo:
                stats[i] = write_shard(paths[i], groups[i])
                progress.advance(task)
        else:
            with ProcessPoolExecutor(workers) as pool:
                futures = {pool.submit(write_shard, paths[i], groups[i]): i for i in todo}
                for fut in as_completed(futures):
                    stats[futures[fut]] = fut.result()
                    progress.advance(task)
    return write_index(
        out / f"{split}.json", split, [stats[i] for i in range(len(groups))], SAMPLE_RATE
    )


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shard-size-mb", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    index = make_shards(
        args.manifest, args.out, args.split, args.workers, args.shard_size_mb, args.seed
    )
    print(
        f"{args.split}: {index['num_samples']} samples, {index['hours']:.3f} h in {len(index['shards'])} shards"
        + (f"; skipped {index['skipped']}" if index["skipped"] else ""),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
