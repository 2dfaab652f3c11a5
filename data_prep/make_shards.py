"""Manifest -> webdataset tar shards + index.

    python -m data_prep.make_shards --manifest M.jsonl --out DIR --split NAME \
        [--workers N] [--shard-size-mb S] [--seed S] \
        [--jobs J --cluster slurm|local [--partition P --timeout-min T]] \
        [--remote-url 'pipe:aws s3 cp s3://bucket/shards/{name} -']

Writes DIR/NAME-000000.tar ... and DIR/NAME.json. Each shard is written under a temporary
name and renamed when complete, with its statistics beside it (NAME-000000.tar.stats.json), so
a killed run leaves no half shard and a rerun skips the finished ones. Clips that already are
16 kHz mono 16-bit FLAC go in byte for byte; anything else is decoded, mixed and resampled. The sample order is a
seeded shuffle of the manifest, so the output is the same for the same inputs and seed.

With --jobs J the shards still to write are dealt to J jobs of a submitit job array (a SLURM
array, or local processes with --cluster local), each running --workers processes; this command
waits for them and merges every shard's statistics into the one index. The shard plan and each
shard's bytes do not depend on who writes it, so the output is byte-identical to one machine's,
and a rerun after a lost job submits only the shards that are missing.

With --remote-url the index of the same shards where they will be uploaded is written too,
DIR/NAME.remote.json (each shard's URL from the template, its samples and seconds kept): upload
DIR, then train with data.train.main.urls=DIR/NAME.remote.json on any number of ranks.
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

from data_prep.clips import SAMPLE_RATE, flac16k
from sparqle.cli import reports_user_errors
from sparqle.data.audio import AudioError
from sparqle.data.manifest import Utterance, read_manifest
from sparqle.data.shards import (
    SHARD_PATTERN,
    ShardStats,
    finish_shard,
    remote_index,
    sample_metadata,
    stats_from_json,
    stats_path,
    write_index,
)

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
                flac, duration = flac16k(utt.audio, name=utt.id)
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
            sink.write(
                {
                    "__key__": _key(utt),
                    "flac": flac,
                    "json": sample_metadata(utt, duration),
                }
            )
            stats.samples += 1
            stats.seconds += duration
            stats.durations.append(round(duration, 3))
    return finish_shard(tmp, path, stats)


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


def write_shards(
    jobs: list[tuple[Path, list[Utterance]]], workers: int = 1, progress: Progress | None = None
) -> list[ShardStats]:
    """Write (path, utterances) shards with `workers` processes; the stats in the same order."""
    task = progress.add_task("shards", total=len(jobs)) if progress is not None else None
    if workers <= 1:
        stats = []
        for path, utts in jobs:
            stats.append(write_shard(path, utts))
            if progress is not None:
                progress.advance(task)
        return stats
    out: dict[int, ShardStats] = {}
    with ProcessPoolExecutor(workers) as pool:
        futures = {pool.submit(write_shard, p, u): i for i, (p, u) in enumerate(jobs)}
        for fut in as_completed(futures):
            out[futures[fut]] = fut.result()
            if progress is not None:
                progress.advance(task)
    return [out[i] for i in range(len(jobs))]


def cluster_executor(
    kind: str, folder: Path, workers: int, partition: str | None, timeout_min: int
):
    """A submitit executor: a SLURM job array (`slurm`) or local processes (`local`)."""
    import submitit

    if kind == "local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=timeout_min)
    elif kind == "slurm":
        try:
            ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        except RuntimeError as exc:  # no srun/sbatch here
            raise ValueError(f"--cluster slurm: {exc}") from None
        ex.update_parameters(
            timeout_min=timeout_min,
            cpus_per_task=workers,
            tasks_per_node=1,
            nodes=1,
            **({"slurm_partition": partition} if partition else {}),
        )
    else:
        raise ValueError(f"--cluster {kind}: expected slurm or local")
    return ex


def make_shards(
    manifest: Path,
    out: Path,
    split: str,
    workers: int = 1,
    shard_size_mb: float = 200.0,
    seed: int = 0,
    jobs: int = 1,
    cluster: str | None = None,
    partition: str | None = None,
    timeout_min: int = 240,
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
        if path.is_file() and stats_path(path).is_file():
            stats[i] = stats_from_json(stats_path(path).read_text())
        else:
            todo.append(i)
    if cluster and jobs > 1 and todo:
        # one slice per job, dealt round robin so each gets a like mix of the seeded order
        slices = [todo[j::jobs] for j in range(min(jobs, len(todo)))]
        ex = cluster_executor(cluster, out / ".submitit", workers, partition, timeout_min)
        submitted = ex.map_array(
            write_shards,
            [[(paths[i], groups[i]) for i in sl] for sl in slices],
            [workers] * len(slices),
        )
        print(
            f"{split}: {len(todo)} shards in {len(slices)} {cluster} jobs "
            f"({submitted[0].job_id.split('_')[0]}), logs in {out / '.submitit'}",
            file=sys.stderr,
        )
        for sl, job in zip(slices, submitted, strict=True):
            for i, st in zip(sl, job.result(), strict=True):
                stats[i] = st
    elif todo:
        with Progress(transient=not sys.stderr.isatty()) as progress:
            for i, st in zip(
                todo,
                write_shards([(paths[i], groups[i]) for i in todo], workers, progress),
                strict=True,
            ):
                stats[i] = st
    return write_index(
        out / f"{split}.json", split, [stats[i] for i in range(len(groups))], SAMPLE_RATE
    )


def add_shard_flags(p: argparse.ArgumentParser) -> None:
    """The corpus readers' `--shards DIR`: their split straight on into shards (--workers)."""
    p.add_argument("--shards", type=Path, help="also write the split as shards + index here")
    p.add_argument("--shard-size-mb", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=0, help="the shards' sample order")


def shards_from_flags(args: argparse.Namespace, manifest: Path) -> dict | None:
    """A corpus reader's manifest into `--shards` (None without the flag)."""
    if args.shards is None:
        return None
    index = make_shards(
        manifest, args.shards, args.split, args.workers, args.shard_size_mb, args.seed
    )
    say_index(args.split, index)
    return index


def say_index(split: str, index: dict) -> None:
    print(
        f"{split}: {index['num_samples']} samples, {index['hours']:.3f} h in "
        f"{len(index['shards'])} shards"
        + (f"; skipped {index['skipped']}" if index["skipped"] else ""),
        file=sys.stderr,
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
    p.add_argument("--jobs", type=int, default=1, help="split the work over this many jobs")
    p.add_argument(
        "--cluster",
        choices=["slurm", "local"],
        default=None,
        help="run the jobs as a submitit job array: SLURM, or local processes",
    )
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--timeout-min", type=int, default=240, help="per job")
    p.add_argument(
        "--remote-url",
        default=None,
        help="also write NAME.remote.json, each shard at this URL ({name}: its file name)",
    )
    args = p.parse_args(argv)
    if args.jobs > 1 and not args.cluster:
        raise ValueError(f"--jobs {args.jobs}: also give --cluster slurm or --cluster local")
    index = make_shards(
        args.manifest,
        args.out,
        args.split,
        args.workers,
        args.shard_size_mb,
        args.seed,
        args.jobs,
        args.cluster,
        args.partition,
        args.timeout_min,
    )
    say_index(args.split, index)
    if args.remote_url:
        remote = args.out / f"{args.split}.remote.json"
        remote_index(args.out / f"{args.split}.json", args.remote_url, remote)
        print(f"{args.split}: the uploaded shards' index: {remote}", file=sys.stderr)


if __name__ == "__main__":
    main()
