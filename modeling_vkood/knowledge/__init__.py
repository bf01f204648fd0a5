"""Explicit knowledge for VK-OOD: an offline ConceptNet index, concept extraction, retrieval, verbalisation.

Pure Python and SQLite (no torch, no transformers), so dataset preparation can use it in light worker
processes; the Hub remote-code model files never import it.
"""

from .concepts import extract_concepts
from .store import DEFAULT_RELATIONS, BuildReport, KnowledgeBase, KnowledgeItem
from .verbalize import verbalize

__all__ = ["DEFAULT_RELATIONS", "BuildReport", "KnowledgeBase", "KnowledgeItem", "extract_concepts", "verbalize"]
