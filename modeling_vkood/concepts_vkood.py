"""Concept extraction for VK-OOD knowledge retrieval: normalise, tokenise, lemmatise, match n-grams.

Hub remote code (standard library only), a flat sibling of `knowledge_vkood.py`, which retrieves with it; the index
builder (`modeling_vkood.knowledge`) normalises concept names with the same functions, so that a question word and a
ConceptNet URI meet in one form ("T-shirt" and /c/en/t-shirt both become "t shirt").

Matching is greedy, left to right, longest n-gram (up to 3 words) first, so "hot dog" wins over "dog". Only the last
word of an n-gram is lemmatised ("wine glasses" -> "wine glass"): in English noun phrases the head noun carries the
plural. Lemmatisation is deliberately light and rule based; each rule proposes candidates and the index vocabulary
decides, so a wrong rule output ("cookies" -> "cooky") costs nothing when the right one ("cookie") is in the graph.

Question scaffolding (`SCAFFOLDING`: "what color is the car", "is the man holding a bat") is matched like any
concept, so it still ends the n-gram it covers, but it is not kept: with a vocabulary as large as ConceptNet's these
words would otherwise take knowledge slots from the objects the question names.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Container
from functools import lru_cache

MAX_NGRAM = 3

# Contractions are expanded or dropped before splitting so "isn't" gives the stop word "not", not a token "isn".
_CONTRACTIONS = re.compile(r"\b(?:ca|wo)n['’]t\b|n['’]t\b|['’](?:s|re|ll|ve|d|m)\b")
_EXPANSIONS = {"c": "can not", "w": "will not", "n": " not"}
_TOKEN = re.compile(r"[^\W_]+")

# English function words, plus words that scaffold VQA and NLVR2 text ("how many", "what kind of", "in the
# image", "the left image") without naming anything in the scene; matching them would fill the knowledge slots
# with noise. A stop word may still end a multi-word concept ("trash can").
STOP_WORDS = frozenset(
    """
    a about above across after again against all almost along also although always am among an and another any
    anybody anyone anything anywhere are around as at be because been before behind being below beneath beside
    besides between beyond both but by can cannot could did do does doing done down during each either else
    enough even ever every everybody everyone everything everywhere few for from further get gets getting go
    goes going got had has have having he her here hers herself him himself his how however i if in inside
    into is it its itself just least left less like many may me might mine more most much must my myself
    near neither never next no nobody none nor not nothing now of off often on once one ones only onto or
    other others otherwise our ours ourselves out outside over own per perhaps quite rather really right same
    several shall she should since so some somebody someone something somewhere still such than that the
    their theirs them themselves then there therefore these they thing things this those though through
    throughout thus to together too toward towards under underneath unless until up upon us very via was
    we were what whatever when whenever where wherever whether which while who whoever whole whom whose why
    will with within without would yes yet you your yours yourself yourselves
    kind kinds type types sort sorts appear appears seem seems show shown shows visible seen see contain
    contains containing present image images picture pictures photo photos photograph photographs pic
    """.split()
)

# Question scaffolding: how a VQA question asks, not what it asks about. Matched like a concept (so "front door" and
# "tank top" still win as longer n-grams) but never kept, in any of the forms a vocabulary may hold them:
# - the attribute whose value is asked ("what color is the car", "what is the name of the street"). "kind", "type"
#   and "sort" are stop words already. "shape" is not here: in easy-VQA "the shape" is the object itself;
# - generic verbs of the question frame, which name no thing ("what is the man wearing / holding / carrying", "where
#   was this taken", "what does the sign say", "what is it made of / used for", "what is he looking at");
# - words that point into the picture or frame a count, not a thing in it ("in the background", "on top of", "the
#   scene", "which way", "how many different", "pieces of").
# Nouns for people ("man", "person") and categories ("animal", "food") stay concepts: they name what is in the image.
SCAFFOLDING = frozenset(
    """
    color colors colour colours colored coloured number numbers time name names brand brands size material
    pattern style direction weather season
    wear wears wearing wore worn hold holds holding held carry carries carrying carried take takes taking took
    taken say says saying said make makes making made picture pictured use uses using used call calls called
    write writes written wrote look looks looking looked mean means meant happen happens happening happened
    think thinks different
    scene object objects item items piece pieces display way background foreground front top bottom middle center
    centre side
    """.split()
) | frozenset({"look like", "look at", "looking at", "looks like", "made of", "made from", "used for"})

# Plurals that no suffix rule recovers.
IRREGULAR_PLURALS = {
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "feet": "foot",
    "teeth": "tooth",
    "mice": "mouse",
    "geese": "goose",
    "oxen": "ox",
    "dice": "die",
    "knives": "knife",
    "wives": "wife",
    "lives": "life",
    "leaves": "leaf",
    "loaves": "loaf",
    "halves": "half",
    "calves": "calf",
    "shelves": "shelf",
    "wolves": "wolf",
    "thieves": "thief",
    "scarves": "scarf",
}

# Words that look plural but name one thing; their own form is tried before the stripped one.
PLURAL_FORM_NOUNS = frozenset(
    "glasses sunglasses eyeglasses goggles scissors pants trousers jeans shorts pajamas pyjamas clothes tongs "
    "pliers binoculars headphones earphones news species series".split()
)

# Endings where a final "s" belongs to the word itself (glass, famous); after -us/-is it usually does
# (cactus, tennis) but not always (skis, taxis), so there the word itself is tried first.
_SINGULAR_ENDINGS = ("ss", "ous")
_AMBIGUOUS_ENDINGS = ("us", "is")
_VOWELS = frozenset("aeiou")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens of `text`: NFKC-normalised, contractions resolved, punctuation dropped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _TOKEN.findall(_CONTRACTIONS.sub(lambda m: _EXPANSIONS.get(m.group(0)[0], ""), text))


def normalize_name(name: str) -> str:
    """Canonical form of a concept name; the index stores heads in this form so lookups are exact."""
    return " ".join(tokenize(name))


def _plural_candidates(word: str) -> list[str]:
    if word.endswith("ies") and len(word) > 4:
        return [word[:-3] + "y", word[:-1]]
    if word.endswith("ves"):
        return [word[:-1], word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("ses"):
        stem = word[:-2]
        return [stem, word[:-1]] if stem.endswith(("ss", "us")) else [word[:-1], stem]
    if word.endswith(("xes", "ches", "shes")):
        return [word[:-2], word[:-1]]
    if word.endswith("oes") and len(word) > 6:
        return [word[:-2], word[:-1]]  # potatoes, tomatoes (but shoes, toes, canoes)
    if word.endswith(("zes", "oes")):
        return [word[:-1], word[:-2]]
    return [word[:-1]]


def _verb_candidates(word: str, suffix_len: int) -> list[str]:
    stem = word[:-suffix_len]
    candidates = [stem, stem + "e"]
    if len(stem) > 2 and stem[-1] == stem[-2] and stem[-1] not in _VOWELS:
        candidates.append(stem[:-1])  # running -> run, stopped -> stop
    if suffix_len == 2 and word.endswith("ied"):
        candidates.append(word[:-3] + "y")  # fried -> fry
    return candidates


@lru_cache(maxsize=1 << 16)
def lemma_candidates(word: str) -> tuple[str, ...]:
    """Possible dictionary forms of `word`, most likely first; the word itself is always included.

    Plurals put the singular first (a plural noun almost always means the singular concept). Words in -ing/-ed
    put themselves first, since many are nouns in their own right (building, painting, clothing).
    """
    if word in IRREGULAR_PLURALS:
        return (IRREGULAR_PLURALS[word], word)
    if word in PLURAL_FORM_NOUNS:
        return (word, word[:-2] if word.endswith("ses") else word[:-1])
    if len(word) > 5 and word.endswith("ing"):
        return (word, *_verb_candidates(word, 3))
    if len(word) > 4 and word.endswith("ed"):
        return (word, *_verb_candidates(word, 2))
    if len(word) <= 3 or not word.endswith("s") or word.endswith(_SINGULAR_ENDINGS):
        return (word,)
    if word.endswith(_AMBIGUOUS_ENDINGS):
        return (word, word[:-1])
    return (*dict.fromkeys(_plural_candidates(word)), word)


def extract_concepts(text: str, vocabulary: Container[str], scaffolding: Container[str] = SCAFFOLDING) -> list[str]:
    """Concepts of `vocabulary` mentioned in `text`, in order of appearance, each once.

    At each position not holding a stop word, the longest n-gram (<= 3 words) whose form (last word lemmatised)
    is in `vocabulary` is taken, and matching resumes after it; a single stop word is never a concept, and a match
    in `scaffolding` is passed over (`scaffolding=()` keeps everything, as extraction did before it existed).
    """
    tokens = tokenize(text)
    found: dict[str, None] = {}
    i = 0
    while i < len(tokens):
        step = 1
        if tokens[i] not in STOP_WORDS:
            for n in range(min(MAX_NGRAM, len(tokens) - i), 0, -1):
                prefix = " ".join(tokens[i : i + n - 1])
                forms = (f"{prefix} {w}" if prefix else w for w in lemma_candidates(tokens[i + n - 1]))
                match = next((form for form in forms if form in vocabulary), None)
                if match is not None:
                    if match not in scaffolding:
                        found.setdefault(match)
                    step = n
                    break
        i += step
    return list(found)


__all__ = [
    "IRREGULAR_PLURALS",
    "MAX_NGRAM",
    "PLURAL_FORM_NOUNS",
    "SCAFFOLDING",
    "STOP_WORDS",
    "extract_concepts",
    "lemma_candidates",
    "normalize_name",
    "tokenize",
]
