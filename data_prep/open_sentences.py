"""Open-vocabulary English sentences, offline: WordNet's example sentences (`wordnet-base`) and
fortune cookies (`fortunes`), normalised to what the TTS voices say and a transcript holds
(lowercase words, numbers spelled out, no punctuation), deduplicated, and split so that the
held-out sentences hold words no training sentence has.

    python -m data_prep.open_sentences --out DIR [--heldout 200] [--novel-fraction 0.3] [--seed 0]

Writes DIR/train.txt and DIR/heldout.txt (a sentence a line), DIR/never_heard.txt (the words of
the held-out sentences that occur in no training sentence) and DIR/summary.json. The split: the
held-out sentences are drawn at random; a share (`--novel-fraction`) of their rarer content words
is chosen to be never heard, and every other sentence holding one of them is dropped from
training. The rest is the training set, so a held-out sentence is never trained on and the
never-heard words are, by construction, in no training sentence.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from sparqle.cli import reports_user_errors

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
# the packages' gentler collections (the `fortunes` package also ships politics, drugs, ...)
FORTUNE_FILES = (
    "fortunes",
    "wisdom",
    "platitudes",
    "people",
    "work",
    "science",
    "literature",
    "food",
    "pets",
    "education",
    "kids",
    "cookie",
    "miscellaneous",
    "humorists",
)
MIN_WORDS, MAX_WORDS = 5, 14
# function words: never chosen as never-heard words (they are in every sentence anyway)
FUNCTION_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers herself him himself his how i if in into is it its itself
    just me more most my myself no nor not now of off on once only or other our ours out over own
    same she should so some such than that the their theirs them then there these they this those
    through to too under until up very was we were what when where which while who whom why will
    with would you your yours one two three four five six seven eight nine ten hundred thousand""".split()
)
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen \
fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def spell_number(n: int) -> str:
    """0..9999 in words, as a voice reads it (1984 -> one thousand nine hundred eighty four)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + spell_number(rest))
    rest = n % 1000
    return spell_number(n // 1000) + " thousand" + ("" if rest == 0 else " " + spell_number(rest))


def normalise(raw: str) -> str | None:
    """A transcript as the voices say it: lowercase words (apostrophes kept inside them), numbers
    below 10,000 spelled out, no punctuation; None for what the voices would not say well (other
    symbols, all-capital words, too short or too long)."""
    text = " ".join(raw.replace("--", " ").split())
    if not text or re.search(r"[^A-Za-z0-9 ,.;:!?'\-]", text) or re.search(r"\b[A-Z]{2,}\b", text):
        return None
    if re.search(r"\d[.,]\d|\d{5,}|\d[A-Za-z]|[A-Za-z]\d", text):  # 2.5, 20th, B12
        return None
    text = re.sub(r"\d+", lambda m: f" {spell_number(int(m.group()))} ", text)
    text = re.sub(r"[,.;:!?\-]", " ", text).lower()
    words = [w.strip("'") for w in text.split()]
    words = [w for w in words if w]
    if not MIN_WORDS <= len(words) <= MAX_WORDS or any(len(w) > 16 for w in words):
        return None
    return " ".join(words)


def wordnet_examples(root: Path = WORDNET) -> Iterator[str]:
    """WordNet's example sentences: the quoted parts of every synset's gloss."""
    for part in ("noun", "verb", "adj", "adv"):
        path = root / f"data.{part}"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: WordNet is not installed (apt-get install wordnet-base)"
            )
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):  # the licence at the top
                continue
            _, _, gloss = line.partition(" | ")
            yield from re.findall(r'"([^"]+)"', gloss)


def fortune_sentences(root: Path = FORTUNES, files: Iterable[str] = FORTUNE_FILES) -> Iterator[str]:
    """The sentences of fortune cookies (attributions dropped), one at a time."""
    for name in files:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: fortunes are not installed (apt-get install fortunes)"
            )
        for cookie in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            body = " ".join(
                line for line in cookie.splitlines() if not line.strip().startswith("--")
            )
            yield from re.split(r"(?<=[.!?])\s+", " ".join(body.split()))


def collect(sources: Iterable[str]) -> list[str]:
    """Normalised, deduplicated sentences in their first-seen order."""
    seen: dict[str, None] = {}
    for raw in sources:
        text = normalise(raw)
        if text is not None:
            seen.setdefault(text)
    return list(seen)


def split(
    sentences: list[str], heldout: int, novel_fraction: float, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """(training sentences, held-out sentences, never-heard words): see the module doc. The
    never-heard words are picked among the held-out sentences' content words that are rare in the
    whole set (at most 3 sentences hold each), so dropping their sentences costs little."""
    if heldout >= len(sentences):
        raise ValueError(f"--heldout {heldout}: only {len(sentences)} sentences")
    rng = random.Random(seed)
    order = list(sentences)
    rng.shuffle(order)
    held, rest = order[:heldout], order[heldout:]
    counts = Counter(w for s in order for w in set(s.split()))
    content = sorted({w for s in held for w in s.split() if w not in FUNCTION_WORDS and len(w) > 3})
    rare = [w for w in content if counts[w] <= 3]
    novel = set(rng.sample(rare, min(len(rare), round(novel_fraction * len(content)))))
    train = [s for s in rest if novel.isdisjoint(s.split())]
    heard = {w for s in train for w in s.split()}
    never = sorted({w for s in held for w in s.split()} - heard)
    return train, held, never


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--heldout", type=int, default=200, help="held-out sentences")
    p.add_argument("--novel-fraction", type=float, default=0.3, help="of their content words")
    p.add_argument("--max-train", type=int, default=0, help="keep at most this many (0: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 <= args.novel_fraction <= 1:
        raise ValueError(f"--novel-fraction {args.novel_fraction}: expected a share, 0 to 1")
    wordnet = collect(wordnet_examples())
    fortunes = collect(fortune_sentences())
    sentences = collect([*wordnet, *fortunes])
    train, held, never = split(sentences, args.heldout, args.novel_fraction, args.seed)
    if args.max_train:
        train = train[: args.max_train]
        heard = {w for s in train for w in s.split()}
        never = sorted({w for s in held for w in s.split()} - heard)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, lines in (("train", train), ("heldout", held), ("never_heard", never)):
        (args.out / f"{name}.txt").write_text("".join(f"{x}\n" for x in lines))
    summary = {
        "sentences": {"wordnet": len(wordnet), "fortunes": len(fortunes), "all": len(sentences)},
        "train": len(train),
        "heldout": len(held),
        "train_vocabulary": len({w for s in train for w in s.split()}),
        "heldout_words": sum(len(s.split()) for s in held),
        "never_heard_words": len(never),
        "never_heard_tokens": sum(w in set(never) for s in held for w in s.split()),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"{len(sentences)} sentences ({len(wordnet)} WordNet, {len(fortunes)} fortunes): "
        f"{len(train)} training, {len(held)} held out, {len(never)} never-heard words -> {args.out}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
