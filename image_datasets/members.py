"""Images stored inside container files, read in place: WebDataset tar shards and Hugging Face `datasets` tables.

A `Member` stands where a sample would otherwise hold a file Path (Sample.image, Sample.controls): it names its
container and where the bytes are, and reads them on demand (a seek + read in a tar shard, one row of a
memory-mapped Arrow table), so nothing is extracted and nothing is held in RAM. The helpers below (`read_bytes`,
`open_binary`, `stat_key`, `identity`) take either a Path or a Member, so the image reader, the scan index and the
embedding cache treat both alike. Members pickle small (DataLoader workers): a source drops its open file handles
and reopens them in the worker.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path, PurePosixPath


class TarSource:
    """One uncompressed tar shard, read by (offset, size)."""

    kind = "tar"

    def __init__(self, path: str | Path):
        self.path = os.path.abspath(path)
        st = os.stat(self.path)
        self.version = st.st_mtime_ns  # an entry of the scan index counts only while the shard is unchanged
        self._local = threading.local()

    def read(self, loc: tuple) -> bytes:
        offset, size = loc
        f = getattr(self._local, "file", None)
        if f is None or getattr(self._local, "pid", None) != os.getpid():
            f = self._local.file = open(self.path, "rb")
            self._local.pid = os.getpid()
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.path}: shard is shorter than its index (member at byte {offset}); was it rewritten?")
        return data

    def __getstate__(self):
        return {"path": self.path, "version": self.version}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()


class ArrowSource:
    """One Hugging Face `datasets.Dataset` (memory-mapped Arrow); a member is (row, column) of an Image column stored
    undecoded (`{"bytes", "path"}`)."""

    kind = "hf"

    def __init__(self, dataset, label: str):
        self.dataset = dataset
        self.path = label  # what messages call it: the folder / file / hub id the user gave
        self.version = dataset._fingerprint  # changes with the data

    def read(self, loc: tuple) -> bytes:
        row, column = loc
        cell = self.dataset.data.column(column)[row].as_py()  # the stored cell, not decoded by `datasets`
        if isinstance(cell, dict) and cell.get("bytes") is not None:
            return cell["bytes"]
        path = cell.get("path") if isinstance(cell, dict) else cell
        if not isinstance(path, str) or not path:
            raise OSError(f"{self.path} row {row}: column '{column}' holds no image")
        if not os.path.isabs(path) and os.path.isdir(self.path):
            path = os.path.join(self.path, path)
        with open(path, "rb") as f:
            return f.read()

    def __getstate__(self):
        return {"dataset": self.dataset, "path": self.path, "version": self.version}

    def __setstate__(self, state):
        self.__dict__.update(state)


class _Stat:
    __slots__ = ("st_size", "st_mtime_ns")

    def __init__(self, size: int, mtime_ns: int):
        self.st_size, self.st_mtime_ns = size, mtime_ns


class Member:
    """An image inside a TarSource (loc = (offset, size)) or an ArrowSource (loc = (row, column))."""

    __slots__ = ("source", "loc", "member")

    def __init__(self, source, loc: tuple, member: str):
        self.source, self.loc, self.member = source, loc, member

    def __str__(self) -> str:
        return f"{self.source.path}:{self.member}"

    __repr__ = __str__

    def __eq__(self, other) -> bool:
        return isinstance(other, Member) and other.source is self.source and other.loc == self.loc

    def __hash__(self) -> int:
        return hash((id(self.source), self.loc))

    def __getstate__(self):
        return (self.source, self.loc, self.member)

    def __setstate__(self, state):
        self.source, self.loc, self.member = state

    @property
    def name(self) -> str:
        return PurePosixPath(self.member).name

    def read_bytes(self) -> bytes:
        return self.source.read(self.loc)

    def stat(self) -> _Stat:
        """Size (a tar member's; -1 for a table row, whose size is not known without reading it) and the
        container's version in place of a modification time."""
        size = self.loc[1] if self.source.kind == "tar" else -1
        version = self.source.version
        if not isinstance(version, int):
            version = int(hashlib.sha256(str(version).encode()).hexdigest()[:15], 16)
        return _Stat(size, version)


def read_bytes(ref) -> bytes:
    return ref.read_bytes() if isinstance(ref, Member) else Path(ref).read_bytes()


def open_binary(ref):
    """What PIL's Image.open takes: the path itself, or the member's bytes as a file object."""
    return io.BytesIO(ref.read_bytes()) if isinstance(ref, Member) else ref


def stat_key(ref) -> tuple[int, int]:
    """(size, mtime_ns) that must match for a recorded check of this file / member to count."""
    st = ref.stat() if isinstance(ref, Member) else os.stat(ref)
    return st.st_size, st.st_mtime_ns


def identity(ref) -> str:
    """A stable name for the scan index: the absolute path, or container:member. A name that is not UTF-8 (its
    bytes carried as surrogates) is spelled with backslash escapes, which SQLite can store."""
    name = str(ref) if isinstance(ref, Member) else os.path.abspath(ref)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return name
