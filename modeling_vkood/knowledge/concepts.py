"""Concept extraction (normalise, lemmatise, longest n-gram match, stop words out).

The implementation is `modeling_vkood/knowledge_vkood.py`, the remote-code file the processor retrieves with at
inference; this module names its concept part for the index builder and other package code.
"""

from ..knowledge_vkood import (
    IRREGULAR_PLURALS,
    MAX_NGRAM,
    PLURAL_FORM_NOUNS,
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
    "STOP_WORDS",
    "extract_concepts",
    "lemma_candidates",
    "normalize_name",
    "tokenize",
]
