"""The shard format: webdataset tars of `KEY.flac` (16 kHz mono) + `KEY.json` metadata,
with an index `NAME.json` beside them. Written by data_prep.make_shards, read by the
shard DataModule; this module is the one place that knows the layout.

Feature shards (data_prep.extract_features) hold `KEY.pth`, a frozen encoder's (frames, dim)
output as torch saved it, instead of the audio, the same `KEY.json` plus `frames`, and an index
whose `features` record names the encoder, layer, dtype and frame rate that made them.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from sparqle.data.manifest import Utterance

SHARD_PATTERN = "{split}-{index:06d}.tar"
DURATION_EDGES = (0, 1, 2, 4, 6, 8, 10, 12, 15, 20, 25, 30, 45, 60, float("inf"))


def sample_metadata(utt: Utterance, duration: float) -> dict:
    """The JSON stored beside each clip; everything but the audio path."""
    return {
        "id": utt.id,
        "text": utt.text,
        "translation": utt.translation,
        "lang": utt.lang,
        "speaker": utt.speaker,
        "duration": round(duration, 4),
        **({"task": utt.task} if utt.task else {}),
    }


def metadata_to_utterance(meta: dict, key: str) -> Utterance:
    return Utterance(
        id=str(meta.get("id", key)),
        audio=key,
        text=meta.get("text") or "",
        translation=dict(meta.get("translation") or {}),
        speaker=meta.get("speaker"),
        duration=meta.get("duration"),
        lang=meta.get("lang", "en"),
        task=meta.get("task"),
    )


@dataclass
class ShardStats:
    url: str
    samples: int = 0
    seconds: float = 0.0
    durations: list[float] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


def histogram(durations: list[float]) -> dict[str, list]:
    counts = [0] * (len(DURATION_EDGES) - 1)
    for d in durations:
        for i in range(len(counts)):
            if DURATION_EDGES[i] <= d < DURATION_EDGES[i + 1]:
                counts[i] += 1
                break
    return {
        "edges_seconds": [e if e != float("inf") else "inf" for e in DURATION_EDGES],
        "counts": counts,
    }


FEATURES = "pth"  # the member that holds a clip's features
# what must match between feature shards and the encoder config a run names
FEATURE_IDENTITY = ("encoder", "layer", "whisper_window_seconds")


def encode_features(features: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(features.contiguous().clone(), buf)
    return buf.getvalue()


def decode_features(data: bytes, dim: int) -> torch.Tensor:
    """A clip's (frames, dim) features; ValueError says what is wrong with a bad one."""
    try:
        features = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # truncated or not a tensor file
        raise ValueError(f"unreadable features ({type(exc).__name__})") from None
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] != dim:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
        raise ValueError(f"features of shape {shape}, expected (frames, {dim})")
    if features.shape[0] == 0:
        raise ValueError("empty features")
    if not torch.isfinite(features).all():
        raise ValueError("NaN features")
    return features


def write_index(
    path: Path,
    split: str,
    shards: list[ShardStats],
    sample_rate: int,
    features: dict | None = None,
) -> dict:
    skipped: dict[str, int] = {}
    for s in shards:
        for reason, n in s.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    durations = [d for s in shards for d in s.durations]
    index = {
        "split": split,
        "sample_rate": sample_rate,
        "num_samples": sum(s.samples for s in shards),
        "hours": round(sum(s.seconds for s in shards) / 3600, 4),
        "shards": [
            {"url": s.url, "samples": s.samples, "seconds": round(s.seconds, 3)} for s in shards
        ],
        "duration_histogram": histogram(durations),
        "skipped": skipped,
        **({"features": features} if features is not None else {}),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index, indent=1, ensure_ascii=False))
    tmp.replace(path)
    return index


def read_index(path: str | Path) -> dict:
    path = Path(path)
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"shard index not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a shard index ({exc.msg})") from None
    if "shards" not in index:
        raise ValueError(f"{path}: not a shard index (no 'shards' field)")
    return index


def index_urls(path: str | Path) -> list[str]:
    """Shard URLs of an index, resolved against the index's folder."""
    path = Path(path)
    return [
        u["url"]
        if "://" in u["url"] or u["url"].startswith("pipe:")
        else str(path.parent / u["url"])
        for u in read_index(path)["shards"]
    ]


def remote_index(index_path: str | Path, url_template: str, out: str | Path) -> dict:
    """The index of shards uploaded elsewhere: each shard's URL from `url_template` with
    `{name}` replaced by the shard's file name (`pipe:aws s3 cp s3://bucket/train/{name} -`),
    its sample count and seconds kept, so a stream over the remote copies knows its epoch length
    on any number of ranks."""
    if "{name}" not in url_template:
        raise ValueError(
            f"--remote-url {url_template!r}: put {{name}} where the shard's file name goes"
        )
    index = read_index(index_path)
    index["shards"] = [
        {**s, "url": url_template.format(name=Path(s["url"]).name)} for s in index["shards"]
    ]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index, indent=1, ensure_ascii=False))
    tmp.replace(out)
    return index


def stats_path(shard: Path) -> Path:
    """Where a finished shard's statistics sit: beside it, written last."""
    return shard.with_name(shard.name + ".stats.json")


def finish_shard(tmp: Path, shard: Path, stats: ShardStats) -> ShardStats:
    """Rename a fully written shard into place, then its statistics: a shard whose statistics
    exist is complete, so a rerun keeps it."""
    tmp_stats = stats_path(shard).with_name(f".{stats_path(shard).name}.{os.getpid()}.tmp")
    tmp_stats.write_text(stats_to_json(stats))
    tmp.replace(shard)
    tmp_stats.replace(stats_path(shard))
    return stats


def stats_to_json(stats: ShardStats) -> str:
    return json.dumps(asdict(stats))


def stats_from_json(text: str) -> ShardStats:
    return ShardStats(**json.loads(text))


def expand_urls(urls: str | list[str]) -> list[str]:
    """An index .json, a brace pattern, a pipe: URL, or a list of those -> shard URLs."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for u in items:
        out += index_urls(u) if u.endswith(".json") else list(wds.shardlists.expand_urls(u))
    if not out:
        raise ValueError(f"no shards in {urls!r}")
    return out


def total_seconds(urls: str | list[str]) -> float | None:
    items = [urls] if isinstance(urls, str) else list(urls)
    if not all(u.endswith(".json") for u in items):
        return None
    return sum(s["seconds"] for u in items for s in read_index(u)["shards"])


def feature_record(sources: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The `features` record of feature shards' indexes (None for audio shards), from
    {config key: source}; every source must be of one kind and, for features, from one
    encoder and layer."""
    found: dict[str, dict[str, Any] | None] = {}
    for name, src in sources.items():
        urls = src["urls"] if isinstance(src["urls"], list | tuple) else [src["urls"]]
        for u in urls:
            if str(u).endswith(".json"):
                found[f"{name}.urls={u}"] = read_index(u).get("features")
    kinds = {k: v for k, v in found.items() if v is not None}
    if not kinds:
        return None
    if len(kinds) < len(found):
        audio = next(k for k, v in found.items() if v is None)
        raise ValueError(f"{audio}: audio shards, while {next(iter(kinds))} holds features")
    (first, ref), *rest = kinds.items()
    for name, rec in rest:
        if any(rec.get(k) != ref.get(k) for k in (*FEATURE_IDENTITY, "hidden_size")):
            raise ValueError(
                f"{name}: features of {describe_features(rec)}, but {first} holds "
                f"{describe_features(ref)}"
            )
    return ref


def data_features(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """feature_record of a `data=` config (None for data modules other than shards)."""
    if not str(data.get("_target_", "")).endswith("ShardDataModule"):
        return None
    named = {f"data.train.{k}": v for k, v in (data.get("train") or {}).items() if v}
    named |= {f"data.{k}": data[k] for k in ("val", "test") if data.get(k)}
    return feature_record(named)


def describe_features(record: dict[str, Any]) -> str:
    window = record.get("whisper_window_seconds")
    return f"encoder {record.get('encoder')} layer {record.get('layer')}" + (
        f" (window {window} s)" if window else ""
    )
