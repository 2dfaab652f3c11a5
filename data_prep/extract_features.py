"""Audio shards -> feature shards: a frozen encoder's output for every clip, computed once.

    python -m data_prep.extract_features --shards DIR/train.json --out FEATS [--split train] \
        [--batch-seconds 300] encoder=hubert_large [encoder.layer=18 encoder.dtype=bfloat16 ...]
    torchrun --nproc-per-node 8 -m data_prep.extract_features ...   # one GPU a rank

The trailing arguments are Hydra overrides of the `encoder` group, as train.py takes them.
Output shard i holds input shard i's clips in the same order (`KEY.pth` + `KEY.json`), written
under a temporary name and renamed when complete with its statistics beside it, so a killed run
resumes where it stopped; ranks take every world-th shard, and whichever finds all shards done
writes the index (FEATS/SPLIT.json) with the encoder's name, layer, dtype and frame rate.
Undecodable clips and unreadable shards are skipped and counted. Training reads the result with
`data=feature_shards`, without loading the encoder. This is the one data-prep step that runs a
model: the frozen encoder is the transformation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from sparqle.cli import reports_user_errors, say_progress
from sparqle.data.audio import AudioError, load_audio
from sparqle.data.shards import (
    FEATURES,
    ShardStats,
    encode_features,
    finish_shard,
    index_urls,
    read_index,
    stats_from_json,
    stats_path,
    write_index,
)
from sparqle.models.encoder import SpeechEncoder

AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg")


def build_encoder(overrides: list[str]) -> tuple[SpeechEncoder, dict[str, Any]]:
    """The frozen encoder a train.py run with these overrides would build (no feature cache)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sparqle.config import register_resolvers
    from sparqle.config_check import validate_group
    from sparqle.models.loading import describe, quiet_loading

    register_resolvers()

    root = Path(__file__).resolve().parents[1]
    os.environ.setdefault("SPARQLE_ROOT", str(root))
    bad = [o for o in overrides if not o.lstrip("+~").startswith(("encoder", "paths."))]
    if bad:
        raise ValueError(
            f"{bad[0]}: only encoder (and paths.) overrides are taken here "
            "(encoder=NAME, encoder.KEY=VALUE)"
        )
    with initialize_config_dir(str(root / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    validate_group(cfg, "encoder")
    enc_cfg = OmegaConf.to_container(cfg.encoder, resolve=True)
    if not enc_cfg.get("frozen", True) or enc_cfg.get("layer") == "weighted":
        raise ValueError(
            "feature shards hold a frozen encoder's fixed layer: encoder.frozen=false and "
            "encoder.layer=weighted train the encoder, so its features cannot be stored"
        )
    enc_cfg.update(cache_features=False, cache_dir=None)
    with quiet_loading():
        encoder = instantiate(enc_cfg)
    logging.getLogger("sparqle.extract_features").info(
        describe("encoder", enc_cfg["name_or_path"], encoder)
    )
    return encoder, enc_cfg


def encoder_record(encoder: SpeechEncoder, enc_cfg: dict[str, Any]) -> dict[str, Any]:
    """What the index says of the features (training checks it against its encoder config)."""
    return {
        "encoder": str(enc_cfg["name_or_path"]),
        "layer": enc_cfg.get("layer", "last"),
        "whisper_window_seconds": enc_cfg.get("whisper_window_seconds"),
        "dtype": str(next(encoder.parameters()).dtype).removeprefix("torch."),
        "hidden_size": encoder.hidden_size,
        "frame_rate": encoder.frame_rate,
        "sample_rate": encoder.sample_rate,
    }


def _read_shard(url: str, stats: ShardStats) -> list[dict[str, Any]]:
    """Every readable sample of one audio shard; a truncated shard yields what precedes the cut."""

    def broken(exc: Exception) -> bool:
        stats.skipped["unreadable shard"] = stats.skipped.get("unreadable shard", 0) + 1
        print(f"skipping the rest of {url}: {exc!r}", file=sys.stderr)
        return False  # stop reading this shard

    return list(
        wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=broken))
    )


def extract_shard(
    url: str,
    path: Path,
    encoder: SpeechEncoder,
    device: torch.device,
    batch_seconds: float = 300.0,
) -> ShardStats:
    """Encode one audio shard into one feature shard at `path` (atomically)."""
    stats = ShardStats(url=path.name)
    sr = encoder.sample_rate
    clips: list[tuple[dict[str, Any], dict[str, Any], Any]] = []
    for s in _read_shard(url, stats):
        where = f"{url}:{s.get('__key__')}"
        ext = next((e for e in AUDIO_EXTENSIONS if e in s), None)
        try:
            meta = json.loads(s["json"])
            audio = load_audio(s[ext], sr, name=where) if ext else None
        except (KeyError, ValueError, TypeError, AudioError) as exc:
            reason = "bad metadata" if not isinstance(exc, AudioError) else "undecodable audio"
            stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
            print(f"skipping {where}: {exc}", file=sys.stderr)
            continue
        if audio is None:
            stats.skipped["no audio"] = stats.skipped.get("no audio", 0) + 1
            continue
        clips.append((s, meta, audio))
    feats: list[torch.Tensor | None] = [None] * len(clips)
    order = sorted(range(len(clips)), key=lambda i: len(clips[i][2]))  # like lengths together
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and len(clips[order[end]][2]) * (end - start + 1) <= (
            batch_seconds * sr
        ):
            end += 1
        idx = order[start:end]
        lens = torch.tensor([len(clips[i][2]) for i in idx])
        audio = torch.zeros(len(idx), int(lens.max()))
        for j, i in enumerate(idx):
            audio[j, : lens[j]] = torch.from_numpy(clips[i][2])
        with torch.inference_mode():
            out = encoder(audio.to(device), lens.to(device))
        frames = out.mask.sum(1).tolist()
        for j, i in enumerate(idx):
            feats[i] = out.features[j, : frames[j]].cpu()
        start = end
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with wds.TarWriter(str(tmp), mtime=0.0) as sink:
        for (s, meta, audio), f in zip(clips, feats, strict=True):
            duration = len(audio) / sr
            sink.write(
                {
                    "__key__": s["__key__"],
                    FEATURES: encode_features(f),
                    "json": json.dumps(
                        {**meta, "duration": round(duration, 4), "frames": f.shape[0]},
                        ensure_ascii=False,
                    ),
                }
            )
            stats.samples += 1
            stats.seconds += duration
            stats.durations.append(round(duration, 3))
    return finish_shard(tmp, path, stats)


def _rank_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; one process otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def extract_features(
    shards: Path,
    out: Path,
    overrides: list[str],
    split: str | None = None,
    batch_seconds: float = 300.0,
    device: str = "auto",
) -> dict | None:
    """This rank's share of the shards; the index once every shard is there (else None)."""
    index = read_index(shards)
    split = split or index.get("split") or shards.stem
    urls = index_urls(shards)
    rank, world, local = _rank_world()
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    encoder, enc_cfg = build_encoder(overrides)
    encoder.to(torch.device(device))
    record = encoder_record(encoder, enc_cfg)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{split}-{i:06d}.tar" for i in range(len(urls))]

    def done(i: int) -> bool:
        return paths[i].is_file() and stats_path(paths[i]).is_file()

    mine = [i for i in range(rank, len(urls), world) if not done(i)]
    for n, i in enumerate(mine):
        st = extract_shard(urls[i], paths[i], encoder, torch.device(device), batch_seconds)
        print(
            f"rank {rank}: {paths[i].name} ({st.samples} clips) [{n + 1}/{len(mine)}]",
            file=sys.stderr,
        )
    if not all(done(i) for i in range(len(urls))):
        return None
    stats = [stats_from_json(stats_path(p).read_text()) for p in paths]
    return write_index(out / f"{split}.json", split, stats, encoder.sample_rate, record)


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, required=True, help="the audio shards' index .json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", default=None, help="default: the input index's split")
    p.add_argument(
        "--batch-seconds", type=float, default=300.0, help="padded audio per encoder batch"
    )
    p.add_argument("--device", default="auto", help="auto: this rank's GPU, else the CPU")
    p.add_argument("overrides", nargs="*", help="encoder=NAME encoder.KEY=VALUE ...")
    args = p.parse_args(argv)
    say_progress()  # the one line that describes the loaded encoder
    index = extract_features(
        args.shards, args.out, args.overrides, args.split, args.batch_seconds, args.device
    )
    if index is None:
        print("this rank's shards are done; another rank writes the index", file=sys.stderr)
        return
    f = index["features"]
    print(
        f"{index['split']}: {index['num_samples']} clips, {index['hours']:.3f} h of "
        f"{f['encoder']} layer {f['layer']} features ({f['dtype']}, {f['hidden_size']}-d, "
        f"{f['frame_rate']:g} frames/s) in {len(index['shards'])} shards"
        + (f"; skipped {index['skipped']}" if index["skipped"] else ""),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
