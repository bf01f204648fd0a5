"""Explicit knowledge for VK-OOD: an offline ConceptNet index, concept extraction, retrieval, verbalisation.

Pure Python and SQLite (no torch, no transformers), so dataset preparation can use it in light worker
processes. Retrieval itself (concepts, verbalisation, reading an index) is the remote-code file
`modeling_vkood/knowledge_vkood.py`, which the processor also uses at inference; this package adds building,
opening and exporting indexes, and the remote-code files never import it.
"""

from ..knowledge_vkood import KnowledgeItem, extract_concepts, verbalize
from .store import DEFAULT_RELATIONS, BuildReport, KnowledgeBase

__all__ = ["DEFAULT_RELATIONS", "BuildReport", "KnowledgeBase", "KnowledgeItem", "extract_concepts", "verbalize"]
