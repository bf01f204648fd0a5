"""Knowledge retrieval for VK-OOD: the SQLite knowledge index, written once and read by retrieval.

The one implementation of retrieval, shared by the dataset builders (through `modeling_vkood.knowledge`, which adds
the ConceptNet index builder) and by the processor at inference. It is Hub remote code: standard library only
(`sqlite3`, `json`, ...) and its flat siblings `concepts_vkood.py` (concept extraction) and `verbalize_vkood.py`
(edge -> sentence), imported by `processing_vkood.py` as a flat sibling, so a checkpoint loaded with
`trust_remote_code=True` retrieves exactly what the training data held, without this package.

An index is a SQLite file of (head, relation, tail, weight) edges with the concept vocabulary, written once and never
modified (so readers open it immutable, without locking, from any number of processes). `KnowledgeIndex` reads it
and retrieves; `retrieval_cut` cuts a retrieved list to fewer items exactly as a smaller retrieval would; and
`index_from_edge_lines` writes an index from JSON lines of edges (the Hub dataset form of a knowledge source).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .concepts_vkood import extract_concepts, normalize_name
from .verbalize_vkood import verbalize

INDEX_FORMAT = "vkood-conceptnet-index/1"
DEFAULT_MAX_ITEMS = 16
DEFAULT_PER_RELATION = 5
_EDGE_CACHE_SIZE = 1 << 16
_LINE_BATCH = 100_000

INDEX_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    # The primary key is the retrieval index: one seek per (head, relation), rows already by weight.
    "CREATE TABLE edges (head TEXT NOT NULL, relation TEXT NOT NULL, tail TEXT NOT NULL, weight REAL NOT NULL,"
    " PRIMARY KEY (head, relation, weight DESC, tail)) WITHOUT ROWID",
    "CREATE TABLE vocabulary (name TEXT PRIMARY KEY) WITHOUT ROWID",
    "CREATE TEMP TABLE staging (head TEXT, relation TEXT, tail TEXT, weight REAL)",
)


@dataclass(frozen=True)
class KnowledgeItem:
    """One retrieved edge; `text` is the sentence the model's text encoder reads."""

    head: str
    relation: str
    tail: str
    weight: float
    text: str

    def to_dict(self) -> dict:
        """Row format of the datasets' `knowledge` column (a plain copy: dataclasses.asdict deep-copies, 3x slower)."""
        return dict(vars(self))


def start_index(path: str | os.PathLike) -> sqlite3.Connection:
    """A fresh index file at `path` with empty tables; edges go into `staging`, then `finish_index` commits."""
    connection = sqlite3.connect(path)
    # Durability pragmas are off: an interrupted build is discarded whole, never resumed.
    for pragma in ("journal_mode = OFF", "synchronous = OFF", "temp_store = FILE", "cache_size = -262144"):
        connection.execute(f"PRAGMA {pragma}")
    for statement in INDEX_SCHEMA:
        connection.execute(statement)
    return connection


def finish_index(connection: sqlite3.Connection, meta: dict[str, str]) -> tuple[int, int]:
    """Move the staged edges into the index, one row per (head, relation, tail) at its strongest weight, write the
    vocabulary and `meta` (with the format tag) and commit; returns (edges, concepts)."""
    # The same edge arrives once per sense tag and source; keep it once, with its strongest weight.
    connection.execute(
        "INSERT INTO edges SELECT head, relation, tail, MAX(weight) FROM staging GROUP BY head, relation, tail"
    )
    connection.execute("INSERT INTO vocabulary SELECT DISTINCT head FROM edges")
    connection.execute("DROP TABLE staging")
    (edges,) = connection.execute("SELECT COUNT(*) FROM edges").fetchone()
    (concepts,) = connection.execute("SELECT COUNT(*) FROM vocabulary").fetchone()
    connection.executemany("INSERT INTO meta VALUES (?, ?)", {**meta, "format": INDEX_FORMAT}.items())
    connection.commit()
    return edges, concepts


def _round_robin_takes(sizes: Sequence[int], budget: int) -> list[int]:
    """How many first items of each group `budget` slots take when dealt one per group per round, in group order."""
    if sum(sizes) <= budget:
        return list(sizes)
    takes = [0] * len(sizes)
    while budget:
        for g, size in enumerate(sizes):
            if budget and takes[g] < size:
                takes[g] += 1
                budget -= 1
    return takes


def deal_round_robin(groups: Sequence[tuple[KnowledgeItem, ...]], budget: int) -> list[KnowledgeItem]:
    """The first items of each group, `budget` in all, dealt one per group per round; kept in group order."""
    takes = _round_robin_takes([len(group) for group in groups], budget)
    return [item for group, take in zip(groups, takes) for item in group[:take]]


def item_group(item) -> tuple[str, str] | None:
    """The (head, relation) of a retrieved item (a `KnowledgeItem`, its dict row, or any object with `.head` and
    `.relation`): the group retrieval deals slots over. None for an item without both (e.g. a bare sentence)."""
    if isinstance(item, Mapping):
        head, relation = item.get("head"), item.get("relation")
    else:
        head, relation = getattr(item, "head", None), getattr(item, "relation", None)
    return (head, relation) if isinstance(head, str) and isinstance(relation, str) else None


def retrieval_cut(items: Sequence, max_items: int) -> list:
    """At most `max_items` of the retrieved `items`, chosen as retrieval itself chooses them.

    `retrieval_cut(index.retrieve(text, n), m) == index.retrieve(text, m)` for every n >= m, which the prefix
    `retrieve(text, n)[:m]` is not: retrieval deals its slots round-robin over the (concept, relation) groups, so a
    smaller retrieval keeps fewer items of the first groups, not fewer groups. Each group (`item_group`) keeps its
    first items and the kept items stay in their given order. Items without a (head, relation), such as plain
    sentences, are cut in order (the first `max_items`).
    """
    if max_items < 0:
        raise ValueError(f"need max_items >= 0, got {max_items}")
    if len(items) <= max_items:
        return list(items)
    groups = [item_group(item) for item in items]
    if None in groups:
        return list(items[:max_items])
    sizes: dict[tuple[str, str], int] = {}
    for group in groups:
        sizes[group] = sizes.get(group, 0) + 1
    takes = dict(zip(sizes, _round_robin_takes(list(sizes.values()), max_items)))
    kept = []
    for item, group in zip(items, groups):
        if takes[group]:
            takes[group] -= 1
            kept.append(item)
    return kept


class _Reader:
    """One process's read-only view of an index: connection, vocabulary, and an edge cache."""

    def __init__(self, path: Path):
        self.pid = os.getpid()
        # immutable=1 skips file locking; sound because an index file is only ever replaced, never edited.
        self.connection = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False
        )
        try:
            meta = dict(self.connection.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as error:
            self.connection.close()
            raise ValueError(f"{path} is not a vkood knowledge index ({error})") from error
        if meta.get("format") != INDEX_FORMAT:
            self.connection.close()
            raise ValueError(f"{path} has index format {meta.get('format')!r}, expected {INDEX_FORMAT!r}")
        self.meta = meta
        self.relations: tuple[str, ...] = tuple(json.loads(meta["relations"]))
        self.vocabulary = frozenset(name for (name,) in self.connection.execute("SELECT name FROM vocabulary"))
        self.edges = lru_cache(maxsize=_EDGE_CACHE_SIZE)(self._query_edges)

    def _query_edges(self, concept: str, per_relation: int) -> tuple[tuple[KnowledgeItem, ...], ...]:
        """The concept's strongest edges, one tuple per relation in the index's relation order."""
        return tuple(
            tuple(
                KnowledgeItem(concept, relation, tail, weight, verbalize(concept, relation, tail))
                for tail, weight in self.connection.execute(
                    "SELECT tail, weight FROM edges WHERE head = ? AND relation = ? ORDER BY weight DESC, tail LIMIT ?",
                    (concept, relation, per_relation),
                )
            )
            for relation in self.relations
        )


class KnowledgeIndex:
    """Retrieval from a built index file; picklable by path and safe to share with forked or spawned workers."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = Path(index_path)
        self._reader: _Reader | None = None
        self._current()  # fail here, naming the file, rather than inside the first worker

    def _current(self) -> _Reader:
        """This process's reader; a worker forked from the owner opens its own instead of sharing a connection."""
        if self._reader is None or self._reader.pid != os.getpid():
            self._reader = _Reader(self.path)
        return self._reader

    @property
    def relations(self) -> tuple[str, ...]:
        return self._current().relations

    @property
    def meta(self) -> dict[str, str]:
        return dict(self._current().meta)

    def __len__(self) -> int:
        """Number of concepts that have edges."""
        return len(self._current().vocabulary)

    def __contains__(self, concept: str) -> bool:
        return concept in self._current().vocabulary

    def concepts(self, text: str) -> list[str]:
        """Concepts of this graph mentioned in `text`, in order of appearance (longest n-gram wins)."""
        return extract_concepts(text, self._current().vocabulary)

    def retrieve(
        self, text: str, max_items: int = DEFAULT_MAX_ITEMS, per_relation: int = DEFAULT_PER_RELATION
    ) -> list[KnowledgeItem]:
        """Knowledge about the concepts in `text`: each concept's strongest `per_relation` edges per relation.

        Output order is concept (appearance), relation (index order), weight descending, tail. When more than
        `max_items` qualify, slots are dealt round-robin (every concept-relation's best edge before any second
        best) so the first concept of a question cannot crowd out the others.
        """
        if max_items < 0 or per_relation < 1:
            raise ValueError(f"need max_items >= 0 and per_relation >= 1, got {max_items} and {per_relation}")
        reader = self._current()
        groups: list[tuple[KnowledgeItem, ...]] = []
        for concept in extract_concepts(text, reader.vocabulary):
            if len(groups) >= max_items:
                break  # round-robin never reaches groups past the first max_items non-empty ones
            groups.extend(group for group in reader.edges(concept, per_relation) if group)
        return deal_round_robin(groups, max_items)

    def retrieve_batch(
        self, texts: Sequence[str], max_items: int = DEFAULT_MAX_ITEMS, per_relation: int = DEFAULT_PER_RELATION
    ) -> list[list[KnowledgeItem]]:
        """`retrieve` for each text (concept edges are cached, so repeated concepts across a batch are free)."""
        return [self.retrieve(text, max_items=max_items, per_relation=per_relation) for text in texts]

    def close(self) -> None:
        """Release this process's connection and caches; a later query reopens them."""
        if self._reader is not None and self._reader.pid == os.getpid():
            self._reader.connection.close()
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._reader = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


# ------------------------------------------------------------------------------------ edges as JSON lines
# A knowledge source published as a Hub dataset is a JSON-lines file of edges, one object per line with "head",
# "relation", "tail" and "weight" (`KnowledgeBase.export_edges` writes it from an index). JSON lines rather than
# Parquet because the standard library reads it (remote code cannot count on pyarrow) and the Hub's dataset viewer
# shows it. Relations are listed by a concept in the order they first appear in the file, so an exported index
# reads back with its own relation order and gives identical retrievals.
EDGES_FILE = "edges.jsonl"


def default_cache_dir() -> Path:
    """Where indexes built on the fly live: $VKOOD_CACHE, else ~/.cache/vkood."""
    return Path(os.environ.get("VKOOD_CACHE") or Path.home() / ".cache" / "vkood")


def _edge_rows(path: Path, relations: dict[str, None]) -> Iterable[tuple[str, str, str, float]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                edge = json.loads(line)
                head, relation, tail = normalize_name(edge["head"]), edge["relation"], edge["tail"]
                weight = float(edge["weight"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}: line {number} is not an edge object ({error})") from error
            if not (head and isinstance(relation, str) and relation and isinstance(tail, str) and tail.strip()):
                raise ValueError(f"{path}: line {number} has an empty head, relation or tail")
            relations.setdefault(relation)
            yield head, relation, tail, weight


def index_from_edge_lines(edges_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The index of a JSON-lines edge file, built once into `cache_dir` (named by the file's hash) and reused.

    The file is written under a temporary name and renamed when complete, so a reader never sees half an index.
    """
    edges_path = Path(edges_path)
    digest = hashlib.sha256(edges_path.read_bytes()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    index_path = folder / f"edges-{digest}.sqlite"
    if index_path.is_file():
        return index_path
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{index_path.name}.", suffix=".tmp", dir=folder)
    os.close(descriptor)
    try:
        connection = start_index(temporary)
        try:
            relations: dict[str, None] = {}
            rows = _edge_rows(edges_path, relations)
            while batch := [row for _, row in zip(range(_LINE_BATCH), rows)]:
                connection.executemany("INSERT INTO staging VALUES (?, ?, ?, ?)", batch)
            finish_index(connection, {"source": str(edges_path), "relations": json.dumps(list(relations))})
        finally:
            connection.close()
        os.replace(temporary, index_path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return index_path
