"""A persisted index of checked image files, so a restart does not decode and hash the whole dataset again.

One SQLite file (`scan_index.sqlite` in the cache folder) maps each file's path to (size, mtime_ns) and what a
full check found: its oriented (width, height) and the sha256 of its bytes (the embedding cache keys on it). An entry
counts only while the file's size and mtime are unchanged, so an edited or replaced file is checked again. SQLite
keeps the memory of a lookup constant (no Python dict of a million entries) and is in the standard library.

The main process writes it (during its scan, before the other ranks scan: trainer/loop.py); other processes open
it read-only. A missing, locked or unreadable index is only slower, never wrong: lookups then miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from pathlib import Path

from .members import identity, read_bytes, stat_key

logger = logging.getLogger(__name__)

FILE_NAME = "scan_index.sqlite"


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, or of a tar member's / table cell's (image_datasets/members.py)."""
    if not isinstance(path, (str, os.PathLike)):
        return hashlib.sha256(read_bytes(path)).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ScanIndex:
    """path -> (size, mtime_ns, width, height, sha256) of files that passed the full check; see the module doc."""

    def __init__(self, path: Path | None, writable: bool = True):
        self.path = Path(path) if path is not None else None
        self.writable = writable
        self.db: sqlite3.Connection | None = None
        self.hits = self.misses = 0
        self._rows: dict = {}  # prefetched rows (prefetch)
        self._pending = 0
        if self.path is None:
            return
        try:
            if writable:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(str(self.path), timeout=30)
                self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, "
                                "width INTEGER, height INTEGER, sha256 TEXT)")
                self.db.execute("CREATE TABLE IF NOT EXISTS shards (path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, listing TEXT)")
            elif self.path.is_file():
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        except sqlite3.Error as e:
            logger.warning("scan index %s unusable (%s); checking every file", self.path, e)
            self.db = None

    def prefetch(self, paths) -> None:
        """Read the rows of these files in one query; the next get() of each is answered from them. A scan calls it
        per chunk of files, so the rows held at once stay bounded."""
        self._rows = {}
        if self.db is None or not paths:
            return
        ids = {identity(p): str(p) for p in paths}
        keys = list(ids)
        try:
            for start in range(0, len(keys), 500):
                part = keys[start:start + 500]
                found = {ids[r[0]]: r[1:] for r in self.db.execute(
                    f"SELECT path, size, mtime, width, height, sha256 FROM files WHERE path IN ({','.join('?' * len(part))})", part)}
                self._rows.update((ids[k], found.get(ids[k])) for k in part)  # None: known to be absent, no query in get()
        except sqlite3.Error:
            self._rows = {}

    def get(self, path: Path) -> tuple[int, int, str | None] | None:
        """(width, height, sha256) recorded for this exact file version, or None."""
        if self.db is None:
            return None
        try:
            size, mtime = stat_key(path)
            name = str(path)
            if name in self._rows:  # prefetched, keyed as the scan names the file
                row = self._rows.pop(name)
            else:
                row = self.db.execute("SELECT size, mtime, width, height, sha256 FROM files WHERE path = ?", (identity(path),)).fetchone()
        except (OSError, sqlite3.Error):
            row = None
        if row is None or row[0] != size or row[1] != mtime:
            self.misses += 1
            return None
        self.hits += 1
        return row[2], row[3], row[4]

    def put(self, path: Path, width: int, height: int, digest: str | None) -> None:
        if self.db is None or not self.writable:
            return
        try:
            size, mtime = stat_key(path)
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)", (identity(path), size, mtime, width, height, digest))
            self._pending += 1
            if self._pending >= 2000:
                self.commit()
        except (OSError, sqlite3.Error) as e:
            logger.warning("scan index %s: cannot record %s (%s)", self.path, path, e)

    def digests(self, paths, chunk: int = 500) -> list[str | None]:
        """digest() of many files, their rows fetched `chunk` at a time (a query per file costs ~20 us)."""
        out: list[str | None] = []
        for start in range(0, len(paths), chunk):
            part = paths[start:start + chunk]
            self.prefetch(part)
            out += [hit[2] if (hit := self.get(p)) else None for p in part]
        self._rows = {}
        return out

    def digest(self, path: Path) -> str | None:
        hit = self.get(path)
        return hit[2] if hit else None

    def get_shard(self, shard: str) -> list | None:
        """A tar shard's member listing (sources.shard_listing) recorded for this exact shard version, or None."""
        if self.db is None:
            return None
        try:
            version = stat_key(shard)
            row = self.db.execute("SELECT size, mtime, listing FROM shards WHERE path = ?", (identity(shard),)).fetchone()
        except (OSError, sqlite3.Error):  # an index written before shards were recorded has no such table
            return None
        if row is None or (row[0], row[1]) != version:
            return None
        return [(n, o, s, None if t is None else t.encode("latin-1")) for n, o, s, t in json.loads(row[2])]

    def put_shard(self, shard: str, listing: list) -> None:
        if self.db is None or not self.writable:
            return
        try:
            text = json.dumps([(n, o, s, None if t is None else t.decode("latin-1")) for n, o, s, t in listing])
            self.db.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?)", (identity(shard), *stat_key(shard), text))
            self._pending += 1
        except (OSError, sqlite3.Error) as e:
            logger.warning("scan index %s: cannot record shard %s (%s)", self.path, shard, e)

    def commit(self) -> None:
        if self.db is not None and self.writable and self._pending:
            try:
                self.db.commit()
            except sqlite3.Error as e:
                logger.warning("scan index %s: cannot save (%s)", self.path, e)
            self._pending = 0

    def close(self) -> None:
        self.commit()
        if self.db is not None:
            self.db.close()
            self.db = None


_ACTIVE: ScanIndex | None = None


def active() -> ScanIndex | None:
    """The index of the current run (set by `use`), consulted by the embedding cache's file hashing."""
    return _ACTIVE


def use(index: ScanIndex | None) -> None:
    global _ACTIVE
    if _ACTIVE is not None and _ACTIVE is not index:
        _ACTIVE.close()
    _ACTIVE = index
