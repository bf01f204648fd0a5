"""Edge -> English sentence ("a cup is used for drinking"), the form the text encoder reads.

The implementation is `modeling_vkood/verbalize_vkood.py` (remote code, shared with the processor at inference);
this module names it for package code.
"""

from ..verbalize_vkood import noun_kind, verbalize, with_article

__all__ = ["noun_kind", "verbalize", "with_article"]
