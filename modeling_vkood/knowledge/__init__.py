"""Explicit knowledge for VK-OOD: an offline ConceptNet index, concept extraction, retrieval, verbalisation.

Pure Python and SQLite (no torch, no transformers), so dataset preparation can use it in light worker
processes. Retrieval itself is remote code the processor also uses at inference: `modeling_vkood/concepts_vkood.py`
(concept extraction), `modeling_vkood/verbalize_vkood.py` (edge -> sentence) and `modeling_vkood/knowledge_vkood.py`
(the index: format, reading, retrieval); this package adds building, opening and exporting indexes, and the
remote-code files never import it.
"""

from ..concepts_vkood import extract_concepts
from ..knowledge_vkood import KnowledgeItem, retrieval_cut
from ..verbalize_vkood import verbalize
from .store import DEFAULT_RELATIONS, BuildReport, KnowledgeBase

__all__ = [
    "DEFAULT_RELATIONS",
    "BuildReport",
    "KnowledgeBase",
    "KnowledgeItem",
    "extract_concepts",
    "retrieval_cut",
    "verbalize",
]
