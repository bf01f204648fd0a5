"""Turn a (head, relation, tail) edge into an English sentence, the form the text encoder reads.

Sentences follow ConceptNet's own surface patterns ("a cup is used for drinking", "a dog is a kind of animal").
Concept names carry no articles, so the head gets "a"/"an" unless it looks plural; tails get one only where the
pattern needs a countable noun phrase ("a wheel is part of a car"). Locations read "in the kitchen" but
"on the table" for the common surfaces.
"""

from __future__ import annotations

import re

# relation -> (pattern, whether the tail takes an indefinite article)
_PATTERNS = {
    "AtLocation": ("{head} is often found {preposition} the {tail}", False),
    "PartOf": ("{head} is part of {tail}", True),
    "IsA": ("{head} is a kind of {tail}", False),
    "UsedFor": ("{head} is used for {tail}", False),
    "HasA": ("{head} has {tail}", True),
    "RelatedTo": ("{head} is related to {tail}", False),
    "FormOf": ("{head} is a form of {tail}", False),
    "CapableOf": ("{head} can {tail}", False),
    "NotCapableOf": ("{head} cannot {tail}", False),
    "Causes": ("{head} causes {tail}", False),
    "CausesDesire": ("{head} makes you want to {tail}", False),
    "HasSubevent": ("{head} involves {tail}", False),
    "HasFirstSubevent": ("{head} begins with {tail}", False),
    "HasLastSubevent": ("{head} ends with {tail}", False),
    "HasPrerequisite": ("{head} requires {tail}", False),
    "HasProperty": ("{head} is {tail}", False),
    "NotHasProperty": ("{head} is not {tail}", False),
    "MotivatedByGoal": ("{head} is motivated by {tail}", False),
    "ObstructedBy": ("{head} is obstructed by {tail}", False),
    "Desires": ("{head} wants {tail}", False),
    "NotDesires": ("{head} does not want {tail}", False),
    "CreatedBy": ("{head} is created by {tail}", False),
    "MadeOf": ("{head} is made of {tail}", False),
    "ReceivesAction": ("{head} can be {tail}", False),
    "NotUsedFor": ("{head} is not used for {tail}", False),
    "Synonym": ("{head} means the same as {tail}", False),
    "Antonym": ("{head} is the opposite of {tail}", False),
    "DistinctFrom": ("{head} is not {tail}", True),
    "DerivedFrom": ("{head} is derived from {tail}", False),
    "SymbolOf": ("{head} is a symbol of {tail}", False),
    "DefinedAs": ("{head} is defined as {tail}", False),
    "MannerOf": ("{head} is a way to {tail}", False),
    "LocatedNear": ("{head} is found near {tail}", True),
    "HasContext": ("{head} is used in the context of {tail}", False),
    "SimilarTo": ("{head} is similar to {tail}", False),
    "EtymologicallyRelatedTo": ("{head} is etymologically related to {tail}", False),
    "EtymologicallyDerivedFrom": ("{head} is etymologically derived from {tail}", False),
    "InstanceOf": ("{head} is an instance of {tail}", False),
    "Entails": ("{head} entails {tail}", False),
}

# Location nouns one is found on rather than in.
_SURFACES = frozenset(
    "table desk shelf bookshelf plate counter wall floor sidewalk couch sofa lap windowsill mantel beach "
    "roof bed field ground runway rack pad tray".split()
)
_CAMEL_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_AN_EXCEPTIONS = ("uni", "use", "usu", "eu", "one", "once")  # vowel letters sounding like "y"/"w"
_A_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir")  # silent "h"


def _looks_plural(phrase: str) -> bool:
    last = phrase.rsplit(" ", 1)[-1]
    return last.endswith("s") and not last.endswith(("ss", "us", "is"))


def with_article(phrase: str) -> str:
    """`phrase` with "a"/"an" in front, unless it looks plural ("wheels") or has no letters to decide on."""
    if not phrase or _looks_plural(phrase) or not phrase[0].isalpha():
        return phrase
    vowel_sound = phrase.startswith(tuple("aeiou")) and not phrase.startswith(_AN_EXCEPTIONS)
    return ("an " if vowel_sound or phrase.startswith(_A_EXCEPTIONS) else "a ") + phrase


def verbalize(head: str, relation: str, tail: str) -> str:
    """English sentence for the edge; a relation without a pattern reads as its name ("HasGenre" -> "has genre")."""
    pattern, tail_article = _PATTERNS.get(relation, (None, False))
    if pattern is None:
        words = " ".join(w.lower() for w in _CAMEL_WORD.findall(relation.rsplit("/", 1)[-1]))
        pattern = "{head} " + words + " {tail}"
    preposition = "on" if tail.rsplit(" ", 1)[-1] in _SURFACES else "in"
    return pattern.format(
        head=with_article(head), tail=with_article(tail) if tail_article else tail, preposition=preposition
    )
