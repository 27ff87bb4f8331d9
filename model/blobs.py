"""Blobs: named byte strings, the one storage interface of checkpoints and the task bank.

A key is a relative path of plain segments ("checkpoints/v0001-maml-lora-x/meta.json"). Two
backends: `Folder` (files under a root: the command-line tools and a machine of one's own) and
`contract.blobs.RedisBlobs` (chunked values in Redis: what every machine of the service reaches).
No backend ever hands out a path: callers keep keys.
"""

from __future__ import annotations

import os
import re
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

_SEGMENT = re.compile(r"^[A-Za-z0-9_.@=+-]+$")


class BlobError(ValueError):
    """A key that is not a relative path of plain segments."""


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or any(not _SEGMENT.match(p) or p in (".", "..") for p in parts):
        raise BlobError(f"not a blob key: {key!r}")
    return key


class Blobs(ABC):
    """get/put/create/delete by key, and the keys under a prefix."""

    where = "the blob store"  # how error messages name the store (never a server path)

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value, or None when there is none (or it is incomplete: evicted in part)."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store data under key, replacing any value at once: a reader sees the old or the new one."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Store data only when key holds nothing; True for the one caller that did (a lock)."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def keys(self, prefix: str = "") -> list[str]:
        """Every key that starts with prefix, sorted."""

    def exists(self, key: str) -> bool:
        return self.get(key) is not None

    def under(self, prefix: str) -> Blobs:
        """The keys below prefix/, as a store of their own."""
        return Prefixed(self, check_key(prefix))


class Prefixed(Blobs):
    def __init__(self, inner: Blobs, prefix: str):
        self.inner, self.prefix = inner, prefix.rstrip("/") + "/"
        self.where = inner.where

    def get(self, key: str) -> bytes | None:
        return self.inner.get(self.prefix + check_key(key))

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(self.prefix + check_key(key), data)

    def create(self, key: str, data: bytes) -> bool:
        return self.inner.create(self.prefix + check_key(key), data)

    def delete(self, key: str) -> None:
        self.inner.delete(self.prefix + check_key(key))

    def keys(self, prefix: str = "") -> list[str]:
        return [k[len(self.prefix):] for k in self.inner.keys(self.prefix + prefix)]


class Folder(Blobs):
    """Files under root: key a/b is root/a/b. Writes go to a temporary file that is then renamed."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.where = "the local folder"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def under(self, prefix: str) -> Folder:
        return Folder(self.root / check_key(prefix))

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def keys(self, prefix: str = "") -> list[str]:
        # Walk only the folder the prefix names (a bank holds thousands of files elsewhere).
        top = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not top.is_dir():
            return []
        found = []
        for dirpath, _, files in os.walk(top):
            rel = Path(dirpath).relative_to(self.root)
            for f in files:
                key = f if rel == Path(".") else f"{rel.as_posix()}/{f}"
                if key.startswith(prefix) and not f.startswith("."):
                    found.append(key)
        return sorted(found)


def blobs_at(where: Path | Blobs) -> Blobs:
    """A store as given, or the folder a path names."""
    return where if isinstance(where, Blobs) else Folder(Path(where))
