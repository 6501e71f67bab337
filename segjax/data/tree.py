"""Read files from an extracted folder or, in place, from a tar / tgz archive.

Archives are never extracted: members are read into memory by name, so no member can be written
anywhere. A member whose path is absolute or climbs out with `..` makes the whole archive suspect,
and it is refused. Links are not followed.
"""
from __future__ import annotations

import os
import posixpath
import tarfile

from segjax.errors import SegjaxError


class DirTree:
    """Files under `root`, addressed by '/'-separated relative paths."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def exists(self, rel: str) -> bool:
        return os.path.isfile(os.path.join(self.root, rel))

    def read(self, rel: str) -> bytes:
        with open(os.path.join(self.root, rel), "rb") as f:
            return f.read()

    def list(self, rel_dir: str) -> list[str]:
        d = os.path.join(self.root, rel_dir)
        return sorted(f"{rel_dir}/{n}" for n in os.listdir(d) if os.path.isfile(os.path.join(d, n))) if os.path.isdir(d) else []

    def describe(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def order_key(self, rel: str) -> int:
        return 0


def _safe_name(name: str) -> str | None:
    """The normalised relative path of a member, or None when it would land outside the archive root."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return None
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return None
    return posixpath.normpath(name.replace("\\", "/"))


class TarTree:
    """Regular-file members of a tar / tar.gz, addressed like DirTree. Reads in member order are
    sequential (cheap even through gzip); `order_key` lets a caller sort its reads that way."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._tar = tarfile.open(path, "r:*")
            members = self._tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise SegjaxError(f"{path}: corrupt or truncated archive ({e}); re-download it") from None
        self._members = {}
        for m in members:
            safe = _safe_name(m.name)
            if safe is None:
                raise SegjaxError(f"{path}: member '{m.name}' points outside the archive; refusing to read "
                                  "this archive (use the official file)")
            if m.isfile():
                self._members[safe] = m

    def __getstate__(self):
        raise TypeError("TarTree holds an open file; open it inside the worker instead")

    def exists(self, rel: str) -> bool:
        return rel in self._members

    def read(self, rel: str) -> bytes:
        try:
            return self._tar.extractfile(self._members[rel]).read()
        except (tarfile.TarError, OSError, EOFError, KeyError) as e:
            raise SegjaxError(f"{self.describe(rel)}: cannot read archive member ({e}); re-download the archive") from None

    def list(self, rel_dir: str) -> list[str]:
        prefix = rel_dir.rstrip("/") + "/"
        return sorted(n for n in self._members if n.startswith(prefix) and "/" not in n[len(prefix):])

    def describe(self, rel: str) -> str:
        return f"{self.path}:{rel}"

    def order_key(self, rel: str) -> int:
        m = self._members.get(rel)
        return m.offset if m is not None else 0

    def close(self):
        self._tar.close()


def open_tree(manual_dir: str, folder: str, archive: str) -> DirTree | TarTree | None:
    """`manual_dir/folder` when extracted there, else the archive `manual_dir/archive` read in
    place; None when neither is present (the caller says which combination it needs)."""
    if os.path.isdir(os.path.join(manual_dir, folder)):
        return DirTree(os.path.join(manual_dir, folder))
    if os.path.isfile(os.path.join(manual_dir, archive)):
        return _Subtree(TarTree(os.path.join(manual_dir, archive)), folder)
    return None


class _Subtree:
    """A view of `tree` rooted at `prefix` (the folder the archive unpacks to)."""

    def __init__(self, tree: TarTree, prefix: str):
        self.tree, self.prefix = tree, prefix.strip("/")

    def _p(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def exists(self, rel):
        return self.tree.exists(self._p(rel))

    def read(self, rel):
        return self.tree.read(self._p(rel))

    def list(self, rel_dir):
        return [n[len(self.prefix) + 1:] for n in self.tree.list(self._p(rel_dir))]

    def describe(self, rel):
        return self.tree.describe(self._p(rel))

    def order_key(self, rel):
        return self.tree.order_key(self._p(rel))
