"""An on-disk, memory-mapped document store (docid -> text, title) and the docid -> row lookup under it.

A served index must find 100 documents among 10M without a Python dict of the corpus (a dict of 10M strings is
gigabytes per replica, built at every start). Both classes here are files that every actor or replica opens in
milliseconds and shares through the page cache:

``DocidIndex`` (``docids.arrow`` + ``docids.keys.npy`` + ``docids.rows.npy``): the docids in row order (one Arrow
string array), the 64-bit BLAKE2b keys of those docids sorted, and the row of each sorted key. A lookup hashes the
asked docids, ``np.searchsorted``-s the memory-mapped keys and checks the docid at the row it found, so a key
collision (about 3e-6 at 10M docids) costs a short scan, never a wrong document.

``DocStore`` (a directory: ``docs.arrow`` + a ``DocidIndex`` + ``docstore.json``): docid, text, title in the
written order, as an Arrow IPC file of fixed-size record batches, read through ``pa.memory_map`` (zero copy: a
lookup touches only the pages of the rows it returns).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FORMAT = 1
#: rows per record batch of docs.arrow: a row's batch is row // BATCH_ROWS, and int32 offsets cannot overflow
#: unless 65536 texts average over 32 KB (they are stored as large strings anyway)
BATCH_ROWS = 65_536


def docid_keys(docids: Iterable[str]) -> np.ndarray:
    """The 64-bit key of each docid (first 8 bytes of its BLAKE2b digest): stable across processes and machines,
    unlike ``hash()``."""
    digest = b"".join(hashlib.blake2b(d.encode(), digest_size=8).digest() for d in docids)
    return np.frombuffer(digest, dtype=">u8").astype(np.uint64)


def _as_strings(docids: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    arr = (
        docids
        if isinstance(docids, (pa.Array, pa.ChunkedArray))
        else pa.array(list(docids), pa.large_string())
    )
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.large_string())
    return arr.cast(pa.large_string())


class DocidIndex:
    """docid <-> row for a fixed list of unique docids, as sorted 64-bit keys (no dict of the corpus)."""

    def __init__(self, docids: pa.Array, keys: np.ndarray, rows: np.ndarray):
        self._docids, self._keys, self._rows = docids, keys, rows

    @classmethod
    def build(cls, docids: Sequence[str] | pa.Array | pa.ChunkedArray) -> DocidIndex:
        """In memory; raise ValueError naming a duplicate or null docid."""
        arr = _as_strings(docids)
        if arr.null_count:
            raise ValueError(f"docid is null at row {int(pc.index(pc.is_null(arr), True).as_py())}")
        keys = docid_keys(arr.to_pylist())
        rows = np.argsort(keys, kind="stable")
        keys = keys[rows]
        same = np.flatnonzero(keys[1:] == keys[:-1])
        if len(same):
            # equal keys are a duplicate docid unless (rarely) two docids collide: compare the strings
            counts = pc.value_counts(arr)
            dup = counts.filter(pc.greater(counts.field("counts"), 1))
            if len(dup):
                raise ValueError(f"duplicate docid {dup.field('values')[0].as_py()!r} "
                                 f"({len(dup)} docid(s) appear more than once)")  # fmt: skip
        return cls(arr, keys, rows.astype(np.int64))

    def save(self, path: str | Path, name: str = "docids") -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        batch = pa.record_batch([self._docids], names=["docid"])
        with pa.OSFile(str(path / f"{name}.arrow"), "wb") as f, pa.ipc.new_file(f, batch.schema) as w:
            w.write_batch(batch)
        np.save(path / f"{name}.keys.npy", np.asarray(self._keys, np.uint64))
        np.save(path / f"{name}.rows.npy", np.asarray(self._rows, np.int64))
        return path

    @classmethod
    def exists(cls, path: str | Path, name: str = "docids") -> bool:
        return all((Path(path) / f"{name}{ext}").exists() for ext in (".arrow", ".keys.npy", ".rows.npy"))

    @classmethod
    def load(cls, path: str | Path, name: str = "docids") -> DocidIndex:
        """Memory-mapped: opening costs the same for 10 docids or 10M."""
        path = Path(path)
        reader = pa.ipc.open_file(pa.memory_map(str(path / f"{name}.arrow")))
        docids = (
            reader.get_batch(0).column(0) if reader.num_record_batches else pa.array([], pa.large_string())
        )
        return cls(docids, np.load(path / f"{name}.keys.npy", mmap_mode="r"),
                   np.load(path / f"{name}.rows.npy", mmap_mode="r"))  # fmt: skip

    def __len__(self) -> int:
        return len(self._docids)

    def __contains__(self, docid: str) -> bool:
        return bool(self.rows([docid])[0] >= 0)

    @property
    def docids(self) -> pa.Array:
        """Row -> docid (a memory-mapped Arrow array; ``.to_pylist()`` materializes it)."""
        return self._docids

    def docid(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        return self._docids.take(pa.array(np.asarray(rows, np.int64))).to_pylist()

    def rows(self, docids: Sequence[str]) -> np.ndarray:
        """The row of each docid, -1 for one not indexed."""
        docids = list(docids)
        out = np.full(len(docids), -1, np.int64)
        if not docids or not len(self._keys):
            return out
        keys = docid_keys(docids)
        pos = np.searchsorted(self._keys, keys, side="left")
        hit = pos < len(self._keys)
        hit[hit] = self._keys[pos[hit]] == keys[hit]
        if not hit.any():
            return out
        cand = np.asarray(self._rows[pos[hit]], np.int64)
        found = self._docids.take(pa.array(cand)).to_pylist()
        for j, i in enumerate(np.flatnonzero(hit)):
            if found[j] == docids[i]:
                out[i] = cand[j]
                continue
            p = pos[i] + 1  # a key collision: the docid, if indexed, is among the next rows with this key
            while p < len(self._keys) and self._keys[p] == keys[i]:
                row = int(self._rows[p])
                if self._docids[row].as_py() == docids[i]:
                    out[i] = row
                    break
                p += 1
        return out


class DocStore:
    """docid -> (text, title) for a corpus, on disk and memory-mapped; see the module docstring."""

    SCHEMA = pa.schema(
        [("docid", pa.large_string()), ("text", pa.large_string()), ("title", pa.large_string())]
    )

    def __init__(self, path: Path, index: DocidIndex, batches: list[pa.RecordBatch], batch_rows: int):
        self.path, self._index, self._batches, self._batch_rows = path, index, batches, batch_rows

    @staticmethod
    def write(path: str | Path, docs: pa.Table, batch_rows: int = BATCH_ROWS) -> Path:
        """Write ``docs`` (docid, text, title?; other columns ignored) to the directory ``path``. Raises
        ValueError naming a duplicate or null docid, or the missing column."""
        path = Path(path)
        for col in ("docid", "text"):
            if col not in docs.column_names:
                raise ValueError(f"docs table has no '{col}' column (columns: {docs.column_names})")
        n = docs.num_rows
        title = docs.column("title") if "title" in docs.column_names else pa.nulls(n, pa.large_string())
        table = pa.table([docs.column("docid").cast(pa.large_string()), docs.column("text").cast(pa.large_string()),
                          title.cast(pa.large_string())], schema=DocStore.SCHEMA)  # fmt: skip
        index = DocidIndex.build(table.column("docid"))
        path.mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(path / "docs.arrow"), "wb") as f, pa.ipc.new_file(f, DocStore.SCHEMA) as w:
            for start in range(0, n, batch_rows):
                w.write_batch(table.slice(start, batch_rows).combine_chunks().to_batches()[0])
        index.save(path)
        (path / "docstore.json").write_text(
            json.dumps({"format": FORMAT, "docs": n, "batch_rows": batch_rows})
        )
        return path

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        return (Path(path) / "docstore.json").exists()

    @classmethod
    def open(cls, path: str | Path) -> DocStore:
        path = Path(path)
        if not cls.exists(path):
            raise FileNotFoundError(f"{path} is not a document store (no docstore.json; augrel index build)")
        meta = json.loads((path / "docstore.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: document store format {meta.get('format')}, this code reads {FORMAT}")
        reader = pa.ipc.open_file(pa.memory_map(str(path / "docs.arrow")))
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        store = cls(path, DocidIndex.load(path), batches, int(meta["batch_rows"]))
        if len(store._index) != meta["docs"] or sum(b.num_rows for b in batches) != meta["docs"]:
            raise ValueError(f"{path}: docstore.json counts {meta['docs']} docs, the files disagree")
        return store

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, docid: str) -> bool:
        return docid in self._index

    def docids(self) -> pa.Array:
        return self._index.docids

    def rows(self, docids: Sequence[str]) -> np.ndarray:
        """The row of each docid in the store, -1 for an unknown one."""
        return self._index.rows(docids)

    def get(self, docids: Sequence[str]) -> pa.Table:
        """docid, text, title (null where the corpus has none) of each docid, in the order asked (repeats
        allowed). Raises KeyError naming the first docid not in the store."""
        docids = list(docids)
        rows = self._index.rows(docids)
        if (rows < 0).any():
            raise KeyError(f"docid {docids[int(np.flatnonzero(rows < 0)[0])]!r} is not in the document store "
                           f"{self.path}")  # fmt: skip
        return self.take(rows)

    def take(self, rows: np.ndarray) -> pa.Table:
        """The documents at ``rows`` (row numbers of this store), in that order."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return self.SCHEMA.empty_table().cast(_OUT_SCHEMA)
        batch, local = np.divmod(rows, self._batch_rows)
        order = np.argsort(batch, kind="stable")
        parts, bounds = [], np.flatnonzero(np.diff(batch[order])) + 1
        for seg in np.split(order, bounds):
            parts.append(self._batches[int(batch[seg[0]])].take(pa.array(local[seg])))
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return pa.Table.from_batches(parts).take(pa.array(inverse)).cast(_OUT_SCHEMA).combine_chunks()


_OUT_SCHEMA = pa.schema([("docid", pa.string()), ("text", pa.string()), ("title", pa.string())])
