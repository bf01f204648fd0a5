"""METER's VQAv2 answer list: which answer each output of a METER (or VK-OOD authors') VQA classifier stands for.

The released checkpoints store no answer names; output *i* is answer *i* of the list METER's `write_vqa.make_arrow`
builds: the `multiple_choice_answer` of every annotation of `v2_mscoco_train2014_annotations.json`, then of
`v2_mscoco_val2014_annotations.json`, in file order, each passed through METER's `glossary.normalize_word`; the
answers seen at least 9 times, in order of first occurrence (3,129 answers on the official files). This is not the
project's own VQAv2 vocabulary rule (`data_scripts.vqav2`: frequency order), so converted checkpoints need this one.

`normalize_word` reproduces METER's function, quirks included. It is the official VQA normalisation
(`modeling_vkood.evaluation.vqa_normalization`, whose tables METER uses unchanged) with two differences: METER runs
under Python 3, where `\\d` in its patterns matches any Unicode decimal digit (the official script, Python 2: only
0-9), and it does not first turn tabs and newlines into spaces nor strip the answer (which decides whether a mark
"touches a space").
"""

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..evaluation.vqa_normalization import _PUNCTUATION, process_digit_article

ANNOTATION_FILES = ("v2_mscoco_train2014_annotations.json", "v2_mscoco_val2014_annotations.json")
MIN_COUNT = 9  # METER's threshold: with the official files it gives `vqav2_label_size = 3129` (config.py)

_MARKS = frozenset(_PUNCTUATION) | {"."}
# Unicode digits, as `\d` in METER's (Python 3, str) patterns.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# METER's pattern is "(?!<=\d)(\.)(?!\d)": its first group is a look-ahead (for the text "<=" and a digit) that
# can never match where a period stands, so a period goes unless a digit follows it.
_PERIOD = re.compile(r"\.(?!\d)")
# METER passes `re.UNICODE` (= 32) positionally to `Pattern.sub`, where it is the count: at most 32 periods go.
_PERIOD_LIMIT = 32


def _punctuation(word: str) -> str:
    """Delete each mark that touches a space in `word` (all marks when digits surround a comma), space the others
    out, then drop the periods no digit follows."""
    if _MARKS.isdisjoint(word):
        return word  # nothing below could change it
    delete_all = _DIGIT_COMMA_DIGIT.search(word) is not None
    out = word
    for mark in _PUNCTUATION:
        touches_space = mark + " " in word or " " + mark in word  # tested on the input, not on `out`
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def normalize_word(word: str) -> str:
    """METER's `glossary.normalize_word`: punctuation as above, then lower-case, split on whitespace, number words
    to digits, articles dropped, contractions restored, words joined by single spaces.

    METER's last step, deleting the commas left, changes nothing: every comma was already deleted or spaced out.
    """
    return process_digit_article(_punctuation(word))


def answer_list_from_records(
    train_annotations: Iterable[Mapping], val_annotations: Iterable[Mapping], min_count: int = MIN_COUNT
) -> list[str]:
    """METER's answer list from the annotation records of the train2014 and val2014 files, each in file order.

    Only `multiple_choice_answer` is read. `min_count` is METER's 9; other values are for tests.
    """
    normalized: dict[str, str] = {}  # few distinct answers (tens of thousands among 658k records): normalise each once
    counts: Counter[str] = Counter()  # keeps first-occurrence order, as METER's Counter does
    for subset, records in (("train2014", train_annotations), ("val2014", val_annotations)):
        for index, record in enumerate(records):
            answer = record.get("multiple_choice_answer") if isinstance(record, Mapping) else None
            if not isinstance(answer, str):
                raise ValueError(f"{subset} annotation record {index}: no string 'multiple_choice_answer'")
            if answer not in normalized:
                normalized[answer] = normalize_word(answer)
            counts[normalized[answer]] += 1
    return [answer for answer, count in counts.items() if count >= min_count]


def _annotations(path: Path) -> list:
    """The record list of one official annotation file."""
    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    if not isinstance(document, dict) or not isinstance(document.get("annotations"), list):
        raise ValueError(f"{path}: expected a JSON object with a list under 'annotations'")
    return document["annotations"]


def meter_answer_list(annotation_folder: str | os.PathLike) -> list[str]:
    """METER's answer list (label id -> answer) from the official VQAv2 annotation files in `annotation_folder`.

    Both files are needed (`ANNOTATION_FILES`, names as released, not gzipped): the list depends on both counts.
    """
    folder = Path(annotation_folder)
    paths = [folder / name for name in ANNOTATION_FILES]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"METER's answer list needs the official VQAv2 annotation files; missing: {missing}")
    train, val = (_annotations(path) for path in paths)
    try:
        return answer_list_from_records(train, val)
    except ValueError as error:
        raise ValueError(f"{folder}: {error}") from error
