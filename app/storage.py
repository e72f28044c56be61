"""Where uploaded datasets and job artifacts live, behind one small interface.

`LocalStorage` is a directory (shared by API and workers: a volume, or NFS across
machines). An object store would implement the same four methods; workers already ask for
`local_path`, which such a store would satisfy by downloading to a cache.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Protocol

from app.settings import Settings, get_settings


class Storage(Protocol):
    def staging_path(self, suffix: str = "") -> Path: ...
    def put_file(self, key: str, source: Path, *, move: bool = False) -> int: ...
    def local_path(self, key: str) -> Path: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def exists(self, key: str) -> bool: ...


class LocalStorage:
    def __init__(self, root: Path):
        self.root = root.resolve()
        (self.root / "staging").mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return path

    def staging_path(self, suffix: str = "") -> Path:
        """A fresh file name on the same filesystem, so `put_file(move=True)` is a rename."""
        return self.root / "staging" / f"{uuid.uuid4().hex}{suffix}"

    def put_file(self, key: str, source: Path, *, move: bool = False) -> int:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        size = source.stat().st_size
        if move:
            os.replace(source, target)
        else:
            tmp = target.with_name(target.name + ".partial")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        return size

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def get_storage(settings: Settings | None = None) -> Storage:
    return LocalStorage((settings or get_settings()).storage_dir)
