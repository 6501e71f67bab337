"""The one exception type users see: a one-line message naming the culprit and the fix.

`segjax.cli` prints these as `error: <message>` with no traceback and exits with status 2.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re


class SegjaxError(ValueError):
    pass


# The OS refused a write for a reason the user fixes outside the program (space, permissions, mounts).
_REFUSED = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.ENOTDIR: "a path component is a file, not a folder"}
# TensorStore (Orbax's array writer) reports OS errors inside its own message.
_TENSORSTORE = re.compile(r"os_error_code='?(\d+)")


def refused_write(e: BaseException) -> tuple[int, str | None] | None:
    """(errno, path or None) when `e`, or an exception it was raised from, is the OS refusing a write."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _REFUSED:
            return e.errno, e.filename
        m = _TENSORSTORE.search(str(e))
        if m and int(m[1]) in _REFUSED:
            path = re.search(r'local file "([^"]+)"', str(e))
            return int(m[1]), path[1] if path else None
        e = e.__cause__ or e.__context__
    return None


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


@contextlib.contextmanager
def writes_to(directory: str, option: str):
    """Turns the OS refusing a write under `directory` (full disk, read-only, no permission, ...) into one
    SegjaxError naming the directory and the fix. Errors about other paths, and every other error, pass."""
    try:
        yield
    except SegjaxError:
        raise
    except Exception as e:
        refused = refused_write(e)
        if refused is None or (refused[1] is not None and not _inside(refused[1], directory)
                               and not _inside(directory, refused[1])):
            raise
        code, _ = refused
        fix = "free some space" if code in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
        raise SegjaxError(f"{os.path.abspath(directory)}: cannot write there ({_REFUSED[code]}); {fix} or "
                          f"pick another {option}") from None
