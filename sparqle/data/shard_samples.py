"""Shard samples on their way to a batch, for training and evaluation streams alike: tar members
-> candidates (metadata, task, duration; audio still encoded) -> decoded and collated batches.
What cannot be used is skipped and counted per reason (SkipCounter); the counts ride along in
each batch."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from sparqle.data.audio import AudioError, load_audio
from sparqle.data.batch import Batch
from sparqle.data.collate import collate
from sparqle.data.shards import FEATURES, decode_features, metadata_to_utterance
from sparqle.data.tasks import TaskSampler

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg")


class SkipCounter:
    """Counts what the pipeline drops, by reason; lives in one worker process."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        log.warning("skipping %s: %s", reason, detail)

    def shard_error(self, exc: Exception) -> bool:
        """webdataset handler: count an unreadable/truncated shard and go on."""
        self.add("unreadable shard", repr(exc))
        return True

    def pop(self) -> dict[str, int]:
        out, self.counts = dict(self.counts), Counter()
        return out


def parse_samples(
    raw: Iterable[dict[str, Any]],
    sample_rate: int,
    tasks: TaskSampler,
    counter: SkipCounter,
    rng: random.Random | None,
    min_seconds: float = 0.0,
    max_seconds: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Tar members -> candidates with metadata, task and duration; the audio stays encoded
    (decoded here only for the rare sample whose metadata has no duration). `rng` draws each
    training clip's task (None: evaluation, every clip its configured task)."""
    for s in raw:
        where = f"{s.get('__url__', '?')}:{s.get('__key__', '?')}"
        ext = next((e for e in (*AUDIO_EXTENSIONS, FEATURES) if e in s), None)
        try:
            meta = json.loads(s["json"])
        except (KeyError, ValueError, TypeError):
            counter.add("bad metadata", where)
            continue
        if ext is None:
            counter.add("no audio", where)
            continue
        utt = metadata_to_utterance(meta, s["__key__"])
        choice = tasks.choose(utt, rng)
        if choice is None or not choice.target.strip():
            counter.add("no text", where)
            continue
        cand = {"where": where, "utt": utt, "choice": choice, "target": choice.target}
        if ext == FEATURES:
            if not isinstance(meta.get("duration"), (int, float)):
                counter.add("bad metadata", f"{where} (no duration)")
                continue
            cand.update(features=s[ext], seconds=float(meta["duration"]))
        elif isinstance(meta.get("duration"), (int, float)):
            cand.update(encoded=s[ext], seconds=float(meta["duration"]))
        else:
            audio = _decode(s[ext], sample_rate, where, counter)
            if audio is None:
                continue
            cand.update(audio=audio, seconds=len(audio) / sample_rate)
        if cand["seconds"] < min_seconds or (
            max_seconds is not None and cand["seconds"] > max_seconds
        ):
            counter.add("duration out of range", f"{where} ({cand['seconds']:.2f} s)")
            continue
        yield cand


def _decode(encoded: bytes, sample_rate: int, where: str, counter: SkipCounter):
    try:
        return load_audio(encoded, sample_rate, name=where)
    except AudioError as exc:
        msg = str(exc)
        counter.add(
            "empty audio"
            if "empty" in msg
            else "NaN audio"
            if "NaN" in msg
            else "undecodable audio",
            where,
        )
        return None


def decode_batch(
    cands: list[dict[str, Any]],
    sample_rate: int,
    counter: SkipCounter,
    feature_dim: int | None = None,
) -> list[dict[str, Any]]:
    out = []
    for c in cands:
        if "features" in c:
            try:
                if feature_dim is None:
                    raise ValueError("features where the sources' indexes record none")
                feats = decode_features(c["features"], feature_dim)
            except ValueError as exc:
                counter.add(
                    "NaN features" if "NaN" in str(exc) else "bad features", f"{c['where']}: {exc}"
                )
                continue
            samples = round(c["seconds"] * sample_rate)
            out.append(c["choice"].feature_sample(c["utt"], feats, samples))
            continue
        audio = c.get("audio")
        if audio is None:
            audio = _decode(c["encoded"], sample_rate, c["where"], counter)
        if audio is not None:
            out.append(c["choice"].sample(c["utt"], audio))
    return out


def batches_with_counts(
    batches: Iterable[tuple[Any, list[dict]]], counter: SkipCounter
) -> Iterator[tuple[Any, Batch]]:
    """(tag, samples) -> (tag, collated batch), attaching the skips seen so far; one batch is
    held back so that skips counted after the last one still ride on it."""
    held = None
    for tag, b in batches:
        if held is not None:
            yield held[0], _finish(held[1], counter)
        held = (tag, b)
    if held is not None:
        yield held[0], _finish(held[1], counter)


def _finish(samples: list[dict], counter: SkipCounter) -> Batch:
    batch = collate(samples)
    batch.skipped = counter.pop()
    batch.num_skipped = sum(batch.skipped.values())
    return batch
