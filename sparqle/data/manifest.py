"""The utterance record every corpus is turned into, and the JSONL manifest that holds it.

One line per utterance: {"id", "audio", "text", "translation": {lang: text}, "speaker",
"duration", "lang", "task"}; `audio` is a path, relative paths resolve against the manifest's folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparqle.prompts import TRANSLATE, parse_task


class ManifestError(ValueError):
    """A malformed manifest line; the message names the file, line and field."""


@dataclass
class Utterance:
    id: str
    audio: str
    text: str
    translation: dict[str, str] = field(default_factory=dict)
    speaker: str | None = None
    duration: float | None = None
    lang: str = "en"
    # the task this utterance trains on ("transcribe", "translate_de"), as the reference's
    # manifests name it; None: drawn by data.tasks' weights
    task: str | None = None

    def to_json(self) -> str:
        record = asdict(self)
        if record["task"] is None:
            del record["task"]
        return json.dumps(record, ensure_ascii=False)


def _check(where: str, record: dict, name: str, kind: type | tuple, required: bool) -> None:
    if name not in record or record[name] is None:
        if required:
            raise ManifestError(f"{where}: field '{name}' is missing")
        return
    if not isinstance(record[name], kind):
        raise ManifestError(f"{where}: field '{name}' must be {getattr(kind, '__name__', kind)}")


def parse_record(record: object, where: str, base_dir: Path | None = None) -> Utterance:
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    _check(where, record, "audio", str, True)
    _check(where, record, "text", str, True)
    _check(where, record, "id", (str, int), False)
    _check(where, record, "translation", dict, False)
    _check(where, record, "speaker", (str, int), False)
    _check(where, record, "duration", (int, float), False)
    _check(where, record, "lang", str, False)
    _check(where, record, "task", str, False)
    translation = record.get("translation") or {}
    for lang, text in translation.items():
        if not isinstance(text, str):
            raise ManifestError(f"{where}: field 'translation.{lang}' must be str")
    audio = record["audio"]
    if base_dir is not None and not Path(audio).is_absolute() and "://" not in audio:
        audio = str(base_dir / audio)
    speaker = record.get("speaker")
    return Utterance(
        id=str(record.get("id", Path(record["audio"]).stem)),
        audio=audio,
        text=record["text"],
        translation=dict(translation),
        speaker=None if speaker is None else str(speaker),
        duration=record.get("duration"),
        lang=record.get("lang", "en"),
        task=_task(record.get("task"), translation, where),
    )


def _task(task: str | None, translation: dict[str, str], where: str) -> str | None:
    if task is None:
        return None
    try:
        kind, lang = parse_task(task)
    except ValueError as exc:
        raise ManifestError(f"{where}: field 'task': {exc}") from None
    if kind == TRANSLATE and lang not in translation:
        raise ManifestError(
            f"{where}: field 'task' is {task!r} but 'translation.{lang}' is missing"
        )
    return task


def read_manifest(path: str | Path) -> list[Utterance]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{where}: not valid JSON ({exc.msg})") from None
            out.append(parse_record(record, where, path.parent))
    if not out:
        raise ManifestError(f"{path}: manifest holds no utterances")
    return out


def write_manifest(path: str | Path, utterances: list[Utterance]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for u in utterances:
            f.write(u.to_json() + "\n")
    tmp.replace(path)
