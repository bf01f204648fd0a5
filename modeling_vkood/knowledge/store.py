"""Offline ConceptNet knowledge base: a SQLite index built once from the official assertions dump.

The live ConceptNet API is rate limited and goes down; the dump does not. `KnowledgeBase.build` streams the
dump (34 million lines, gzip or plain) into a small SQLite file holding only the chosen languages and relations;
`retrieve` then answers from that file plus per-process caches. The file is written under a temporary name and
renamed when complete, so readers never see a half-built index, and it is never modified afterwards, which is
what lets readers open it immutable (no locking) from any number of processes. The temporary file lives in a
locked scratch folder (`scratch.py`), so the leftovers of a killed build are deleted by the next build.

Reading and retrieval (`KnowledgeIndex`, the index schema) live in the remote-code file
`modeling_vkood/knowledge_vkood.py`, concept extraction and verbalisation in its siblings `concepts_vkood.py` and
`verbalize_vkood.py`, so that the processor at inference retrieves with the very same code; `KnowledgeBase` is that
reader plus the ways to make an index.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from ..concepts_vkood import normalize_name
from ..knowledge_vkood import (
    EDGES_FILE,
    KnowledgeIndex,
    default_cache_dir,
    finish_index,
    start_index,
)
from .scratch import scratch_folder

DEFAULT_RELATIONS = ("AtLocation", "PartOf", "IsA", "UsedFor", "HasA")
_INSERT_BATCH = 100_000
_PROGRESS_EVERY = 1 << 16  # lines between progress-bar updates; updating per line would dominate the loop
_MALFORMED_EXAMPLES = 20


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
        with (
            raw,
            stream,
            tqdm(total=os.path.getsize(self.path), unit="B", unit_scale=True, desc=f"indexing {self.path.name}") as bar,
        ):
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
    connection = start_index(path)
    try:
        for batch in _batches(reader.rows(), _INSERT_BATCH):
            connection.executemany("INSERT INTO staging VALUES (?, ?, ?, ?)", batch)
        # The report needs the finished tables' counts, so it joins meta after `finish_index`.
        edges, concepts = finish_index(
            connection,
            {
                "source": str(reader.path),
                "relations": json.dumps(list(relations)),
                "languages": json.dumps(list(languages)),
            },
        )
        report = BuildReport(
            path=str(path),
            built=True,
            **reader.counts,
            edges=edges,
            concepts=concepts,
            seconds=round(time.perf_counter() - started, 3),
            malformed_lines=tuple(reader.malformed_lines),
        )
        connection.execute("INSERT INTO meta VALUES ('report', ?)", (json.dumps(dataclasses.asdict(report)),))
        connection.commit()
    finally:
        connection.close()
    return report


class KnowledgeBase(KnowledgeIndex):
    """A built index (`KnowledgeIndex`: retrieval, picklable by path) plus the ways to build, open and export one."""

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
            index_path = Path(cache_dir or default_cache_dir()) / f"starter-{digest}.sqlite"
            cls.build(csv_path, index_path)
        return cls.open(index_path)

    def export_edges(self, path: str | os.PathLike) -> Path:
        """Write every edge as JSON lines (the Hub dataset form of a knowledge source, `knowledge_vkood.EDGES_FILE`).

        Edges are written relation by relation in the index's relation order, so the file read back lists relations
        in the same order and retrieves the same items. A folder `path` receives `edges.jsonl`.
        """
        path = Path(path)
        if path.is_dir():
            path = path / EDGES_FILE
        connection = self._current().connection
        with open(path, "w", encoding="utf-8") as handle:
            for relation in self.relations:
                for head, tail, weight in connection.execute(
                    "SELECT head, tail, weight FROM edges WHERE relation = ? ORDER BY head, weight DESC, tail",
                    (relation,),
                ):
                    edge = {"head": head, "relation": relation, "tail": tail, "weight": weight}
                    handle.write(json.dumps(edge, ensure_ascii=False) + "\n")
        return path
