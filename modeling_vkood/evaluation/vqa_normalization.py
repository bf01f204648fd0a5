"""The answer normalisation of the current official VQA evaluation (GT-Vision-Lab/VQA `vqaEval.py`, commit a013f00
of 2021-03-11, "Fixed processing answers bug"), rule for rule.

Scores are only comparable with published VQA numbers if answers are processed exactly as the official toolkit
processes them, quirks included, so every rule below follows it; the quirks are named where they occur. When the
rules apply (only to questions whose human answers disagree) is decided in `vqa.comparable_answers`.
"""

import re
from functools import lru_cache

# The marks `processPunctuation` deletes or turns into a space. Not in the list, so kept: the period (handled by
# its own rule below), the colon ("10:30") and the apostrophe ("don't").
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# The official patterns run under Python 2, where `\d` in a pattern without re.UNICODE is [0-9]; written so here.
_COMMA_BETWEEN_DIGITS = re.compile(r"([0-9])(,)([0-9])")
# The official pattern reads "(?!<=\d)" (a look-ahead for the text "<=" and a digit, not a look-behind), so in
# effect a period is removed unless a digit follows it.
_PERIOD = re.compile(r"(?!<=[0-9])(\.)(?![0-9])")
# The official script passes `re.UNICODE` (= 32) positionally to `sub`, where it lands on `count`: at most 32
# periods are removed from one answer.
_OFFICIAL_PERIOD_LIMIT = 32
_MARKS = frozenset(_PUNCTUATION) | {"."}
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Answers repeat massively ("yes", "2", ...): caching the pure string functions makes dataset builds cheap.
_CACHE_SIZE = 1 << 16


def _contraction_table() -> dict[str, str]:
    """The official table of contraction spellings, ASCII apostrophes throughout, as {written: restored}.

    Most entries map the apostrophe-less spelling to the standard one (for double contractions, two spellings
    with apostrophes missing). The official table also holds entries that are no-ops or look reversed, and
    keys with capitals that can never match after lower-casing; they are kept as they are, for identical results.
    """
    restored = (
        "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll "
        "how's I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't "
        "shan't should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd "
        "something'll that's there'd there're there's they'd they'll they're they've wasn't we've weren't "
        "what'll what're what's what've when's where'd where's where've who'd who'll who's who've why'll why're "
        "why's won't would've wouldn't y'all you'd you'll you're you've"
    ).split()
    table = {word.replace("'", ""): word for word in restored}
    # Double contractions: the spelling without its last apostrophe and the one with only the last apostrophe
    # both map to the full form.
    double = (
        "couldn't've hadn't've he'd've I'd've it'd've mightn't've she'd've shouldn't've somebody'd've "
        "someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'll y'all'd've "
        "you'd've"
    ).split()
    for word in double:
        first, _, last = word.rpartition("'")
        table[first + last] = word  # the last apostrophe missing
        table[first.replace("'", "") + "'" + last] = word  # the others missing
    # Entries of the official table that the two rules above do not produce.
    table.update(
        {
            "let's": "let's",
            "she's": "she's",
            "twas": "'twas",
            "somebody'd": "somebodyd",
            "ow's'at": "'ow's'at",
            "'ows'at": "'ow's'at",
            "'ow'sat": "'ow's'at",
            "y'alld've": "y'all'd've",
            "yall'd've": "y'all'd've",
        }
    )
    del table["yalld've"]  # y'all'd've is the one triple contraction: the official table spells it otherwise
    return table


_CONTRACTIONS = _contraction_table()


def clean_answer(text: str) -> str:
    """Newlines and tabs to spaces, then strip: what the official script does to every answer first."""
    return text.replace("\n", " ").replace("\t", " ").strip()


@lru_cache(maxsize=_CACHE_SIZE)
def process_punctuation(text: str) -> str:
    """Drop or space out punctuation as the official `processPunctuation` does.

    A mark is deleted when the input has it next to a space or contains a comma between digits anywhere
    ("1,000" -> "1000"), otherwise replaced by a space ("black/white" -> "black white"); then every period not
    followed by a digit goes (at most 32 of them).
    """
    if _MARKS.isdisjoint(text):
        return text  # nothing the rules below could change
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_OFFICIAL_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """Lower-case, number words -> digits, drop articles, restore contractions (official `processDigitArticle`)."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


@lru_cache(maxsize=_CACHE_SIZE)
def normalize_answer(answer: str) -> str:
    """The full official normalisation: clean, `processPunctuation`, then `processDigitArticle`.

    The official evaluation applies it to the prediction and to every human answer of a question whose human
    answers are not all identical (see `vqa.comparable_answers`). Vocabularies are built from it too.
    """
    return process_digit_article(process_punctuation(clean_answer(answer)))
