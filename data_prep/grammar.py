"""A small sentence grammar whose every English sentence has exact German and French translations.

Sentences: "The [adj] noun verb [adverb]." or "The [adj] noun verb the [adj] noun [adverb]."
German case endings (nominative/accusative, weak adjective declension) and French adjective
agreement and position are handled by the tables below.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# english, german noun, german gender, french noun, french gender
SUBJECTS = [
    ("dog", "Hund", "m", "chien", "m"),
    ("cat", "Katze", "f", "chat", "m"),
    ("horse", "Pferd", "n", "cheval", "m"),
    ("woman", "Frau", "f", "femme", "f"),
    ("man", "Mann", "m", "monsieur", "m"),
    ("girl", "Mädchen", "n", "fille", "f"),
    ("boy", "Junge", "m", "garçon", "m"),
    ("teacher", "Lehrerin", "f", "maîtresse", "f"),
]
OBJECTS = [
    ("car", "Auto", "n", "voiture", "f"),
    ("house", "Haus", "n", "maison", "f"),
    ("book", "Buch", "n", "livre", "m"),
    ("table", "Tisch", "m", "table", "f"),
    ("flower", "Blume", "f", "fleur", "f"),
    ("ball", "Ball", "m", "ballon", "m"),
    ("door", "Tür", "f", "porte", "f"),
    ("chair", "Stuhl", "m", "chaise", "f"),
]
# english, german stem, french masculine, french feminine, french goes before the noun
ADJECTIVES = [
    ("big", "groß", "grand", "grande", True),
    ("small", "klein", "petit", "petite", True),
    ("old", "alt", "vieux", "vieille", True),
    ("young", "jung", "jeune", "jeune", True),
    ("red", "rot", "rouge", "rouge", False),
    ("black", "schwarz", "noir", "noire", False),
    ("green", "grün", "vert", "verte", False),
    ("white", "weiß", "blanc", "blanche", False),
]
INTRANSITIVE = [
    ("sleeps", "schläft", "dort"),
    ("runs", "läuft", "court"),
    ("sings", "singt", "chante"),
    ("waits", "wartet", "attend"),
    ("laughs", "lacht", "rit"),
]
TRANSITIVE = [
    ("sees", "sieht", "voit"),
    ("likes", "mag", "aime"),
    ("finds", "findet", "trouve"),
    ("buys", "kauft", "achète"),
    ("paints", "malt", "peint"),
]
ADVERBS = [
    ("today", "heute", "aujourd'hui"),
    ("now", "jetzt", "maintenant"),
    ("again", "wieder", "encore"),
]

DE_ARTICLE = {
    ("nom", "m"): "der",
    ("nom", "f"): "die",
    ("nom", "n"): "das",
    ("acc", "m"): "den",
    ("acc", "f"): "die",
    ("acc", "n"): "das",
}


@dataclass(frozen=True)
class Sentence:
    en: str
    de: str
    fr: str


def noun_phrase(noun: tuple, adj: tuple | None, case: str) -> tuple[str, str, str]:
    en_n, de_n, de_g, fr_n, fr_g = noun
    article = DE_ARTICLE[(case, de_g)]
    fr_article = "le" if fr_g == "m" else "la"
    if adj is None:
        return f"the {en_n}", f"{article} {de_n}", f"{fr_article} {fr_n}"
    en_a, de_a, fr_m, fr_f, before = adj
    de_ending = "en" if (case == "acc" and de_g == "m") else "e"
    de_adj = de_a + de_ending
    fr_adj = fr_m if fr_g == "m" else fr_f
    fr = f"{fr_article} {fr_adj} {fr_n}" if before else f"{fr_article} {fr_n} {fr_adj}"
    return f"the {en_a} {en_n}", f"{article} {de_adj} {de_n}", fr


def _finish(en: str, de: str, fr: str) -> Sentence:
    cap = lambda s: s[0].upper() + s[1:]  # noqa: E731
    return Sentence(cap(en) + ".", cap(de) + ".", cap(fr) + ".")


def sample_sentence(rng: random.Random) -> Sentence:
    subj = noun_phrase(rng.choice(SUBJECTS), rng.choice([None, *ADJECTIVES]), "nom")
    adverb = rng.choice([None, *ADVERBS])
    if rng.random() < 0.4:
        verb = rng.choice(INTRANSITIVE)
        en, de, fr = f"{subj[0]} {verb[0]}", f"{subj[1]} {verb[1]}", f"{subj[2]} {verb[2]}"
    else:
        verb = rng.choice(TRANSITIVE)
        obj = noun_phrase(rng.choice(OBJECTS), rng.choice([None, *ADJECTIVES]), "acc")
        en = f"{subj[0]} {verb[0]} {obj[0]}"
        de = f"{subj[1]} {verb[1]} {obj[1]}"
        fr = f"{subj[2]} {verb[2]} {obj[2]}"
    if adverb is not None:
        en, de, fr = f"{en} {adverb[0]}", f"{de} {adverb[1]}", f"{fr} {adverb[2]}"
    return _finish(en, de, fr)


def unique_sentences(n: int, seed: int) -> list[Sentence]:
    """n distinct sentences, deterministic for a seed."""
    rng = random.Random(seed)
    seen: dict[str, Sentence] = {}
    while len(seen) < n:
        s = sample_sentence(rng)
        seen.setdefault(s.en, s)
    return list(seen.values())
