"""Knowledge retrieval for VK-OOD: concept extraction, verbalisation and reading a knowledge index.

The one implementation of retrieval, shared by the dataset builders (through `modeling_vkood.knowledge`, which adds
the ConceptNet index builder) and by the processor at inference. It is Hub remote code: standard library only
(`sqlite3`, `re`, ...), imported by `processing_vkood.py` as a flat sibling, so a checkpoint loaded with
`trust_remote_code=True` retrieves exactly what the training data held, without this package.

- Concepts: the text is normalised and tokenised the same way concept names are normalised at index-build time, so
  a question word and a ConceptNet URI meet in one form ("T-shirt" and /c/en/t-shirt both become "t shirt").
  Matching is greedy, left to right, longest n-gram (up to 3 words) first, so "hot dog" wins over "dog". Only the
  last word of an n-gram is lemmatised ("wine glasses" -> "wine glass"): in English noun phrases the head noun
  carries the plural. Lemmatisation is deliberately light and rule based; each rule proposes candidates and the
  index vocabulary decides, so a wrong rule output ("cookies" -> "cooky") costs nothing when the right one
  ("cookie") is in the graph.
- Verbalisation: an edge becomes the English sentence the text encoder reads ("a cup is used for drinking"), see
  `verbalize`.
- Index: a SQLite file of (head, relation, tail, weight) edges with the concept vocabulary, written once and never
  modified (so readers open it immutable, without locking, from any number of processes). `KnowledgeIndex` reads
  it; `index_from_edge_lines` writes one from JSON lines of edges (the Hub dataset form of a knowledge source).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import tempfile
import unicodedata
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# ================================================================================================== concepts

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


def extract_concepts(text: str, vocabulary: Container[str]) -> list[str]:
    """Concepts of `vocabulary` mentioned in `text`, in order of appearance, each once.

    At each position not holding a stop word, the longest n-gram (<= 3 words) whose form (last word lemmatised)
    is in `vocabulary` is taken, and matching resumes after it; a single stop word is never a concept.
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
                    found.setdefault(match)
                    step = n
                    break
        i += step
    return list(found)


# ============================================================================================== verbalisation
# Sentences follow ConceptNet's own surface patterns ("a cup is used for drinking", "a dog is a kind of animal").
# Concept names carry no articles and no number, so each noun phrase is classed by its head noun (its last word
# before a preposition: "mix of black and white" -> "mix", "chairs around it" -> "chairs"):
#
# - countable: "a"/"an" where the pattern needs a noun phrase ("a dog", "a wheel is part of a car");
# - plural ("wheels", "scissors", "teeth", "salt and pepper"): no article and a plural verb ("scissors are ...");
# - mass ("broccoli", "fur", "sports equipment"): no article ("broccoli is a kind of vegetable", "a cat has fur");
# - a colour name used as a colour ("red"; "orange" or "teal" only when the other end of the edge is a colour):
#   no article, and IsA reads "red is a color" / "red is a primary color", since "a kind of" suits classes of
#   things, not a colour's category.
#
# The word lists below are small and aimed at the knowledge this package ships and retrieves (COCO objects,
# easy-VQA shapes and colours, everyday ConceptNet): a noun missing from them is treated as countable, the common
# case. Locations take "the" (none for mass nouns and place names) and the preposition their head noun takes ("on
# the table", "at the bus stop", "in the kitchen").

# relation -> (pattern, whether the tail takes an indefinite article). The word after {head} is the verb; it is
# put in the plural (_PLURAL_VERBS) when the head is plural.
_PATTERNS = {
    "AtLocation": ("{head} is often found {location}", False),
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
_COLOUR_IS_A = "{head} is {tail}"  # IsA for a colour: "red is a primary color"
_PLURAL_VERBS = {
    "is": "are",
    "has": "have",
    "does": "do",
    "causes": "cause",
    "makes": "make",
    "involves": "involve",
    "begins": "begin",
    "ends": "end",
    "requires": "require",
    "wants": "want",
    "means": "mean",
    "entails": "entail",
}

_PREPOSITIONS = frozenset("of in on at around with for from to by under over near into onto inside behind".split())
# Colour names that are only colours, and those that also name a thing (the fruit, the duck, the flower).
_COLOURS = frozenset(
    "red yellow green blue purple pink brown black white gray grey cyan magenta beige maroon crimson scarlet "
    "navy indigo turquoise ivory khaki".split()
)
_COLOUR_OR_THING = frozenset(
    "orange teal lime olive violet lavender peach plum rose salmon lemon cherry gold silver bronze copper cream "
    "chocolate coral tan".split()
)
_COLOUR_CATEGORIES = frozenset("color colour colors colours tone tones shade shades hue hues tint tints".split())
# Uncountable nouns common in visual scenes and everyday knowledge: food and drink, materials and substances,
# collectives, fields and activities. Multi-word entries are whole names whose last word would mislead.
_MASS_NOUNS = frozenset(
    """
    food water milk coffee tea juice wine beer soda liquor bread rice pasta spaghetti cheese butter meat beef pork
    bacon ham broccoli lettuce spinach celery corn cereal oatmeal soup sauce ketchup mustard mayonnaise sugar salt
    honey jam jelly chocolate candy cream yogurt flour dough frosting icing glaze stuffing popcorn toast fruit
    produce garlic ginger seafood protein fiber potassium calcium vitamin caffeine alcohol oil gasoline fuel
    wood metal plastic paper cardboard cloth fabric leather wool cotton silk denim fur hair concrete cement asphalt
    sand soil dirt mud grass hay snow ice rain fog steam air smoke dust rubber steel aluminum copper gold silver
    bronze glue tape webbing foam clay wax paint ink
    furniture equipment luggage baggage clothing apparel jewelry jewellery cutlery silverware dishware glassware
    tableware kitchenware cookware hardware software machinery traffic information news money garbage trash
    rubbish waste mail homework music art entertainment transportation transport footwear headwear neckwear
    rainwear underwear sportswear livestock poultry wildlife scenery vegetation foliage electricity energy heat
    sunlight weather space safety fun comfort health hygiene exercise work fashion
    physics mathematics economics politics gymnastics athletics aerobics billiards measles diabetes
    """.split()
) | {"vitamin c", "ice cream", "fast food", "junk food", "landing gear", "rain gear"}
# Words ending in "s" that name one thing.
_SINGULAR_S = frozenset("gas lens canvas atlas bias chaos christmas series species".split())
_PLURAL_NOUNS = (frozenset(IRREGULAR_PLURALS) | PLURAL_FORM_NOUNS | {"cattle", "police"}) - _SINGULAR_S - _MASS_NOUNS

# Locations: the preposition their head noun takes ("in" otherwise), and names that take no "the".
_LOCATION_PREPOSITIONS = {
    **dict.fromkeys(
        "table desk shelf bookshelf plate counter wall floor sidewalk couch sofa lap windowsill mantel beach roof "
        "bed field ground runway rack pad tray highway road track railway railroad slope mountain hill farm court "
        "porch corner back arm neck shoulder page screen island shore coast".split(),
        "on",
    ),
    **dict.fromkeys(
        "stop intersection crosswalk party wedding picnic game match fair barbecue concert festival ceremony "
        "funeral meeting circus zoo market checkout work".split(),
        "at",
    ),
}
_PLACE_NAMES = frozenset(
    """
    africa asia europe antarctica australia oceania arctic china japan india russia canada mexico brazil france
    germany italy spain england britain scotland ireland egypt kenya london paris tokyo rome venice beijing
    chicago boston washington hawaii alaska california florida texas
    """.split()
) | {
    "north america",
    "south america",
    "central america",
    "new york",
    "new york city",
    "hong kong",
    "los angeles",
    "san francisco",
}

_CAMEL_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_AN_EXCEPTIONS = ("uni", "use", "usu", "uti", "ute", "uri", "ura", "uku", "eu", "ewe", "one", "once")  # "y"/"w" sound
_A_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir")  # silent "h"


def _noun_words(phrase: str) -> list[str]:
    """The words of `phrase` up to its first preposition: the noun phrase whose last word is the head noun."""
    words = phrase.split()
    cut = next((i for i, word in enumerate(words) if i > 0 and word in _PREPOSITIONS), len(words))
    return words[:cut]


def _is_colour_term(phrase: str) -> bool:
    """Whether `phrase` names a colour or a kind of colour ("blue", "dark cyan", "warm color", "earth tone")."""
    words = _noun_words(phrase)
    return bool(words) and (words[-1] in _COLOURS or words[-1] in _COLOUR_CATEGORIES)


def noun_kind(phrase: str) -> str:
    """ "count", "plural" or "mass": how the noun phrase takes articles and verbs (colour names count as mass)."""
    words = _noun_words(phrase)
    if not words:
        return "count"
    head = words[-1]
    if "and" in words[1:-1]:
        return "plural"  # "salt and pepper", "black and white stripes"
    if " ".join(words) in _MASS_NOUNS or head in _MASS_NOUNS or head in _COLOURS:
        return "mass"
    if head in _PLURAL_NOUNS:
        return "plural"
    if head.endswith("s") and len(head) > 2 and not head.endswith(("ss", "us", "is")) and head not in _SINGULAR_S:
        return "plural"
    return "count"


def with_article(phrase: str) -> str:
    """`phrase` with "a"/"an" in front when it is a countable singular noun phrase that starts with a letter."""
    if not phrase or not phrase[0].isalpha() or noun_kind(phrase) != "count":
        return phrase
    vowel_sound = phrase.startswith(tuple("aeiou")) and not phrase.startswith(_AN_EXCEPTIONS)
    return ("an " if vowel_sound or phrase.startswith(_A_EXCEPTIONS) else "a ") + phrase


def _location(tail: str) -> str:
    """ "on the table", "at the bus stop", "in the kitchen", "in snow", "in africa"."""
    words = _noun_words(tail)
    preposition = _LOCATION_PREPOSITIONS.get(words[-1] if words else "", "in")
    bare = tail in _PLACE_NAMES or noun_kind(tail) == "mass"
    return f"{preposition} {tail}" if bare else f"{preposition} the {tail}"


def verbalize(head: str, relation: str, tail: str) -> str:
    """English sentence for the edge; a relation without a pattern reads as its name ("HasGenre" -> "has genre")."""
    pattern, tail_article = _PATTERNS.get(relation, (None, False))
    if pattern is None:
        words = " ".join(w.lower() for w in _CAMEL_WORD.findall(relation.rsplit("/", 1)[-1]))
        pattern = "{head} " + words + " {tail}"
    as_colour = head in _COLOURS or (head in _COLOUR_OR_THING and _is_colour_term(tail))
    if as_colour and relation == "IsA":
        pattern, tail_article = _COLOUR_IS_A, True
    subject = head if as_colour else with_article(head)
    if not as_colour and noun_kind(head) == "plural":
        verb, _, rest = pattern.removeprefix("{head} ").partition(" ")
        pattern = "{head} " + " ".join(filter(None, (_PLURAL_VERBS.get(verb, verb), rest)))
    return pattern.format(
        head=subject,
        tail=with_article(tail) if tail_article else tail,
        location=_location(tail) if relation == "AtLocation" else "",
    )


# ===================================================================================================== index

INDEX_FORMAT = "vkood-conceptnet-index/1"
DEFAULT_MAX_ITEMS = 16
DEFAULT_PER_RELATION = 5
_EDGE_CACHE_SIZE = 1 << 16
_LINE_BATCH = 100_000

INDEX_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    # The primary key is the retrieval index: one seek per (head, relation), rows already by weight.
    "CREATE TABLE edges (head TEXT NOT NULL, relation TEXT NOT NULL, tail TEXT NOT NULL, weight REAL NOT NULL,"
    " PRIMARY KEY (head, relation, weight DESC, tail)) WITHOUT ROWID",
    "CREATE TABLE vocabulary (name TEXT PRIMARY KEY) WITHOUT ROWID",
    "CREATE TEMP TABLE staging (head TEXT, relation TEXT, tail TEXT, weight REAL)",
)


@dataclass(frozen=True)
class KnowledgeItem:
    """One retrieved edge; `text` is the sentence the model's text encoder reads."""

    head: str
    relation: str
    tail: str
    weight: float
    text: str

    def to_dict(self) -> dict:
        """Row format of the datasets' `knowledge` column (a plain copy: dataclasses.asdict deep-copies, 3x slower)."""
        return dict(vars(self))


def start_index(path: str | os.PathLike) -> sqlite3.Connection:
    """A fresh index file at `path` with empty tables; edges go into `staging`, then `finish_index` commits."""
    connection = sqlite3.connect(path)
    # Durability pragmas are off: an interrupted build is discarded whole, never resumed.
    for pragma in ("journal_mode = OFF", "synchronous = OFF", "temp_store = FILE", "cache_size = -262144"):
        connection.execute(f"PRAGMA {pragma}")
    for statement in INDEX_SCHEMA:
        connection.execute(statement)
    return connection


def finish_index(connection: sqlite3.Connection, meta: dict[str, str]) -> tuple[int, int]:
    """Move the staged edges into the index, one row per (head, relation, tail) at its strongest weight, write the
    vocabulary and `meta` (with the format tag) and commit; returns (edges, concepts)."""
    # The same edge arrives once per sense tag and source; keep it once, with its strongest weight.
    connection.execute(
        "INSERT INTO edges SELECT head, relation, tail, MAX(weight) FROM staging GROUP BY head, relation, tail"
    )
    connection.execute("INSERT INTO vocabulary SELECT DISTINCT head FROM edges")
    connection.execute("DROP TABLE staging")
    (edges,) = connection.execute("SELECT COUNT(*) FROM edges").fetchone()
    (concepts,) = connection.execute("SELECT COUNT(*) FROM vocabulary").fetchone()
    connection.executemany("INSERT INTO meta VALUES (?, ?)", {**meta, "format": INDEX_FORMAT}.items())
    connection.commit()
    return edges, concepts


def deal_round_robin(groups: Sequence[tuple[KnowledgeItem, ...]], budget: int) -> list[KnowledgeItem]:
    """The first items of each group, `budget` in all, dealt one per group per round; kept in group order."""
    if sum(map(len, groups)) <= budget:
        return [item for group in groups for item in group]
    takes = [0] * len(groups)
    while budget:
        for g, group in enumerate(groups):
            if budget and takes[g] < len(group):
                takes[g] += 1
                budget -= 1
    return [item for group, take in zip(groups, takes) for item in group[:take]]


class _Reader:
    """One process's read-only view of an index: connection, vocabulary, and an edge cache."""

    def __init__(self, path: Path):
        self.pid = os.getpid()
        # immutable=1 skips file locking; sound because an index file is only ever replaced, never edited.
        self.connection = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False
        )
        try:
            meta = dict(self.connection.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as error:
            self.connection.close()
            raise ValueError(f"{path} is not a vkood knowledge index ({error})") from error
        if meta.get("format") != INDEX_FORMAT:
            self.connection.close()
            raise ValueError(f"{path} has index format {meta.get('format')!r}, expected {INDEX_FORMAT!r}")
        self.meta = meta
        self.relations: tuple[str, ...] = tuple(json.loads(meta["relations"]))
        self.vocabulary = frozenset(name for (name,) in self.connection.execute("SELECT name FROM vocabulary"))
        self.edges = lru_cache(maxsize=_EDGE_CACHE_SIZE)(self._query_edges)

    def _query_edges(self, concept: str, per_relation: int) -> tuple[tuple[KnowledgeItem, ...], ...]:
        """The concept's strongest edges, one tuple per relation in the index's relation order."""
        return tuple(
            tuple(
                KnowledgeItem(concept, relation, tail, weight, verbalize(concept, relation, tail))
                for tail, weight in self.connection.execute(
                    "SELECT tail, weight FROM edges WHERE head = ? AND relation = ? ORDER BY weight DESC, tail LIMIT ?",
                    (concept, relation, per_relation),
                )
            )
            for relation in self.relations
        )


class KnowledgeIndex:
    """Retrieval from a built index file; picklable by path and safe to share with forked or spawned workers."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = Path(index_path)
        self._reader: _Reader | None = None
        self._current()  # fail here, naming the file, rather than inside the first worker

    def _current(self) -> _Reader:
        """This process's reader; a worker forked from the owner opens its own instead of sharing a connection."""
        if self._reader is None or self._reader.pid != os.getpid():
            self._reader = _Reader(self.path)
        return self._reader

    @property
    def relations(self) -> tuple[str, ...]:
        return self._current().relations

    @property
    def meta(self) -> dict[str, str]:
        return dict(self._current().meta)

    def __len__(self) -> int:
        """Number of concepts that have edges."""
        return len(self._current().vocabulary)

    def __contains__(self, concept: str) -> bool:
        return concept in self._current().vocabulary

    def concepts(self, text: str) -> list[str]:
        """Concepts of this graph mentioned in `text`, in order of appearance (longest n-gram wins)."""
        return extract_concepts(text, self._current().vocabulary)

    def retrieve(
        self, text: str, max_items: int = DEFAULT_MAX_ITEMS, per_relation: int = DEFAULT_PER_RELATION
    ) -> list[KnowledgeItem]:
        """Knowledge about the concepts in `text`: each concept's strongest `per_relation` edges per relation.

        Output order is concept (appearance), relation (index order), weight descending, tail. When more than
        `max_items` qualify, slots are dealt round-robin (every concept-relation's best edge before any second
        best) so the first concept of a question cannot crowd out the others.
        """
        if max_items < 0 or per_relation < 1:
            raise ValueError(f"need max_items >= 0 and per_relation >= 1, got {max_items} and {per_relation}")
        reader = self._current()
        groups: list[tuple[KnowledgeItem, ...]] = []
        for concept in extract_concepts(text, reader.vocabulary):
            if len(groups) >= max_items:
                break  # round-robin never reaches groups past the first max_items non-empty ones
            groups.extend(group for group in reader.edges(concept, per_relation) if group)
        return deal_round_robin(groups, max_items)

    def retrieve_batch(
        self, texts: Sequence[str], max_items: int = DEFAULT_MAX_ITEMS, per_relation: int = DEFAULT_PER_RELATION
    ) -> list[list[KnowledgeItem]]:
        """`retrieve` for each text (concept edges are cached, so repeated concepts across a batch are free)."""
        return [self.retrieve(text, max_items=max_items, per_relation=per_relation) for text in texts]

    def close(self) -> None:
        """Release this process's connection and caches; a later query reopens them."""
        if self._reader is not None and self._reader.pid == os.getpid():
            self._reader.connection.close()
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._reader = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


# ------------------------------------------------------------------------------------ edges as JSON lines
# A knowledge source published as a Hub dataset is a JSON-lines file of edges, one object per line with "head",
# "relation", "tail" and "weight" (`KnowledgeBase.export_edges` writes it from an index). JSON lines rather than
# Parquet because the standard library reads it (remote code cannot count on pyarrow) and the Hub's dataset viewer
# shows it. Relations are listed by a concept in the order they first appear in the file, so an exported index
# reads back with its own relation order and gives identical retrievals.
EDGES_FILE = "edges.jsonl"


def default_cache_dir() -> Path:
    """Where indexes built on the fly live: $VKOOD_CACHE, else ~/.cache/vkood."""
    return Path(os.environ.get("VKOOD_CACHE") or Path.home() / ".cache" / "vkood")


def _edge_rows(path: Path, relations: dict[str, None]) -> Iterable[tuple[str, str, str, float]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                edge = json.loads(line)
                head, relation, tail = normalize_name(edge["head"]), edge["relation"], edge["tail"]
                weight = float(edge["weight"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}: line {number} is not an edge object ({error})") from error
            if not (head and isinstance(relation, str) and relation and isinstance(tail, str) and tail.strip()):
                raise ValueError(f"{path}: line {number} has an empty head, relation or tail")
            relations.setdefault(relation)
            yield head, relation, tail, weight


def index_from_edge_lines(edges_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The index of a JSON-lines edge file, built once into `cache_dir` (named by the file's hash) and reused.

    The file is written under a temporary name and renamed when complete, so a reader never sees half an index.
    """
    edges_path = Path(edges_path)
    digest = hashlib.sha256(edges_path.read_bytes()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    index_path = folder / f"edges-{digest}.sqlite"
    if index_path.is_file():
        return index_path
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{index_path.name}.", suffix=".tmp", dir=folder)
    os.close(descriptor)
    try:
        connection = start_index(temporary)
        try:
            relations: dict[str, None] = {}
            rows = _edge_rows(edges_path, relations)
            while batch := [row for _, row in zip(range(_LINE_BATCH), rows)]:
                connection.executemany("INSERT INTO staging VALUES (?, ?, ?, ?)", batch)
            finish_index(connection, {"source": str(edges_path), "relations": json.dumps(list(relations))})
        finally:
            connection.close()
        os.replace(temporary, index_path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return index_path
