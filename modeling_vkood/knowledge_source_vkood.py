"""Where a VKOODProcessor's knowledge comes from, and how its index file travels with a checkpoint.

Hub remote code, a flat sibling of `processing_vkood.py`: imports only transformers, the standard library and its
flat sibling `knowledge_vkood.py`. A knowledge source is named in the processor config (`knowledge_source`):

- "starter" or the name of a ConceptNet index: retrieval reads the SQLite index file `knowledge_index` names;
- `hf://datasets/OWNER/NAME[@REVISION]`: a Hub dataset holding `edges.jsonl` (JSON lines of {"head", "relation",
  "tail", "weight"}), fetched into the Hugging Face cache and indexed on first use;
- a local folder holding `edges.jsonl`, or a `.jsonl` file: indexed on first use.

A saved checkpoint carries its index as `knowledge_index.sqlite` (except for a Hub dataset source, which the
checkpoint names instead), so a folder or Hub model repository retrieves on any machine.
"""

import os
import shutil
import tempfile
from pathlib import Path

from transformers.utils.hub import cached_file

from .knowledge_vkood import EDGES_FILE, index_from_edge_lines

# The file name of the knowledge index inside a saved processor folder (and so inside a Hub model repository).
KNOWLEDGE_INDEX_FILE = "knowledge_index.sqlite"
HUB_DATASET_PREFIX = "hf://datasets/"
STARTER_SOURCE = "starter"
# The `from_pretrained` arguments that say where and how a checkpoint's files are fetched.
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only")


def is_hub_dataset(source: str) -> bool:
    """Whether `source` names a Hub dataset of edges (`hf://datasets/OWNER/NAME[@REVISION]`)."""
    return source.startswith(HUB_DATASET_PREFIX)


def is_edge_source(source: str) -> bool:
    """Whether `source` names JSON-lines edges (a Hub dataset, a local folder or .jsonl file) rather than an index."""
    if source == STARTER_SOURCE:
        return False
    path = Path(source)
    return is_hub_dataset(source) or path.is_dir() or (path.suffix == ".jsonl" and path.is_file())


def edges_file(source: str) -> str:
    """The JSON-lines edge file of a Hub dataset (`hf://datasets/OWNER/NAME[@REVISION]`, fetched into the Hugging
    Face cache) or of a local folder/file."""
    if is_hub_dataset(source):
        repo_id, _, revision = source.removeprefix(HUB_DATASET_PREFIX).partition("@")
        return cached_file(repo_id, EDGES_FILE, repo_type="dataset", revision=revision or None)
    path = Path(source)
    return str(path / EDGES_FILE if path.is_dir() else path)


def source_index(source: str, index: str | None) -> str:
    """The index file that retrieval from `source` reads: `index` when given, else (an edge source) the index built
    from its edges on first use, in $VKOOD_CACHE (default ~/.cache/vkood)."""
    if index is not None:
        return index
    if not is_edge_source(source):
        raise ValueError(
            f"knowledge_source={source!r} has no knowledge_index: give the index file (for the starter graph, "
            "modeling_vkood.knowledge.KnowledgeBase.starter().path) to set_knowledge_source"
        )
    return str(index_from_edge_lines(edges_file(source)))


def checkpoint_index(pretrained_model_name_or_path, index: str, **kwargs) -> str:
    """Where the index file `index` (a path relative to a checkpoint) is on this machine: in the local folder, or
    downloaded from the Hub repository with the checkpoint's own `cache_dir`, `revision`, `token` and
    `local_files_only` (taken from `kwargs`, the `from_pretrained` arguments)."""
    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
    return cached_file(pretrained_model_name_or_path, index, **hub_kwargs)


def ship_file(source: Path, destination: Path) -> None:
    """Put `source` at `destination`: a hard link where possible (an index is never modified, only replaced, so
    sharing its inode is safe and saving a checkpoint costs no space), else a copy; atomic either way."""
    if destination.exists() and os.path.samefile(source, destination):
        return
    descriptor, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", dir=destination.parent)
    os.close(descriptor)
    try:
        os.remove(temporary)
        try:
            os.link(source, temporary)
        except OSError:  # another file system, or links not supported
            shutil.copyfile(source, temporary)
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


__all__ = [
    "HUB_DATASET_PREFIX",
    "KNOWLEDGE_INDEX_FILE",
    "STARTER_SOURCE",
    "checkpoint_index",
    "edges_file",
    "is_edge_source",
    "is_hub_dataset",
    "ship_file",
    "source_index",
]
