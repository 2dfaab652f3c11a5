"""CoVoST 2 (X -> Y speech translation over Common Voice clips) -> JSONL manifest.

    python -m data_prep.covost2 --cv-root cv-corpus/en --tsv covost_v2.en_de.tsv --split train --out train.jsonl

The CoVoST 2 TSV gives `path`, `translation` and `split` per clip (and `sentence` after the
official split script); where it lacks `sentence`, the transcript comes from Common Voice's
`validated.tsv`. Audio is CV_ROOT/clips/PATH (MP3, decoded later by soundfile).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

from sparqle.cli import reports_user_errors
from sparqle.data.manifest import Utterance, write_manifest

csv.field_size_limit(sys.maxsize)


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def build(cv_root: Path, tsv: Path, split: str) -> tuple[list[Utterance], dict[str, int]]:
    match = re.search(r"\.([a-z]{2,3}(?:-[A-Za-z]+)?)_([a-z]{2,3}(?:-[A-Za-z]+)?)\b", tsv.name)
    if match is None:
        raise ValueError(
            f"{tsv}: expected a name like covost_v2.en_de.tsv (source_target languages)"
        )
    src_lang, tgt_lang = match.groups()
    rows = _read_tsv(tsv)
    if rows and "translation" not in rows[0]:
        raise ValueError(f"{tsv}: no 'translation' column")
    sentences = {}
    if rows and "sentence" not in rows[0]:
        validated = cv_root / "validated.tsv"
        if not validated.is_file():
            raise FileNotFoundError(f"{tsv} has no 'sentence' column and {validated} is missing")
        sentences = {r["path"]: r["sentence"] for r in _read_tsv(validated)}
    utts, skipped = [], {"missing audio": 0, "no transcript": 0}
    for r in rows:
        if r.get("split", split) != split:
            continue
        audio = cv_root / "clips" / r["path"]
        text = r.get("sentence") or sentences.get(r["path"], "")
        if not audio.is_file():
            skipped["missing audio"] += 1
            continue
        if not text:
            skipped["no transcript"] += 1
            continue
        utts.append(
            Utterance(
                id=Path(r["path"]).stem,
                audio=str(audio),
                text=text,
                translation={tgt_lang: r["translation"]},
                speaker=r.get("client_id"),
                lang=src_lang,
            )
        )
    return utts, skipped


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cv-root",
        type=Path,
        required=True,
        help="Common Voice language folder (clips/, validated.tsv)",
    )
    p.add_argument("--tsv", type=Path, required=True, help="covost_v2.SRC_TGT.tsv")
    p.add_argument("--split", required=True, choices=["train", "dev", "test"])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    utts, skipped = build(args.cv_root, args.tsv, args.split)
    write_manifest(args.out, utts)
    print(f"{args.split}: {len(utts)} utterances -> {args.out}; skipped {skipped}", file=sys.stderr)


if __name__ == "__main__":
    main()
