"""The shard format: webdataset tars of `KEY.flac` (16 kHz mono) + `KEY.json` metadata,
with an index `NAME.json` beside them. Written by data_prep.make_shards, read by the
shard DataModule; this module is the one place that knows the layout.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


def write_index(path: Path, split: str, shards: list[ShardStats], sample_rate: int) -> dict:
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
    }
    tmp = path.with_suffix(".json.tmp")
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


def stats_to_json(stats: ShardStats) -> str:
    return json.dumps(asdict(stats))


def stats_from_json(text: str) -> ShardStats:
    return ShardStats(**json.loads(text))
