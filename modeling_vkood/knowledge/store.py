"""Offline ConceptNet knowledge base: a SQLite index built once from the official assertions dump.

The live ConceptNet API is rate limited and goes down; the dump does not. `KnowledgeBase.build` streams the
dump (34 million lines, gzip or plain) into a small SQLite file holding only the chosen languages and relations;
`retrieve` then answers from that file plus per-process caches. The file is written under a temporary name and
renamed when complete, so readers never see a half-built index, and it is never modified afterwards, which is
what lets readers open it immutable (no locking) from any number of processes. The temporary file lives in a
locked scratch folder (`scratch.py`), so the leftovers of a killed build are deleted by the next build.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from .concepts import extract_concepts, normalize_name
from .scratch import scratch_folder
from .verbalize import verbalize

DEFAULT_RELATIONS = ("AtLocation", "PartOf", "IsA", "UsedFor", "HasA")
INDEX_FORMAT = "vkood-conceptnet-index/1"
_INSERT_BATCH = 100_000
_PROGRESS_EVERY = 1 << 16  # lines between progress-bar updates; updating per line would dominate the loop
_MALFORMED_EXAMPLES = 20
_EDGE_CACHE_SIZE = 1 << 16

_SCHEMA = (
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


@dataclass(frozen=True)
class BuildReport:
    """What a build read and kept. `built` is False when an existing index was reused.

    Lines are checked cheaply first (column count, relation, languages) and only candidate edges are fully
    parsed, so `malformed` counts lines with the wrong column count plus candidates with a bad URI, bad JSON
    or no numeric weight; `malformed_lines` gives the first line numbers (1-based) of those.
    """

    path: str
    built: bool
    lines: int
    kept: int
    malformed: int
    skipped_relation: int
    skipped_language: int
    skipped_self_loop: int
    edges: int
    concepts: int
    seconds: float
    malformed_lines: tuple[int, ...] = ()


def _relation_name(relation: str) -> str:
    name = relation.removeprefix("/r/").strip("/")
    if not name:
        raise ValueError(f"empty relation name in {relation!r}")
    return name


def _concept_term(uri: str) -> str:
    """'/c/en/ice_cream/n/wn/food' -> 'ice_cream'; raises ValueError for anything that is not a concept URI."""
    parts = uri.split("/", 4)
    if len(parts) < 4 or parts[0] or parts[1] != "c" or not parts[3]:
        raise ValueError(f"not a concept URI: {uri!r}")
    return parts[3]


def _open_dump(path: Path):
    """Binary line stream of the dump, gzip detected by its magic bytes rather than by the file name."""
    raw = open(path, "rb")
    if raw.peek(2)[:2] == b"\x1f\x8b":
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    return raw, raw


class _DumpReader:
    """Streams the dump's edges as (head, relation, tail, weight) rows, counting everything it drops."""

    def __init__(self, path: Path, relations: Sequence[str], languages: Sequence[str]):
        self.path = path
        self.relations = {f"/r/{r}".encode(): r for r in relations}
        self.prefixes = tuple(f"/c/{lang}/".encode() for lang in languages)
        self.counts = dict.fromkeys(
            ("lines", "kept", "malformed", "skipped_relation", "skipped_language", "skipped_self_loop"), 0
        )
        self.malformed_lines: list[int] = []
        # The dump is sorted by relation then start concept, so a small cache catches nearly every repeat.
        self._names = lru_cache(maxsize=1 << 16)(normalize_name)

    def _malformed(self, line_number: int) -> None:
        self.counts["malformed"] += 1
        if len(self.malformed_lines) < _MALFORMED_EXAMPLES:
            self.malformed_lines.append(line_number)

    def _parse(self, start: bytes, end: bytes, info: bytes) -> tuple[str, str, float]:
        head = self._names(_concept_term(start.decode()))
        tail = _concept_term(end.decode()).replace("_", " ")
        weight = json.loads(info)["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weight is not a finite number: {weight!r}")
        if not head or not tail.strip():
            raise ValueError("concept name has no letters or digits")
        return head, tail, float(weight)

    def rows(self) -> Iterator[tuple[str, str, str, float]]:
        raw, stream = _open_dump(self.path)
        counts = self.counts
        with raw, stream, tqdm(
            total=os.path.getsize(self.path), unit="B", unit_scale=True, desc=f"indexing {self.path.name}"
        ) as bar:
            number = 0
            for number, line in enumerate(stream, 1):
                if number % _PROGRESS_EVERY == 0:
                    bar.update(raw.tell() - bar.n)
                fields = line.rstrip(b"\r\n").split(b"\t")
                if len(fields) != 5:
                    self._malformed(number)
                    continue
                _, relation_uri, start, end, info = fields
                relation = self.relations.get(relation_uri)
                if relation is None:
                    counts["skipped_relation"] += 1
                    continue
                if not (start.startswith(self.prefixes) and end.startswith(self.prefixes)):
                    counts["skipped_language"] += 1
                    continue
                try:
                    head, tail, weight = self._parse(start, end, info)
                except (ValueError, KeyError, TypeError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
                    self._malformed(number)
                    continue
                if head == self._names(tail):
                    counts["skipped_self_loop"] += 1
                    continue
                counts["kept"] += 1
                yield head, relation, tail, weight
            counts["lines"] = number
            bar.update(raw.tell() - bar.n)


def _batches(rows: Iterable[tuple], size: int) -> Iterator[list[tuple]]:
    batch: list[tuple] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_index(path: Path, reader: _DumpReader, relations: Sequence[str], languages: Sequence[str]) -> BuildReport:
    """Fill a fresh SQLite file at `path` from `reader`; the caller owns atomicity."""
    started = time.perf_counter()
    connection = sqlite3.connect(path)
    try:
        # Durability pragmas are off: an interrupted build is discarded whole, never resumed.
        for pragma in ("journal_mode = OFF", "synchronous = OFF", "temp_store = FILE", "cache_size = -262144"):
            connection.execute(f"PRAGMA {pragma}")
        for statement in _SCHEMA:
            connection.execute(statement)
        for batch in _batches(reader.rows(), _INSERT_BATCH):
            connection.executemany("INSERT INTO staging VALUES (?, ?, ?, ?)", batch)
        # The same edge arrives once per sense tag and source; keep it once, with its strongest weight.
        connection.execute(
            "INSERT INTO edges SELECT head, relation, tail, MAX(weight) FROM staging GROUP BY head, relation, tail"
        )
        connection.execute("INSERT INTO vocabulary SELECT DISTINCT head FROM edges")
        connection.execute("DROP TABLE staging")
        (edges,) = connection.execute("SELECT COUNT(*) FROM edges").fetchone()
        (concepts,) = connection.execute("SELECT COUNT(*) FROM vocabulary").fetchone()
        report = BuildReport(
            path=str(path),
            built=True,
            **reader.counts,
            edges=edges,
            concepts=concepts,
            seconds=round(time.perf_counter() - started, 3),
            malformed_lines=tuple(reader.malformed_lines),
        )
        meta = {
            "format": INDEX_FORMAT,
            "source": str(reader.path),
            "relations": json.dumps(list(relations)),
            "languages": json.dumps(list(languages)),
            "report": json.dumps(dataclasses.asdict(report)),
        }
        connection.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        connection.commit()
    finally:
        connection.close()
    return report


def _deal_round_robin(groups: Sequence[tuple[KnowledgeItem, ...]], budget: int) -> list[KnowledgeItem]:
    """The first items of each group, `budget` in all, dealt one per group per round; kept in group order."""
    if sum(map(len, groups)) <= budget:
        return [item for group in groups for item in group]
    takes = [0] * len(groups)
    while budget:
        for g, group in enumerate(groups):
            if budget and takes[g] < len(group):
                takes[g] += 1
                budget -= 1
    return [item for group, take in zip(groups, takes) for item in group[:take]]


def _default_cache_dir() -> Path:
    return Path(os.environ.get("VKOOD_CACHE") or Path.home() / ".cache" / "vkood")


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


class KnowledgeBase:
    """Read access to a built index; picklable by path and safe to share with forked or spawned workers."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = Path(index_path)
        self._reader: _Reader | None = None
        self._current()  # fail here, naming the file, rather than inside the first worker

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def build(
        cls,
        source: str | os.PathLike,
        index_path: str | os.PathLike,
        relations: Sequence[str] = DEFAULT_RELATIONS,
        languages: Sequence[str] = ("en",),
        force: bool = False,
    ) -> BuildReport:
        """Index the edges of a ConceptNet assertions dump whose ends are both in `languages`.

        `relations` are ConceptNet relation names ("UsedFor" or "/r/UsedFor"); their order is the order in which
        retrieval lists a concept's edges. A no-op returning the stored report when the index exists and not `force`.
        """
        source, index_path = Path(source), Path(index_path)
        if index_path.exists() and not force:
            with cls.open(index_path) as existing:
                stored = json.loads(existing._current().meta["report"])
            stored.update(path=str(index_path), built=False, malformed_lines=tuple(stored["malformed_lines"]))
            return BuildReport(**stored)
        if not source.is_file():
            raise FileNotFoundError(f"ConceptNet dump not found: {source}")
        relations = tuple(dict.fromkeys(_relation_name(r) for r in relations))
        languages = tuple(dict.fromkeys(languages))
        if not relations or not languages:
            raise ValueError("at least one relation and one language are needed")
        with scratch_folder(index_path.parent, f".{index_path.name}.", ".tmp") as scratch:
            temporary = scratch / index_path.name
            report = _write_index(temporary, _DumpReader(source, relations, languages), relations, languages)
            os.replace(temporary, index_path)
        return dataclasses.replace(report, path=str(index_path))

    @classmethod
    def open(cls, index_path: str | os.PathLike) -> KnowledgeBase:
        """Open a built index; raises FileNotFoundError or ValueError naming the file if it is not one."""
        if not Path(index_path).is_file():
            raise FileNotFoundError(f"knowledge index not found: {index_path} (create it with KnowledgeBase.build)")
        return cls(index_path)

    @classmethod
    def starter(cls, cache_dir: str | os.PathLike | None = None) -> KnowledgeBase:
        """The bundled starter graph (easy-VQA shapes and colours, the 80 COCO objects), indexed on first use.

        The index name carries a hash of the bundled CSV, so an upgraded package never reads a stale index.
        Processes racing to build it each write in their own scratch folder; the rename makes the last one win
        harmlessly.
        """
        source = resources.files(__package__) / "data" / "starter.csv"
        with resources.as_file(source) as csv_path:
            digest = hashlib.sha256(csv_path.read_bytes()).hexdigest()[:16]
            index_path = Path(cache_dir or _default_cache_dir()) / f"starter-{digest}.sqlite"
            cls.build(csv_path, index_path)
        return cls.open(index_path)

    # ---------------------------------------------------------------------------------------------- queries
    def _current(self) -> _Reader:
        """This process's reader; a worker forked from the owner opens its own instead of sharing a connection."""
        if self._reader is None or self._reader.pid != os.getpid():
            self._reader = _Reader(self.path)
        return self._reader

    @property
    def relations(self) -> tuple[str, ...]:
        return self._current().relations

    def __len__(self) -> int:
        """Number of concepts that have edges."""
        return len(self._current().vocabulary)

    def __contains__(self, concept: str) -> bool:
        return concept in self._current().vocabulary

    def concepts(self, text: str) -> list[str]:
        """Concepts of this graph mentioned in `text`, in order of appearance (longest n-gram wins)."""
        return extract_concepts(text, self._current().vocabulary)

    def retrieve(self, text: str, max_items: int = 16, per_relation: int = 5) -> list[KnowledgeItem]:
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
        return _deal_round_robin(groups, max_items)

    def retrieve_batch(
        self, texts: Sequence[str], max_items: int = 16, per_relation: int = 5
    ) -> list[list[KnowledgeItem]]:
        """`retrieve` for each text (concept edges are cached, so repeated concepts across a batch are free)."""
        return [self.retrieve(text, max_items=max_items, per_relation=per_relation) for text in texts]

    # ------------------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release this process's connection and caches; a later query reopens them."""
        if self._reader is not None and self._reader.pid == os.getpid():
            self._reader.connection.close()
        self._reader = None

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._reader = None

    def __repr__(self) -> str:
        return f"KnowledgeBase({str(self.path)!r})"
