"""Concept extraction (normalise, lemmatise, longest n-gram match, stop words and question scaffolding out).

The implementation is `modeling_vkood/concepts_vkood.py`, the remote-code file the processor retrieves with at
inference (through `knowledge_vkood.py`); this module names it for the index builder and other package code.
"""

from ..concepts_vkood import (
    IRREGULAR_PLURALS,
    MAX_NGRAM,
    PLURAL_FORM_NOUNS,
    SCAFFOLDING,
    STOP_WORDS,
    extract_concepts,
    lemma_candidates,
    normalize_name,
    tokenize,
)

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
