"""Verbalisation for VK-OOD knowledge: an edge becomes the English sentence the text encoder reads.

Hub remote code (standard library only), a flat sibling of `knowledge_vkood.py`, which verbalises every retrieved
edge with `verbalize` ("a cup is used for drinking").
"""

from __future__ import annotations

import re

from .concepts_vkood import IRREGULAR_PLURALS, PLURAL_FORM_NOUNS

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


__all__ = ["noun_kind", "verbalize", "with_article"]
